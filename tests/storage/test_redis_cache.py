"""RedisCacheBackend against a real redis-server in front of a real S3 server (both started by fixtures)."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
import uuid

import pytest
import redis

from streaming_weights.exceptions import KeyNotFoundError
from streaming_weights.netutil import free_port
from streaming_weights.storage import MemoryBackend
from streaming_weights.storage.redis_cache import RedisCacheBackend
from streaming_weights.storage.s3 import S3Backend

from tests.support import services
from tests.support.waiting import eventually

pytestmark = [pytest.mark.redis, pytest.mark.s3]

MiB = 1 << 20


@pytest.fixture
def prefix() -> str:
    """A private Redis namespace per test (the Redis server is shared by the session)."""
    return f"t{uuid.uuid4().hex[:10]}:"


def test_hit_miss_and_write_invalidation(s3_server, s3_bucket, redis_server, prefix):
    async def go():
        s3 = s3_server.backend(s3_bucket, "m")
        await s3.save("units/a.safetensors", b"A" * 1000)
        cache = RedisCacheBackend(s3, redis_server, key_prefix=prefix)
        assert await cache.load("units/a.safetensors") == b"A" * 1000
        gets = s3.stats["get_requests"]
        assert await cache.load("units/a.safetensors") == b"A" * 1000
        buf = bytearray(10)
        assert await cache.read_into("units/a.safetensors", buf, offset=995) == 5 and buf[:5] == b"AAAAA"
        assert await cache.read_range("units/a.safetensors", 10, 20) == b"A" * 20
        assert await cache.size("units/a.safetensors") == 1000
        assert s3.stats["get_requests"] == gets  # all served by Redis
        assert cache.stats["misses"] == 1 and cache.stats["fills"] == 1 and cache.stats["hits"] == 3

        # writes go to S3 and invalidate
        await cache.save("units/a.safetensors", b"B" * 10)
        assert await s3.load("units/a.safetensors") == b"B" * 10
        assert await cache.load("units/a.safetensors") == b"B" * 10
        assert await cache.exists("units/a.safetensors") and await cache.list("units/") == ["units/a.safetensors"]
        await cache.delete("units/a.safetensors")
        with pytest.raises(KeyNotFoundError):
            await cache.load("units/a.safetensors")
        # a range miss reads S3 without filling
        await s3.save("units/b", b"0123456789")
        assert await cache.read_range("units/b", 2, 3) == b"234"
        assert cache.stats["passthrough"] == 1
        await cache.close()

    asyncio.run(go())


def test_two_caches_concurrent_misses_read_s3_once(s3_server, s3_bucket, redis_server, prefix):
    """Two servers (two cache instances, separate Redis connections) over one bucket: one S3 read per unit."""
    units = {f"units/layer{i}.safetensors": os.urandom(2 * MiB + i) for i in range(4)}

    async def go():
        writer = s3_server.backend(s3_bucket, "shared")
        for k, v in units.items():
            await writer.save(k, v)
        s3 = s3_server.backend(s3_bucket, "shared")  # the GETs we count
        a = RedisCacheBackend(s3, redis_server, key_prefix=prefix)
        b = RedisCacheBackend(s3, redis_server, key_prefix=prefix)
        # every unit requested 3x by each "server" at the same moment
        reqs = [(c, k) for k in units for c in (a, b, a, b, a, b)]
        got = await asyncio.gather(*(c.load(k) for c, k in reqs))
        assert all(data == units[k] for data, (_, k) in zip(got, reqs))
        objects_read = s3.stats["get_bytes"]
        assert objects_read == sum(map(len, units.values())), s3.stats  # each unit's bytes fetched once
        assert a.stats["fills"] + b.stats["fills"] == len(units)
        assert a.stats["waits"] + b.stats["waits"] + a.stats["hits"] + b.stats["hits"] == len(reqs) - len(units)
        assert a.stats["fallbacks"] == b.stats["fallbacks"] == 0
        await a.close()
        await b.close()

    asyncio.run(go())


def _process_load(url: str, prefix: str, endpoint: str, key_id: str, secret: str, bucket: str, key: str, q) -> None:
    async def go():
        s3 = S3Backend(bucket, "proc", aws_access_key_id=key_id, aws_secret_access_key=secret, endpoint_url=endpoint)
        cache = RedisCacheBackend(s3, url, key_prefix=prefix)
        data = await cache.load(key)
        await cache.close()
        return len(data), s3.stats["get_requests"], cache.stats["fills"]

    q.put(asyncio.run(go()))


def test_separate_processes_single_flight(s3_server, s3_bucket, redis_server, prefix):
    data = os.urandom(6 * MiB)
    writer = s3_server.backend(s3_bucket, "proc")
    asyncio.run(writer.save("units/big", data))
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    args = (redis_server, prefix, s3_server.endpoint_url, s3_server.access_key, s3_server.secret_key, s3_bucket,
            "units/big", q)
    procs = [ctx.Process(target=_process_load, args=args) for _ in range(3)]
    for p in procs:
        p.start()
    results = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(10)
    assert all(n == len(data) for n, _, _ in results)
    assert sum(fills for _, _, fills in results) == 1
    # one process read the object from S3 (one GET: 6 MiB < part_size), the others none
    assert sorted(gets for _, gets, _ in results) == [0, 0, 1]


def test_values_split_under_max_value_bytes(s3_server, s3_bucket, redis_server, prefix):
    data = os.urandom(5 * MiB + 77)

    async def go():
        s3 = s3_server.backend(s3_bucket, "split")
        await s3.save("units/x", data)
        cache = RedisCacheBackend(s3, redis_server, key_prefix=prefix, max_value_bytes=1 * MiB, ttl_seconds=120)
        assert await cache.load("units/x") == data
        r = redis.Redis.from_url(redis_server)
        parts = sorted(r.scan_iter(match=f"{prefix}d:*"))
        assert len(parts) == 6 and all(r.strlen(p) <= 1 * MiB for p in parts)
        # expiry set on every key the cache wrote
        for key in [*parts, *r.scan_iter(match=f"{prefix}m:*")]:
            assert 0 < r.ttl(key) <= 120
        # reassembled on a hit, and ranges that straddle parts
        before = s3.stats["get_requests"]
        assert await cache.load("units/x") == data
        assert await cache.read_range("units/x", MiB - 10, 2 * MiB + 20) == data[MiB - 10 : 3 * MiB + 10]
        buf = bytearray(len(data))
        assert await cache.read_into("units/x", buf) == len(data) and buf == data
        assert s3.stats["get_requests"] == before
        # an evicted part is a miss, refilled from S3
        r.delete(parts[2])
        assert await cache.load("units/x") == data
        assert s3.stats["get_requests"] > before and cache.stats["fills"] == 2
        await cache.close()

    asyncio.run(go())


def test_expiry(redis_server, prefix):
    async def go():
        inner = MemoryBackend({"k": b"v" * 100})
        cache = RedisCacheBackend(inner, redis_server, key_prefix=prefix, ttl_seconds=1)
        assert await cache.load("k") == b"v" * 100
        assert await cache.load("k") == b"v" * 100
        assert inner.reads == 1

        async def refilled() -> bool:  # once redis expires the key, the next load reads the inner backend
            assert await cache.load("k") == b"v" * 100
            return inner.reads == 2

        await eventually(refilled, timeout=10, what="the cached value to expire")
        assert cache.stats["fills"] == 2
        await cache.close()

    asyncio.run(go())


def test_max_bytes_bounds_the_cache(tmp_path, prefix):
    """max_bytes becomes the server's maxmemory + allkeys-lru: old objects are evicted, reads stay correct.

    Uses a private redis-server: changing maxmemory must not disturb the session's shared one.
    """

    server = services.RedisServer(tmp_path / "redis", maxmemory="0").start()
    try:
        async def go():
            blobs = {f"u{i}": os.urandom(256 * 1024) for i in range(24)}  # 6 MiB in all
            inner = MemoryBackend(blobs)
            cache = RedisCacheBackend(inner, server.url, key_prefix=prefix, max_bytes=4 * MiB)
            for k, v in blobs.items():
                assert await cache.load(k) == v
            r = redis.Redis.from_url(server.url)
            assert r.config_get("maxmemory-policy")["maxmemory-policy"] == "allkeys-lru"
            assert int(r.config_get("maxmemory")["maxmemory"]) == 4 * MiB
            assert int(r.info("memory")["used_memory"]) <= 4 * MiB
            assert int(r.info("stats")["evicted_keys"]) > 0
            for k, v in blobs.items():  # evicted ones are refilled
                assert await cache.load(k) == v
            assert cache.stats["redis_errors"] == 0
            # an object larger than the bound is never cached
            inner.objects["huge"] = b"h" * (5 * MiB)
            assert await cache.load("huge") == b"h" * (5 * MiB)
            assert cache.stats["passthrough"] == 1
            await cache.close()

        asyncio.run(go())
    finally:
        server.stop()


def test_redis_down_degrades_to_inner(prefix):

    async def go():
        inner = MemoryBackend({"k": b"data"})
        cache = RedisCacheBackend(inner, f"redis://127.0.0.1:{free_port()}/0", key_prefix=prefix)
        assert await cache.load("k") == b"data"
        assert await cache.read_range("k", 1, 2) == b"at"
        assert cache.stats["redis_errors"] >= 1
        await cache.close()

    asyncio.run(go())


def test_filler_that_dies_is_taken_over(redis_server, prefix):
    """A lock left by a dead filler expires; a waiter takes over instead of waiting forever."""

    async def go():
        inner = MemoryBackend({"k": b"x" * 10})
        cache = RedisCacheBackend(inner, redis_server, key_prefix=prefix, lock_seconds=0.3, wait_seconds=5)
        r = redis.Redis.from_url(redis_server)
        r.set(cache._lock_key("k"), "dead-filler", px=300)
        t0 = time.monotonic()
        assert await cache.load("k") == b"x" * 10
        assert 0.2 < time.monotonic() - t0 < 3
        assert cache.stats["fills"] == 1 and cache.stats["fallbacks"] == 0
        # and with a lock that outlives the wait, the reader falls back to inner after wait_seconds
        impatient = RedisCacheBackend(inner, redis_server, key_prefix=prefix + "x:", lock_seconds=60, wait_seconds=0.2)
        r.set(impatient._lock_key("k"), "stuck", px=60_000)
        assert await impatient.load("k") == b"x" * 10
        assert impatient.stats["fallbacks"] == 1
        await cache.close()
        await impatient.close()

    asyncio.run(go())
