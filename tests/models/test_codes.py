"""The compressed tier: quantized units stay as codes in the cache and are expanded per use.

Expanding per use must give exactly what dequantizing on arrival gives (the same conversion), while the cache
and the plan count the codes, so the same budget keeps more layers.
"""

from __future__ import annotations

import pytest
import torch

from streaming_weights import StreamingBaseModel
from streaming_weights.exceptions import ConfigurationError
from streaming_weights.testing import FakeSource
from tests.support.models import chunk

IDS = torch.tensor([[5, 17, 33, 2, 9, 41, 7]])


@pytest.fixture(scope="module", params=["int8", "int4"])
def quantized(request, tiny_source, tmp_path_factory):
    src = tiny_source("llama", layers=4)
    out = tmp_path_factory.mktemp(f"codes-{request.param}") / "llama"
    chunk(src, out, name="llama", quantize=request.param)
    return out


def run(chunks, mode: str, **kw):
    src = FakeSource(chunks_dir=chunks)
    with StreamingBaseModel("llama", src, quantized_in_memory=mode, speculation="off", **kw) as m:
        tokens = m.generate(input_ids=IDS, max_new_tokens=5, do_sample=False)
        with torch.no_grad():
            logits = m.hf_model(input_ids=IDS).logits
        held = {n: {t.dtype for t in u.tensors.values()} for n, u in m.engine.call(lambda: dict(m.engine.cache.cached)).items()}
        return tokens, logits, m.get_cache_info(), held, m.engine


def test_codes_give_exactly_what_dequantizing_on_arrival_gives(quantized):
    want_tokens, want_logits, plain, plain_held, _ = run(quantized, "dequantized", cache_size=2)
    tokens, logits, info, held, engine = run(quantized, "codes", cache_size=2)
    assert torch.equal(tokens, want_tokens)
    assert torch.equal(logits, want_logits)
    # the cache holds codes (integers), the dequantized path holds floats; both computed the same
    assert held and all(torch.int8 in d or torch.uint8 in d for d in held.values())
    assert plain_held and all(d == {torch.float32} for d in plain_held.values())
    assert engine.codes is not None and engine.codes.expansions >= 4


def test_the_plan_counts_codes_so_a_budget_keeps_more_layers(quantized):
    budget = 40 << 20
    _, _, plain, _, _ = run(quantized, "dequantized", memory_budget=budget)
    _, _, codes, _, _ = run(quantized, "codes", memory_budget=budget)
    assert codes["plan"]["unit_bytes"] < plain["plan"]["unit_bytes"] / 2  # codes: at most half of float32
    assert codes["plan"]["bound_bytes"] <= budget
    assert codes["plan"]["cache_size"] >= plain["plan"]["cache_size"]


def test_auto_keeps_codes_under_a_budget_only(quantized):
    *_, engine = run(quantized, "auto", memory_budget=40 << 20)
    assert engine.codes is not None
    *_, engine = run(quantized, "auto", cache_size=2)
    assert engine.codes is None


def test_the_option_is_checked():
    with pytest.raises(ConfigurationError, match="quantized_in_memory"):
        StreamingBaseModel("llama", FakeSource(lambda req: None), quantized_in_memory="zip")
