"""generate hands the lm_head the last position as a slice of the hidden states; in half precision torch then copies
the whole lm_head weight per token (320 MiB for a 262k-token bfloat16 vocabulary). The model's lm_head gets a
fresh tensor of the same values instead: same logits, no copy."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from streaming_weights import StreamingBaseModel
from streaming_weights.models.loader import _fresh_half_input

IDS = torch.tensor([[5, 17, 33, 2, 9, 41, 7]])


def standard(t: torch.Tensor) -> bool:
    return t.stride() == torch.empty(t.shape).stride()


def test_a_half_precision_slice_becomes_a_fresh_tensor_of_the_same_values():
    hidden = torch.randn(2, 8, 64, dtype=torch.bfloat16)
    last = hidden[:, -1:, :]
    assert not standard(last)
    (fresh,), _ = _fresh_half_input(None, (last,), {})
    assert standard(fresh) and torch.equal(fresh, last)
    w = torch.randn(300, 64, dtype=torch.bfloat16)
    assert torch.equal(torch.nn.functional.linear(fresh, w), torch.nn.functional.linear(last, w))
    assert _fresh_half_input(None, (hidden,), {}) is None  # already fresh: untouched
    assert _fresh_half_input(None, (last.float(),), {}) is None  # float32 takes another kernel: left as it is


def test_generate_gives_the_lm_head_fresh_inputs_and_transformers_tokens(tiny_source, tmp_path):
    from tests.support.models import chunk

    src = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(str(tiny_source("llama")), dtype=torch.bfloat16).save_pretrained(str(src))
    chunk(src, tmp_path / "chunks", name="llama-bf16")
    ref = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.bfloat16).eval()
    want = ref.generate(IDS, max_new_tokens=5, do_sample=False)
    with StreamingBaseModel(None, tmp_path / "chunks", speculation="off") as m:
        seen = []
        m.hf_model.lm_head.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))  # runs after ours
        got = m.generate(IDS, max_new_tokens=5, do_sample=False)
    assert torch.equal(got, want)
    assert len(seen) == 5 and all(standard(x) for x in seen)
