"""Generation under a memory budget: each request makes room for its KV cache; batches fit the budget."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from streaming_weights import StreamingConfig, StreamingLlamaModel
from streaming_weights.format import Manifest
from streaming_weights.models.generation import DEFAULT_MAX_BATCH, choose_batch_size
from streaming_weights.models.planner import plan_memory

IDS = torch.tensor([[5, 17, 33, 2, 9, 41, 7]])
SLACK = 16 << 20  # the engine adds the measured overhead (tokenizer, skeleton, first-use set-up)


@pytest.fixture(scope="module")
def tiny(tiny_chunks):
    src, chunks = tiny_chunks("llama", layers=6)
    m = Manifest.from_bytes((chunks / "manifest.json").read_bytes())
    plan = plan_memory(m, StreamingConfig(), budget=None)
    return src, chunks, plan.resident_bytes + 3 * plan.unit_bytes + plan.headroom_bytes + SLACK


def test_generate_fits_the_request_and_matches_transformers(tiny, monkeypatch):
    src, chunks, budget = tiny
    ref = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    want = ref.generate(IDS, max_new_tokens=5, do_sample=False)
    with StreamingLlamaModel("llama", str(chunks), memory_budget=budget, speculation="off") as model:
        calls = []
        real = model.engine.fit_request
        monkeypatch.setattr(model.engine, "fit_request", lambda s, b=1: calls.append((s, b)) or real(s, b))
        got = model.generate(IDS, max_new_tokens=5, do_sample=False)
        assert torch.equal(got, want)
        assert calls == [(IDS.shape[1] + 5, 1)]
        model.generate(torch.cat([IDS, IDS]), max_new_tokens=3, do_sample=False)
        assert calls[-1] == (IDS.shape[1] + 3, 2)


def test_no_budget_means_no_fitting_and_the_default_batch(tiny, monkeypatch):
    _, chunks, _ = tiny
    with StreamingLlamaModel("llama", str(chunks), cache_size=2) as model:
        monkeypatch.setattr(model.engine, "fit_request", lambda *a: pytest.fail("fit_request without a budget"))
        model.generate(IDS, max_new_tokens=2, do_sample=False)
        assert choose_batch_size(model, 40, 10**6) == DEFAULT_MAX_BATCH
        assert choose_batch_size(model, 3, 10**6) == 3


def test_batch_size_follows_the_budget(tiny):
    _, chunks, budget = tiny
    with StreamingLlamaModel("llama", str(chunks), memory_budget=budget) as model:
        plan = model.engine.plan
        # a sequence length whose KV cache and activations let only a few sequences fit beside the weights
        seq = next(s for s in (2 ** k for k in range(4, 16)) if plan.max_batch(s) < DEFAULT_MAX_BATCH)
        assert choose_batch_size(model, 40, seq) == plan.max_batch(seq) < DEFAULT_MAX_BATCH
        assert choose_batch_size(model, 40, 8) == min(DEFAULT_MAX_BATCH, plan.max_batch(8))
        model.engine.plan_for(seq, plan.max_batch(seq))  # the chosen batch fits: no ConfigurationError


def test_the_kept_units_follow_each_requests_size(tiny):
    # the load-time plan reserves a context of DEFAULT_PLAN_TOKENS (capped at the model's 256 positions here: most of
    # this budget); a short request keeps what its smaller KV cache and scores leave (the whole model here), a
    # longer one fewer, all within the budget
    src, chunks, _ = tiny
    m = Manifest.from_bytes((chunks / "manifest.json").read_bytes())
    base = plan_memory(m, StreamingConfig(), budget=None)
    with StreamingLlamaModel("llama", str(chunks), memory_budget="1GB") as model:
        overhead = model.engine.plan.overhead_bytes
    budget = base.resident_bytes + 2 * base.unit_bytes + base.headroom.bytes(base.seq_len) + overhead + (64 << 10)
    with StreamingLlamaModel("llama", str(chunks), memory_budget=budget, speculation="off") as model:
        load_time = model.engine.plan
        assert load_time.seq_len == base.seq_len and load_time.cache_size < len(load_time.streamed), load_time.as_dict()
        short = model.engine.fit_request(IDS.shape[1] + 3)
        assert short.cache_size == len(short.streamed) and short.bound_bytes <= budget
        assert model.engine.cache.max_units == short.cache_size
        ref = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
        assert torch.equal(model.generate(IDS, max_new_tokens=3, do_sample=False),
                           ref.generate(IDS, max_new_tokens=3, do_sample=False))
        assert model.engine.cache.max_units == short.cache_size  # generate fitted the same request
        assert model.engine.fit_request(base.seq_len).cache_size == load_time.cache_size == model.engine.cache.max_units
