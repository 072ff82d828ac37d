"""The streaming engine driven through FakeSource (no sockets): retries, integrity, the bridge deadline,
explicit loading, and the counters."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM

from streaming_weights import StreamingBaseModel, StreamingLlamaModel, StreamingMonitor
from streaming_weights.client.retry import RetryPolicy
from streaming_weights.exceptions import (
    FetchTimeoutError,
    IntegrityError,
    ModelError,
    NotFoundError,
    UnitUnavailableError,
    UnknownOptionError,
)
from streaming_weights.testing import FakeRequest, FakeSource

IDS = torch.tensor([[5, 17, 33, 2, 9, 41, 7]])


@pytest.fixture(scope="module")
def llama(tiny_chunks):
    src, chunks = tiny_chunks("llama", layers=4)
    ref = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    return chunks, ref


def reference_hidden(ref):
    with torch.no_grad():
        return ref.model(input_ids=IDS).last_hidden_state


def test_fake_source_passthrough_gives_reference_outputs(llama):
    chunks, ref = llama
    src = FakeSource(chunks_dir=chunks)
    with StreamingLlamaModel("llama", src, cache_size=0, prefetch_count=1) as m:
        out = m.forward(IDS)
    torch.testing.assert_close(out.last_hidden_state, reference_hidden(ref), rtol=0, atol=1e-5)
    assert [r.op for r in src.requests][:1] == ["get_manifest"]
    # resident part first, then the blocks in order (then a prefetch of the next pass's first block)
    assert src.fetched()[:5] == ["resident"] + [f"model.layers.{i}" for i in range(4)]
    assert src.closed


def test_transient_error_is_retried_once_and_result_is_exact(llama):
    chunks, ref = llama
    failed: set[str] = set()

    def flaky(req: FakeRequest):
        if req.op == "fetch_unit" and req.name == "model.layers.2" and req.name not in failed:
            failed.add(req.name)
            raise ConnectionResetError("injected drop")

    src = FakeSource(flaky, chunks_dir=chunks)
    with StreamingLlamaModel("llama", src, cache_size=0, max_retries=2) as m:
        out = m.forward(IDS)
        assert m.source.retries == 1
    assert src.fetched().count("model.layers.2") == 2
    torch.testing.assert_close(out.last_hidden_state, reference_hidden(ref), rtol=0, atol=1e-5)


def test_corrupt_bytes_refused_every_attempt_never_computed(llama):
    chunks, _ = llama

    async def corrupt(req: FakeRequest):
        data = await req.forward()
        if req.name == "model.layers.1":
            data = bytearray(data)
            data[-3] ^= 0xFF
        return data

    src = FakeSource(corrupt, chunks_dir=chunks)
    # no prefetch: a failed prefetch is followed by a fresh demand fetch, which would double the count
    with StreamingLlamaModel("llama", src, cache_size=0, prefetch_count=0, max_retries=1) as m:
        with pytest.raises(UnitUnavailableError, match="model.layers.1") as ei:
            m.forward(IDS)
        assert isinstance(ei.value.__cause__, IntegrityError)
        assert src.fetched().count("model.layers.1") == 2  # max_retries + 1 attempts, no multiplication
        assert all(b.module.mlp.up_proj.weight.is_meta for b in m.engine.bindings)


def test_not_found_is_not_retried(llama):
    chunks, _ = llama

    def missing(req: FakeRequest):
        if req.name == "model.layers.0":
            raise NotFoundError("no such unit")

    src = FakeSource(missing, chunks_dir=chunks)
    with StreamingLlamaModel("llama", src, cache_size=0, max_retries=3) as m:
        with pytest.raises(NotFoundError):
            m.forward(IDS)
    assert src.fetched().count("model.layers.0") == 1


def test_bridge_timeout_is_the_retry_policy_deadline(llama):
    chunks, _ = llama
    never = asyncio.Event()  # awaited on the engine's loop; nobody sets it

    async def hang(req: FakeRequest):
        if req.name == "model.layers.0":
            await never.wait()

    m = StreamingLlamaModel("llama", FakeSource(hang, chunks_dir=chunks), cache_size=0, prefetch_count=0,
                            timeout_seconds=0.2, max_retries=0)
    with m:
        assert m.engine.deadline == m.source.deadline() == RetryPolicy(max_retries=0, timeout_seconds=0.2).deadline()
        with pytest.raises(FetchTimeoutError):
            m.forward(IDS)


def test_explicit_loading_and_no_io_before_it(llama):
    chunks, _ = llama
    src = FakeSource(chunks_dir=chunks)

    async def go():
        m = StreamingBaseModel("llama", src)
        assert src.requests == []  # inside a loop, nothing is fetched until asked
        assert "not loaded" in repr(m)
        await m.ensure_loaded_async()
        assert m.manifest.name == "llama" and m.hf_model is not None
        await m.cleanup()

    asyncio.run(go())
    m = StreamingBaseModel("llama", FakeSource(chunks_dir=chunks))
    m.close()
    with pytest.raises(ModelError, match="closed"):
        m.forward(IDS)


def test_unknown_option_names_it(llama):
    chunks, _ = llama
    with pytest.raises(UnknownOptionError, match="cache_sise") as ei:
        StreamingLlamaModel("llama", str(chunks), cache_sise=3)
    assert isinstance(ei.value, TypeError)


def test_direct_hf_model_calls_are_counted(llama):
    chunks, _ = llama
    mon = StreamingMonitor()

    async def slow(req: FakeRequest):
        if req.op == "fetch_unit":
            await asyncio.sleep(0.02)  # a slow network, so fetches stall the compute

    with StreamingLlamaModel("llama", FakeSource(slow, chunks_dir=chunks), cache_size=0, prefetch_count=0,
                             monitor=mon) as m:
        with torch.no_grad():
            m.hf_model(input_ids=IDS)  # transformers' model called directly: one inference
            m.hf_model.model(input_ids=IDS)  # its base model directly: one more
        m.forward(IDS)  # the facade (calls the base model inside): one
        m.generate(input_ids=IDS, max_new_tokens=3, min_new_tokens=3, do_sample=False)  # one, 3 tokens
        stats = m.get_inference_stats()
    assert stats["total_inferences"] == 4
    assert stats["generated_tokens"] == 3
    assert 0 < stats["stall_seconds"] <= stats["total_time"]
    assert stats["compute_seconds"] > 0
    assert stats["compute_seconds"] + stats["stall_seconds"] == pytest.approx(stats["total_time"])
    metrics = mon.get_metrics()
    assert metrics["total_inferences"] == 4
    assert metrics["stall_seconds"] == pytest.approx(stats["stall_seconds"])


def test_effective_cache_size_capped_at_streamed_units(llama):
    chunks, _ = llama
    with StreamingLlamaModel("llama", FakeSource(chunks_dir=chunks), cache_size=100) as m:
        info = m.get_cache_info()
        assert (info["requested_cache_size"], info["effective_cache_size"], info["streamed_units"]) == (100, 4, 4)
        m.cache_size = 2
        info = m.get_cache_info()
        assert (info["requested_cache_size"], info["effective_cache_size"]) == (2, 2)


def test_a_model_that_fits_keeps_its_weights_in_place(llama):
    """With every block kept, the blocks' tensors stay in the modules after the first pass: later tokens never
    ask the cache (no hop to the I/O thread), the output is transformers' own, uses still count as hits, and
    shrinking the cache (or clearing it) puts the meta placeholders back before anything is dropped."""
    chunks, ref = llama
    src = FakeSource(chunks_dir=chunks)
    with StreamingLlamaModel("llama", src, cache_size=4, speculation="off") as m:
        with torch.no_grad():
            want = ref.generate(input_ids=IDS, max_new_tokens=4, do_sample=False)
        assert torch.equal(m.generate(input_ids=IDS, max_new_tokens=4, do_sample=False), want)
        assert m.get_cache_info()["pinned"]
        asked, acquire = [], m.engine.cache.acquire

        async def counting(name, **kw):
            asked.append(name)
            return await acquire(name, **kw)

        m.engine.cache.acquire = counting
        hits = m.get_cache_info()["hits"]
        fetched = len(src.fetched())
        assert torch.equal(m.generate(input_ids=IDS, max_new_tokens=4, do_sample=False), want)
        assert asked == [] and len(src.fetched()) == fetched  # held units cost nothing to use
        assert m.get_cache_info()["hits"] >= hits + 4 * 4  # 4 blocks x (prompt + 3 decode steps)
        torch.testing.assert_close(m.forward(IDS).last_hidden_state, reference_hidden(ref), rtol=0, atol=1e-5)
        m.cache_size = 1
        assert not m.get_cache_info()["pinned"]
        layer = m.hf_model.model.layers[0]
        assert layer.mlp.up_proj.weight.is_meta  # between calls, a block holds nothing again
        assert torch.equal(m.generate(input_ids=IDS, max_new_tokens=4, do_sample=False), want)
        assert asked  # back to the cache
        m.cache_size = 4
        m.generate(input_ids=IDS, max_new_tokens=2, do_sample=False)
        m.generate(input_ids=IDS, max_new_tokens=2, do_sample=False)
        assert m.get_cache_info()["pinned"]
        m.clear_cache()
        assert not m.get_cache_info()["pinned"] and layer.mlp.up_proj.weight.is_meta
        assert m.get_cache_info()["cached_components"] == []


@pytest.mark.parametrize("policy,pins", [("order", True), ("lru", False)])
def test_the_units_a_full_cache_keeps_stay_in_place(llama, policy, pins):
    """Under the execution-order policy a full cache keeps the same blocks pass after pass (it evicts the unit just
    used): after the first inference those stay in their modules and only the streamed blocks reach the cache, with
    transformers' own output and the same bytes per pass. LRU's kept set moves: nothing is pinned."""
    chunks, ref = llama
    src = FakeSource(chunks_dir=chunks)
    with StreamingLlamaModel("llama", src, cache_size=2, speculation="off", cache_policy=policy) as m:
        asked, acquire = [], m.engine.cache.acquire

        async def counting(name, **kw):
            asked.append(name)
            return await acquire(name, **kw)

        m.engine.cache.acquire = counting
        with torch.no_grad():
            want = ref.generate(input_ids=IDS, max_new_tokens=4, do_sample=False)
        assert torch.equal(m.generate(input_ids=IDS, max_new_tokens=4, do_sample=False), want)
        assert m.get_cache_info()["pinned"] is pins
        # pinned between the tokens of that first generate already: 4 blocks, then the 2 streamed ones x 3 steps
        assert len(asked) == (4 + 2 * 3 if pins else 4 * 4)
        asked.clear()
        before = m.get_cache_info()
        assert torch.equal(m.generate(input_ids=IDS, max_new_tokens=4, do_sample=False), want)
        after = m.get_cache_info()
        if pins:
            kept = sorted(b.name for b in m.engine.bindings if b.pinned)
            assert kept == ["model.layers.0", "model.layers.1"]  # the first pass filled the cache with these
            assert sorted(set(asked)) == ["model.layers.2", "model.layers.3"] and len(asked) == 2 * 4
            assert after["hits"] - before["hits"] >= 2 * 4  # pinned uses count as hits
            assert after["fetches"] - before["fetches"] == 2 * 4  # the streamed 2 of 4, every pass: (L - k) / L
            torch.testing.assert_close(m.forward(IDS).last_hidden_state, reference_hidden(ref), rtol=0, atol=1e-5)
            m.cache_size = 3  # a resize gives the pinned units back to the cache first
            assert not m.get_cache_info()["pinned"]
            assert all(b.module.mlp.up_proj.weight.is_meta for b in m.engine.bindings)
            assert torch.equal(m.generate(input_ids=IDS, max_new_tokens=4, do_sample=False), want)
            assert sum(b.pinned for b in m.engine.bindings) == 3
        else:
            assert len(asked) == 4 * 4
