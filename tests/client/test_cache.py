"""Unit cache and policies, with an in-process fake fetcher (no sockets, no models)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from streaming_weights.client.cache import UnitCache
from streaming_weights.client.policy import ExecutionOrderPolicy, LRUPolicy, make_policy
from streaming_weights.client import FetchedUnit
from streaming_weights.exceptions import ConfigurationError, NotFoundError

UNITS = [f"layer.{i}" for i in range(8)]


class FakeFetch:
    def __init__(self, delay: float = 0.0, fail: dict[str, int] | None = None, error=ConnectionResetError):
        self.delay, self.calls, self.fail, self.error = delay, [], dict(fail or {}), error

    async def __call__(self, name: str) -> FetchedUnit:
        self.calls.append(name)
        await asyncio.sleep(self.delay)
        if self.fail.get(name, 0) > 0:
            self.fail[name] -= 1
            raise self.error(f"boom {name}")
        return FetchedUnit(name, {"w": torch.zeros(4)}, 100)


def make_cache(policy="order", units=UNITS, **kw):
    fetch = FakeFetch(kw.pop("delay", 0.0), kw.pop("fail", None), kw.pop("error", ConnectionResetError))
    cache = UnitCache(fetch, make_policy(policy, units), {u: 100 for u in units}, **kw)
    return cache, fetch


async def run_passes(cache: UnitCache, passes: int, units=UNITS) -> None:
    for _ in range(passes):
        for u in units:
            await cache.acquire(u)
            cache.release(u)


def test_order_policy_predicts_and_learns():
    p = ExecutionOrderPolicy(["a", "b", "c", "d"])
    assert p.predict("b", 2) == ["c", "d"]
    assert p.predict("d", 1) == ["a"]  # cyclic
    # Learn a decoder-only loop (T5 generate): c -> d -> c
    for u in ["a", "b", "c", "d", "c", "d", "c"]:
        p.observe(u)
    assert p.predict("d", 3) == ["c"]
    assert p.distance("d", "a") == float("inf")
    assert p.victim(["a", "c"], current="d") == "a"


async def test_order_policy_beats_lru_on_cycles():
    results = {}
    for policy in ("order", "lru"):
        cache, fetch = make_cache(policy, max_units=4, prefetch_count=0)
        await run_passes(cache, 1)
        first = len(fetch.calls)
        await run_passes(cache, 3)
        results[policy] = (len(fetch.calls) - first) / 3
    L, k = len(UNITS), 4
    assert results["lru"] == L  # LRU with fewer slots than units never hits on a cycle
    # Belady on a cycle: the k kept units are all reused (the computing unit is not counted in k).
    assert results["order"] == L - k
    assert results["order"] < results["lru"]


async def test_cache_as_large_as_model_fetches_nothing_on_second_pass():
    cache, fetch = make_cache(max_units=len(UNITS), prefetch_count=2)
    await run_passes(cache, 1)
    n = len(fetch.calls)
    await run_passes(cache, 2)
    assert len(fetch.calls) == n == len(UNITS)
    assert cache.info()["hits"] == 2 * len(UNITS)


async def test_demand_fetch_joins_inflight_prefetch():
    cache, fetch = make_cache(max_units=0, prefetch_count=1, delay=0.02)
    await cache.acquire(UNITS[0])  # starts the prefetch of UNITS[1]
    cache.release(UNITS[0])
    await cache.acquire(UNITS[1])  # still in flight: must join it
    assert fetch.calls.count(UNITS[1]) == 1
    assert cache.stats.joined_inflight + cache.stats.prefetch_hits == 1


async def test_prefetch_looks_past_the_units_the_cache_keeps():
    # 6 of 8 kept: the two streamed units are fetched as soon as the one before them in the window was used, and
    # the window of one unit is spent on a unit to fetch, never on one already kept
    cache, fetch = make_cache(max_units=6, prefetch_count=1, delay=0.001)
    await run_passes(cache, 1)
    kept = set(cache.cached)
    streamed = [u for u in UNITS if u not in kept]
    assert len(streamed) == 2
    first = UNITS.index(streamed[0])
    before = UNITS[(first - 3) % len(UNITS)]  # a kept unit three steps before the first streamed one
    assert before in kept
    await cache.acquire(before)
    assert streamed[0] in cache.inflight or streamed[0] in cache.prefetched  # fetched three units early
    cache.release(before)
    assert cache.schedule_prefetch(before, 2, beyond_kept=False) == []  # the next two units, kept: nothing to start
    assert len(cache.prefetched) + len(cache.inflight) <= 1  # the window's one unit, as before


async def test_live_units_bounded():
    cache, _ = make_cache(max_units=2, prefetch_count=3, delay=0.001)
    peak = 0
    for _ in range(3):
        for u in UNITS:
            await cache.acquire(u)
            peak = max(peak, cache.live_units)
            if cache.inflight:  # let the prefetches land (their done-callbacks move them to prefetched)
                await asyncio.wait(list(cache.inflight.values()))
            peak = max(peak, cache.live_units)
            cache.release(u)
    assert peak <= 2 + 3 + 1


async def test_resize_evicts_down():
    cache, _ = make_cache(max_units=6, prefetch_count=0)
    await run_passes(cache, 1)
    assert len(cache.cached) == 6
    cache.resize(2)
    assert len(cache.cached) == 2


async def test_a_failed_fetch_is_reported_once_and_not_held():
    # The cache never retries (RetryingSource does, see test_retry.py): one fetch, one error, nothing kept,
    # and the next acquire fetches again.
    cache, fetch = make_cache(max_units=1, prefetch_count=0, fail={UNITS[0]: 1})
    with pytest.raises(ConnectionResetError):
        await cache.acquire(UNITS[0])
    assert fetch.calls == [UNITS[0]]
    assert UNITS[0] not in cache.cached and UNITS[0] not in cache.active and not cache.inflight
    unit = await cache.acquire(UNITS[0])
    assert unit.name == UNITS[0] and fetch.calls == [UNITS[0], UNITS[0]]
    cache2, fetch2 = make_cache(max_units=1, prefetch_count=0, fail={UNITS[0]: 1}, error=NotFoundError)
    with pytest.raises(NotFoundError):
        await cache2.acquire(UNITS[0])
    assert fetch2.calls == [UNITS[0]]



def test_lru_victim_and_bad_policy():
    p = LRUPolicy(["a", "b", "c"])
    for u in ["a", "b", "c", "a"]:
        p.observe(u)
    assert p.victim(["a", "b", "c"], "a") == "b"
    with pytest.raises(ConfigurationError):
        make_policy("fifo", ["a"])


def test_buffer_pool_reuses_only_unviewed_buffers():
    from streaming_weights.client.buffers import BufferPool

    pool = BufferPool(max_bytes=1 << 20)
    buf = pool.take(1024)
    view = torch.frombuffer(buf, dtype=torch.uint8)
    assert not pool.give(buf)  # a live tensor views it: never reused
    del view
    assert pool.give(buf)
    assert pool.take(1024) is buf and pool.reused == 1
    assert pool.take(1024) is not buf  # the pool handed it out once only


def _can_populate() -> bool:
    import mmap

    from streaming_weights.client.buffers import MADV_POPULATE_WRITE

    if MADV_POPULATE_WRITE is None:
        return False
    try:
        mmap.mmap(-1, 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS).madvise(MADV_POPULATE_WRITE)
    except OSError:
        return False
    return True


def test_a_new_unit_buffer_holds_its_pages_before_any_byte_lands():
    """A fresh receive buffer is populated in one call, not faulted in page by page while the unit is received
    into it: right after ``unit_buffer`` the process already holds its pages (a plain map of the same size
    does not, which shows the measure can tell them apart)."""
    import mmap

    from streaming_weights.client.buffers import unit_buffer
    from streaming_weights.memory import current_anon

    if not _can_populate():
        pytest.skip("this kernel lacks MADV_POPULATE_WRITE (Linux 5.14+): buffers are faulted in as they fill")
    size = 64 << 20
    before = current_anon()
    plain = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    assert current_anon() - before < size // 4
    before = current_anon()
    buf = unit_buffer(size)
    assert current_anon() - before >= size * 9 // 10
    assert len(buf) == size and buf[0] == 0 and buf[-1] == 0
    plain.close()


def test_an_idle_buffer_grown_in_place_is_writable_to_its_end():
    """take() resizes an idle buffer of another size; growing one must give real pages (a shared anonymous
    map would SIGBUS on them, so this runs in a child process)."""
    import subprocess
    import sys

    code = ("from streaming_weights.client.buffers import BufferPool\n"
            "pool = BufferPool(max_bytes=1 << 20)\n"
            "small = pool.take(74912)\n"
            "assert pool.give(small)\n"
            "del small\n"
            "big = pool.take(147968)\n"
            "assert pool.reused == 1 and len(big) == 147968\n"
            "big[-1] = 7\n"
            "print(big[-1])\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "7", (proc.returncode, proc.stderr[-2000:])


def test_buffer_pool_takes_a_viewed_buffer_once_its_view_dies():
    """A unit dropped while some frame still holds a view of it: the buffer is held aside (not freed, not
    reused) and taken by the next fetch once the view is gone, so no new buffer is allocated."""
    from streaming_weights.client.buffers import BufferPool

    pool = BufferPool(max_bytes=1 << 20)
    buf = pool.take(1024)
    view = torch.frombuffer(buf, dtype=torch.uint8)
    assert not pool.give(buf)
    ident = id(buf)
    del buf  # as the cache does: only the view (and the pool) still reference it
    other = pool.take(1024)
    assert id(other) != ident and pool.allocated == 2  # still viewed: not handed out
    del view
    assert id(pool.take(1024)) == ident and pool.allocated == 2 and pool.reused == 1
    assert pool.give(other) and pool.bytes == 1024


@pytest.mark.parametrize("wait_for_prefetch", [True, False])
async def test_a_failed_prefetch_is_surfaced_not_retried_again(tmp_path, wait_for_prefetch):
    # A prefetch spends the whole retry policy (RetryingSource); the demand miss for that unit must report
    # that failure instead of starting a second full set of attempts: exactly max_retries + 1 fetches.
    from tests.support.servers import build_model

    from streaming_weights.client.retry import RetryingSource, RetryPolicy
    from streaming_weights.exceptions import FetchTimeoutError, UnitUnavailableError
    from streaming_weights.storage import FilesystemBackend
    from streaming_weights.testing import FakeSource

    build_model(FilesystemBackend(tmp_path), "m", {"resident": 200, "layer.0": 500, "layer.1": 500})

    def handler(req):
        if req.op == "fetch_unit" and req.name == "layer.1":
            raise FetchTimeoutError("slow")

    fake = FakeSource(handler, chunks_dir=tmp_path)
    source = RetryingSource(fake, RetryPolicy(max_retries=2, base_delay=0.001, max_delay=0.002))
    manifest = await source.get_manifest(None)
    names = ["layer.0", "layer.1"]

    async def fetch(name):
        return await source.fetch_unit(manifest, name)

    cache = UnitCache(fetch, make_policy("order", names), {n: 500 for n in names}, max_units=0, prefetch_count=1)
    await cache.acquire("layer.0")  # starts the prefetch of layer.1
    cache.release("layer.0")
    if wait_for_prefetch:  # the prefetch has failed for good before the demand miss comes
        await asyncio.gather(cache.inflight["layer.1"], return_exceptions=True)
        assert "layer.1" in cache.failed
    with pytest.raises(UnitUnavailableError, match="after 3 attempts"):
        await cache.acquire("layer.1")
    assert fake.fetched().count("layer.1") == 3 and not cache.failed and not cache.inflight
    # The failure was reported once: the next miss is a fresh operation with its own attempts.
    with pytest.raises(UnitUnavailableError):
        await cache.acquire("layer.1", prefetch=False)
    assert fake.fetched().count("layer.1") == 6
