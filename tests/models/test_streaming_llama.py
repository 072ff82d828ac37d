"""LLaMA-family streaming: parity with transformers loading the ORIGINAL source, cache, prefetch, failure."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import torch
from transformers import AutoModelForCausalLM

from streaming_weights import StreamingConfig, StreamingLlamaModel, StreamingMonitor
from streaming_weights.exceptions import (
    IntegrityError,
    NotFoundError,
    UnitUnavailableError,
    UnsupportedArchitectureError,
)

from streaming_weights.testing import FakeSource
from tests.support.streaming import served

IDS = torch.tensor([[5, 17, 33, 2, 9, 41, 7], [3, 8, 12, 19, 0, 0, 0]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0]])


@contextlib.contextmanager
def location(kind: str, chunks):
    if kind == "ws":
        with served(chunks) as uri:
            yield uri
    else:
        yield str(chunks)


@pytest.fixture(scope="module")
def llama(tiny_chunks):
    src, chunks = tiny_chunks("llama", layers=6)
    ref = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    return src, chunks, ref


@pytest.mark.parametrize("kind", ["ws", "dir"])
def test_forward_and_generate_parity(llama, kind):
    _, chunks, ref = llama
    with location(kind, chunks) as uri, StreamingLlamaModel("llama", uri, cache_size=2, prefetch_count=2) as m:
        assert m.get_cache_info()["streamed_units"] == 6  # cache smaller than the model
        out = m.forward(IDS, MASK)
        with torch.no_grad():
            want = ref.model(input_ids=IDS, attention_mask=MASK).last_hidden_state
        # Same transformers code on the same fp32 weights: identical up to 1e-5 (we see exact equality).
        torch.testing.assert_close(out.last_hidden_state, want, rtol=0, atol=1e-5)
        got = m.generate(input_ids=IDS, attention_mask=MASK, max_new_tokens=10, do_sample=False)
        with torch.no_grad():
            exp = ref.generate(input_ids=IDS, attention_mask=MASK, max_new_tokens=10, do_sample=False)
        assert torch.equal(got, exp)


def test_forward_async_and_sampling_match(llama):
    _, chunks, ref = llama

    async def go():
        async with StreamingLlamaModel("llama", str(chunks), cache_size=1) as m:
            out = await m.forward_async(input_ids=IDS, attention_mask=MASK)
            torch.manual_seed(7)
            sampled = await m.generate_async(input_ids=IDS[:1], max_new_tokens=6, do_sample=True, top_k=20)
            return out, sampled

    out, sampled = asyncio.run(go())
    torch.manual_seed(7)
    with torch.no_grad():
        exp = ref.generate(input_ids=IDS[:1], max_new_tokens=6, do_sample=True, top_k=20)
    assert torch.equal(sampled, exp)
    assert out.last_hidden_state.shape == (2, 7, 64)


def test_live_units_bounded_during_forward(llama):
    _, chunks, _ = llama
    cache_size, prefetch = 2, 2
    with StreamingLlamaModel("llama", str(chunks), cache_size, prefetch_count=prefetch) as m:
        seen = []
        orig = m.engine.acquire

        def counting(name):
            tensors = orig(name)
            seen.append(m.engine.call(lambda: m.engine.cache.live_units))
            return tensors

        for b in m.engine.bindings:
            b._acquire = counting
        m.forward(IDS, MASK)
        m.generate(input_ids=IDS[:1], max_new_tokens=4, do_sample=False, speculation="off")
        assert m.engine.pinned
    # the first pass acquires every block; then the kept ones stay in their modules (pinned) and only the 4
    # streamed ones are acquired, in each of generate's 4 passes
    assert len(seen) == 6 + 4 * (6 - cache_size) and max(seen) <= cache_size + prefetch + 1
    assert max(seen) >= cache_size + 1  # the bound is actually approached


def test_prefetch_overlaps_compute(llama):
    _, chunks, _ = llama
    async def slow(req):
        await asyncio.sleep(0.05)  # a slow network: each fetch takes longer than a layer's compute

    src = FakeSource(slow, chunks_dir=chunks)
    with StreamingLlamaModel("llama", src, cache_size=0, prefetch_count=1, trace=True) as m:
        m.forward(IDS, MASK)
        ev = m.trace_events()
    names = m.streamed_units
    t = {(k, u): ts for ts, k, u in ev if (k, u) not in {}}
    firsts: dict = {}
    for ts, k, u in ev:
        firsts.setdefault((k, u), ts)
    for a, b in zip(names, names[1:]):
        # the fetch of unit i+1 starts before unit i's compute ends
        assert firsts[("fetch_start", b)] < firsts[("compute_end", a)], (a, b)
    assert t  # events were recorded


def test_default_policy_fetches_less_than_lru(llama):
    _, chunks, _ = llama
    per_token = {}
    for policy in ("order", "lru"):
        with StreamingLlamaModel("llama", str(chunks), cache_size=3, prefetch_count=1, cache_policy=policy) as m:
            m.generate(input_ids=IDS[:1], max_new_tokens=8, do_sample=False, min_new_tokens=8)
            per_token[policy] = m.get_cache_info()["bytes_fetched"] / 8
    assert per_token["order"] < per_token["lru"]


def test_cache_as_large_as_model_second_pass_fetches_nothing(llama):
    _, chunks, _ = llama
    with StreamingLlamaModel("llama", str(chunks), cache_size=6) as m:
        m.forward(IDS, MASK)
        first = m.get_cache_info()["bytes_fetched"]
        m.forward(IDS, MASK)
        info = m.get_cache_info()
    assert info["bytes_fetched"] == first > 0
    assert info["hits"] >= 6


def test_cache_controls_and_stats(llama):
    _, chunks, _ = llama
    mon = StreamingMonitor()
    with StreamingLlamaModel("llama", str(chunks), 3, monitor=mon) as m:
        asyncio.run(m.warmup())
        assert len(m.get_cache_info()["cached_components"]) == 3
        asyncio.run(m.warmup([4, 5]))
        started = asyncio.run(m.prefetch_next_layers(0, 2))
        assert set(started) <= {"model.layers.1", "model.layers.2"}
        m.forward(IDS, MASK)
        m.cache_size = 1
        assert m.cache_size == 1 and len(m.get_cache_info()["cached_components"]) <= 1
        m.clear_cache()
        assert m.get_cache_info()["cached_components"] == []
        m.forward(IDS, MASK)
        info, stats = m.get_cache_info(), m.get_inference_stats()
    for key in ("hits", "misses", "hit_rate", "evictions", "bytes_fetched", "cached_components", "cache_size",
                "max_cache_size", "memory_usage_mb"):
        assert key in info
    for key in ("total_inferences", "avg_inference_time", "cache_hit_rate", "fetch_seconds", "compute_seconds",
                "stall_seconds"):
        assert key in stats
    assert stats["total_inferences"] == 2
    assert mon.get_metrics()["total_inferences"] == 2
    assert 0 <= mon.get_metrics()["cache_hit_rate"] <= 1


def test_config_supplies_options(llama):
    _, chunks, _ = llama
    cfg = StreamingConfig(cache_size=4, prefetch_count=0, model_name="llama", chunks_dir=str(chunks))
    with StreamingLlamaModel(config=cfg, chunks_dir=str(chunks)) as m:
        assert m.cache_size == 4 and m.prefetch_count == 0 and m.model_name == "llama"


def test_unreachable_unit_raises_never_garbage(llama):
    _, chunks, _ = llama
    def failing(req):
        if req.name == "model.layers.3":
            raise ConnectionResetError("injected failure fetching model.layers.3")

    src = FakeSource(failing, chunks_dir=chunks)
    # no prefetch: a failed prefetch is followed by a fresh demand fetch (which would double the count)
    with StreamingLlamaModel("llama", src, cache_size=1, prefetch_count=0, max_retries=2) as m:
        with pytest.raises(UnitUnavailableError, match="model.layers.3"):
            m.forward(IDS, MASK)
        assert src.fetched().count("model.layers.3") == 3  # retried max_retries times, then gave up
        # nothing left in place but the kept unit, pinned with its own tensors (the cache keeps layer 0)
        placed = [b.name for b in m.engine.bindings if not b.module.self_attn.q_proj.weight.is_meta]
        assert placed == [b.name for b in m.engine.bindings if b.pinned] == ["model.layers.0"]


def test_corrupted_unit_is_never_used(llama, tmp_path):
    import shutil

    _, chunks, _ = llama
    bad = tmp_path / "bad"
    shutil.copytree(chunks, bad)
    unit = bad / "units" / "model.layers.2.safetensors"
    data = bytearray(unit.read_bytes())
    data[-5] ^= 0xFF
    unit.write_bytes(bytes(data))
    with StreamingLlamaModel("llama", str(bad), cache_size=1, max_retries=1) as m:
        with pytest.raises(UnitUnavailableError) as ei:
            m.forward(IDS, MASK)
        assert isinstance(ei.value.__cause__, IntegrityError)
        assert "model.layers.2" not in m.get_cache_info()["cached_components"]


def test_unknown_model_lists_hosted_and_family_checked(llama, tiny_chunks):
    _, chunks, _ = llama
    with pytest.raises(NotFoundError, match=r"\['llama'\]"):
        StreamingLlamaModel("nope", str(chunks))
    _, bert_chunks = tiny_chunks("bert")
    with pytest.raises(UnsupportedArchitectureError, match="StreamingBaseModel"):
        StreamingLlamaModel(None, str(bert_chunks))


@pytest.mark.xdist_group("smollm2_reference")  # one worker loads the reference (make test: -n 2)
def test_smollm2_real_greedy_text_identical(smollm2_chunks, smollm2_reference):
    ref, tok = smollm2_reference
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with served(smollm2_chunks) as uri, StreamingLlamaModel("SmolLM2-135M-Instruct", uri, cache_size=24,
                                                             prefetch_count=2) as m:
        assert m.tokenizer is not None
        got = m.generate(**enc, max_new_tokens=8, do_sample=False)
        text = m.tokenizer.decode(got[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    with torch.no_grad():
        exp = ref.generate(**enc, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, exp)
    assert text == tok.decode(exp[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in text


def test_receive_buffers_reused_but_never_under_a_live_tensor(llama):
    _, chunks, ref = llama
    with StreamingLlamaModel("llama", str(chunks), cache_size=0, prefetch_count=1) as m:
        m.forward(IDS, MASK)
        assert m.get_cache_info()["buffers_reused"] > 0
        # Hold on to a streamed weight while the engine keeps fetching: its buffer must not be reused.
        held = {}
        orig = m.engine.acquire

        def grab(name):
            tensors = orig(name)
            if name == "model.layers.1" and not held:
                held["w"] = tensors["model.layers.1.mlp.up_proj.weight"]
            return tensors

        for b in m.engine.bindings:
            b._acquire = grab
        m.forward(IDS, MASK)
        snapshot = held["w"].clone()
        for _ in range(3):
            out = m.forward(IDS, MASK)
        assert torch.equal(held["w"], snapshot)
        assert torch.equal(held["w"], ref.model.layers[1].mlp.up_proj.weight)
        with torch.no_grad():
            torch.testing.assert_close(out.last_hidden_state, ref.model(input_ids=IDS, attention_mask=MASK).last_hidden_state,
                                       rtol=0, atol=1e-5)


def test_streamed_units_are_fingerprinted_on_their_first_fetch(llama):
    """Units a plan streams come again on every pass: their first fetch is verified against BLAKE3 and takes their
    fingerprint too, so no later fetch is hashed again (client.fingerprint); a model kept whole takes none."""
    _, chunks, ref = llama
    with torch.no_grad():
        want = ref.model(input_ids=IDS, attention_mask=MASK).last_hidden_state
    with served(chunks) as uri:
        with StreamingLlamaModel("llama", uri, cache_size=2, prefetch_count=1) as m:
            m.forward(IDS, MASK)
            book = m.source.fingerprints
            hashed, tagged = book.blake3_bytes, book.tag_bytes
            assert len(book) == 6  # every block, fingerprinted as it was first verified
            for _ in range(2):
                torch.testing.assert_close(m.forward(IDS, MASK).last_hidden_state, want, rtol=0, atol=1e-5)
            assert book.blake3_bytes == hashed and book.tag_bytes > tagged  # refetched: by the fingerprint alone
        with StreamingLlamaModel("llama", uri, cache_size=6) as whole:
            whole.forward(IDS, MASK)
            assert len(whole.source.fingerprints) == 0
