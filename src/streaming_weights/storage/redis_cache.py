"""A shared Redis cache of object bytes in front of another backend (usually :class:`S3Backend`).

Several weight servers over one bucket share one Redis, so a unit is read from S3 once, not once per server.

Layout (all keys start with ``key_prefix`` and carry a TTL of ``ttl_seconds``)::

    {p}m:{location}|{key}          meta: b"<size> <nparts> <version>"
    {p}d:{location}|{key}|{v}|{i}  part i of version v (at most max_value_bytes each; Redis caps a value at 512 MB)
    {p}l:{location}|{key}          fill lock (SET NX PX lock_seconds), held by the one process reading ``inner``
    {p}g:{location}|{key}          generation, bumped by save/delete so a racing fill cannot store stale bytes

Parts are written before the meta record that names their version, so a reader that finds the meta finds
complete parts, unless Redis evicted one since: then it is a miss and the object is filled again.

Bounds: every key expires after ``ttl_seconds``. The byte bound is Redis's own ``maxmemory`` with an
evicting policy (``allkeys-lru``): the cache is shared, so its bound is the Redis server's. Passing
``max_bytes`` sets both on the server (``CONFIG SET``; if the server forbids CONFIG, configure it
yourself) and never caches a single object larger than ``max_bytes``. A Redis that is down or erroring
degrades to reading ``inner`` directly (counted in ``stats["redis_errors"]``), never to a failed read.

Single flight: on a miss the first process to take the fill lock reads ``inner`` and stores the bytes; the
others poll the cache (bounded by ``wait_seconds``), take over the lock if the filler died, and past the
wait read ``inner`` themselves. A fill, once started, finishes and is stored even if the read that
started it is cancelled (a server shutting down must not waste a read others are waiting for). Reads
of a whole object (``load``, ``read_into``) go through the cache; ``read_range`` is served from the
cache when the object is there; a range miss from byte 0 (a server's first chunk of a blob too big for
its own cache) fills, other range misses read ``inner`` directly. ``exists``/``list`` ask ``inner``; ``save``/``delete`` write ``inner`` and invalidate.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

from ..exceptions import ConfigurationError
from .base import OnPiece, StorageBackend, normalize_key, whole_piece

log = logging.getLogger(__name__)

MiB = 1 << 20
REDIS_VALUE_CAP = 512 * MiB

# Store the meta record only if no save/delete bumped the generation since the fill started.
_SET_IF_GEN = """
local g = redis.call('GET', KEYS[2]) or '0'
if g == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
  return 1
end
return 0
"""
# Release the fill lock only if we still hold it.
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisCacheBackend(StorageBackend):
    """Serve reads of ``inner`` from a Redis cache shared by many processes.

    Args:
        inner: the backend holding the objects (e.g. an :class:`S3Backend`).
        redis_url: ``redis://[:password@]host:port/db`` or ``rediss://`` (TLS).
        ttl_seconds: expiry of every cached object.
        max_value_bytes: objects are split into Redis values of at most this size (<= 512 MiB).
        max_bytes: the cache's byte bound: applied as Redis ``maxmemory`` + ``allkeys-lru``; larger objects
            are not cached. ``None`` leaves the server's configuration alone.
        key_prefix: namespace of every Redis key this cache writes.
        lock_seconds: expiry of a fill lock (a filler that dies releases it after this long).
        wait_seconds: how long a miss waits for another process's fill before reading ``inner`` itself.

    Attributes:
        stats: ``hits``, ``misses``, ``fills`` (objects read from ``inner`` and stored), ``waits`` (misses
            answered by another process's fill), ``fallbacks`` (waited too long), ``passthrough`` (reads
            not cached: range misses, oversized objects), ``redis_errors``.
    """

    def __init__(
        self,
        inner: StorageBackend,
        redis_url: str = "redis://localhost:6379/0",
        *,
        ttl_seconds: int = 3600,
        max_value_bytes: int = 256 * MiB,
        max_bytes: int | None = None,
        key_prefix: str = "surfing:",
        lock_seconds: float = 60.0,
        wait_seconds: float = 30.0,
    ) -> None:
        try:
            import redis.asyncio  # noqa: F401
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ConfigurationError("RedisCacheBackend needs redis: pip install 'surfing-weights[redis]'") from exc
        if not 1 <= max_value_bytes <= REDIS_VALUE_CAP:
            raise ConfigurationError(f"max_value_bytes must be in 1..{REDIS_VALUE_CAP} (Redis's value cap), got {max_value_bytes}")
        if ttl_seconds < 1:
            raise ConfigurationError(f"ttl_seconds must be >= 1, got {ttl_seconds}")
        if max_bytes is not None and max_bytes < 1:
            raise ConfigurationError(f"max_bytes must be positive, got {max_bytes}")
        self.inner = inner
        self.redis_url = redis_url
        self.ttl_seconds = int(ttl_seconds)
        self.max_value_bytes = int(max_value_bytes)
        self.max_bytes = max_bytes
        self.key_prefix = key_prefix
        self.lock_seconds = lock_seconds
        self.wait_seconds = wait_seconds
        self.location = f"redis-cache({inner.location})"
        self.stats: dict[str, int] = dict.fromkeys(
            ("hits", "misses", "fills", "waits", "fallbacks", "passthrough", "redis_errors"), 0)
        self._client: Any = None
        self._client_loop: asyncio.AbstractEventLoop | None = None
        self._configured = False
        self._fills: set[asyncio.Task] = set()

    # ------------------------------------------------------------------------------------------ keys
    def _base(self, key: str) -> str:
        return f"{self.inner.location}|{normalize_key(key)}"

    def _meta_key(self, key: str) -> str:
        return f"{self.key_prefix}m:{self._base(key)}"

    def _part_key(self, key: str, version: str, i: int) -> str:
        return f"{self.key_prefix}d:{self._base(key)}|{version}|{i}"

    def _lock_key(self, key: str) -> str:
        return f"{self.key_prefix}l:{self._base(key)}"

    def _gen_key(self, key: str) -> str:
        return f"{self.key_prefix}g:{self._base(key)}"

    # ---------------------------------------------------------------------------------------- client
    async def _redis(self):
        import redis.asyncio as aioredis

        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:
            # redis.asyncio connections belong to the loop that opened them: one client per loop.
            self._client = aioredis.Redis.from_url(self.redis_url, socket_timeout=30, socket_connect_timeout=5)
            self._client_loop = loop
        if not self._configured:
            self._configured = True
            await self._configure(self._client)
        return self._client

    async def _configure(self, client) -> None:
        import redis

        try:
            if self.max_bytes is not None:
                await client.config_set("maxmemory", str(self.max_bytes))
                await client.config_set("maxmemory-policy", "allkeys-lru")
            else:
                cfg = await client.config_get("maxmemory")
                value = next(iter(cfg.values()), b"0") if cfg else b"0"
                if int(value) == 0:
                    log.warning("Redis at %s has no maxmemory: the cache is bounded only by its %d s TTL; set "
                                "maxmemory + maxmemory-policy allkeys-lru (or pass max_bytes=)",
                                self.redis_url, self.ttl_seconds)
        except redis.RedisError as exc:
            log.warning("could not read/set Redis maxmemory on %s (%s); configure the server's bound yourself",
                        self.redis_url, exc)

    def _redis_failed(self, exc: BaseException, what: str) -> None:
        self.stats["redis_errors"] += 1
        log.warning("Redis cache %s failed (%s): reading %s directly", what, exc, self.inner.location)

    # ------------------------------------------------------------------------------------ cache reads
    async def _meta(self, r, key: str) -> tuple[int, int, str] | None:
        raw = await r.get(self._meta_key(key))
        if raw is None:
            return None
        size, nparts, version = raw.decode().split(" ")
        return int(size), int(nparts), version

    async def _cached(self, r, key: str) -> bytes | bytearray | None:
        """The whole cached object, or None (absent, or a part was evicted)."""
        meta = await self._meta(r, key)
        if meta is None:
            return None
        size, nparts, version = meta
        if nparts == 1:
            data = await r.get(self._part_key(key, version, 0))
            return data if data is not None and len(data) == size else None
        out = bytearray(size)
        pos = 0
        for i in range(nparts):  # one part at a time: never two copies of a huge object in flight
            part = await r.get(self._part_key(key, version, i))
            if part is None or pos + len(part) > size:
                return None
            out[pos : pos + len(part)] = part
            pos += len(part)
        return out if pos == size else None

    async def _cached_range(self, r, key: str, start: int, length: int) -> bytes | None:
        meta = await self._meta(r, key)
        if meta is None:
            return None
        size, nparts, version = meta
        end = min(size, start + length)
        if start >= end:
            return b""
        chunks = []
        step = self.max_value_bytes if nparts > 1 else max(size, 1)
        for i in range(start // step, (end - 1) // step + 1):
            lo = max(start, i * step) - i * step
            hi = min(end, (i + 1) * step) - i * step
            part = await r.getrange(self._part_key(key, version, i), lo, hi - 1)
            if len(part) != hi - lo:
                return None
            chunks.append(part)
        return b"".join(chunks)

    async def _store(self, r, key: str, data: bytes | bytearray | memoryview, gen: bytes | None) -> bool:
        view = memoryview(data).cast("B")
        version = os.urandom(6).hex()
        step = self.max_value_bytes
        nparts = max(1, -(-len(view) // step))
        for i in range(nparts):  # one SET per part: a pipeline would buffer every part at once
            await r.set(self._part_key(key, version, i), bytes(view[i * step : (i + 1) * step]), ex=self.ttl_seconds)
        stored = await r.eval(_SET_IF_GEN, 2, self._meta_key(key), self._gen_key(key),
                              (gen or b"0").decode(), f"{len(view)} {nparts} {version}", self.ttl_seconds)
        if not stored:  # a save/delete raced with this fill: drop the stale parts
            await r.delete(*(self._part_key(key, version, i) for i in range(nparts)))
        return bool(stored)

    async def _fill(self, key: str) -> bytes | bytearray:
        """The whole object: from the cache, else read ``inner`` once across all processes."""
        import redis

        try:
            r = await self._redis()
            data = await self._cached(r, key)
        except redis.RedisError as exc:
            self._redis_failed(exc, "read")
            return await self.inner.load(key)
        if data is not None:
            self.stats["hits"] += 1
            return data
        self.stats["misses"] += 1
        token = os.urandom(8).hex()
        deadline = time.monotonic() + self.wait_seconds
        delay = 0.005
        waited = False
        try:
            while True:
                if await r.set(self._lock_key(key), token, nx=True, px=max(1, int(self.lock_seconds * 1000))):
                    break  # we are the filler
                waited = True
                if time.monotonic() >= deadline:
                    self.stats["fallbacks"] += 1
                    log.warning("waited %.1f s for another process to cache %s; reading it directly",
                                self.wait_seconds, key)
                    return await self.inner.load(key)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.1)
                data = await self._cached(r, key)
                if data is not None:
                    self.stats["waits" if waited else "hits"] += 1
                    return data
        except redis.RedisError as exc:
            self._redis_failed(exc, "lock")
            return await self.inner.load(key)

        # Shielded: the fill runs to completion (and releases the lock) even if this read is cancelled.
        task = asyncio.ensure_future(self._fill_locked(r, key, token, waited))
        self._fills.add(task)
        task.add_done_callback(self._fill_done)
        return await asyncio.shield(task)

    def _fill_done(self, task: asyncio.Task) -> None:
        self._fills.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a reader that was cancelled cannot re-raise it



    async def _fill_locked(self, r, key: str, token: str, waited: bool) -> bytes | bytearray:
        """Holding the fill lock of ``key``: read ``inner``, store the bytes, release the lock."""
        import redis

        data = None
        try:
            # Someone may have finished filling between our miss and taking the lock.
            data = await self._cached(r, key)
            if data is not None:
                self.stats["waits" if waited else "hits"] += 1
                return data
            gen = await r.get(self._gen_key(key))
            data = await self.inner.load(key)
            if self.max_bytes is not None and len(data) > self.max_bytes:
                self.stats["passthrough"] += 1
                return data
            await self._store(r, key, data, gen)
            self.stats["fills"] += 1
            return data
        except redis.RedisError as exc:
            self._redis_failed(exc, "fill")
            return data if data is not None else await self.inner.load(key)
        finally:
            try:
                await r.eval(_UNLOCK, 1, self._lock_key(key), token)
            except redis.RedisError as exc:  # the lock expires by itself
                log.debug("could not release fill lock of %s: %s", key, exc)

    # ------------------------------------------------------------------------------ StorageBackend API
    async def load(self, key: str) -> bytes:
        data = await self._fill(key)
        return data if isinstance(data, bytes) else bytes(data)

    async def read_into(self, key: str, buf: bytearray | memoryview, *, offset: int = 0,
                        on_piece: OnPiece | None = None) -> int:
        data = await self._fill(key)
        chunk = memoryview(data)[offset : offset + len(buf)]
        memoryview(buf).cast("B")[: len(chunk)] = chunk
        await whole_piece(on_piece, buf, len(chunk))
        return len(chunk)

    async def read_range(self, key: str, start: int, length: int) -> bytes:
        import redis

        try:
            data = await self._cached_range(await self._redis(), key, start, length)
        except redis.RedisError as exc:
            self._redis_failed(exc, "range read")
            data = None
        if data is not None:
            self.stats["hits"] += 1
            return data
        if start == 0 and length > 0:
            # The first range of an object: fill, so the following ranges (and other servers) hit.
            whole = await self._fill(key)
            return bytes(memoryview(whole)[:length])
        self.stats["passthrough"] += 1
        return await self.inner.read_range(key, start, length)

    async def size(self, key: str) -> int:
        import redis

        try:
            meta = await self._meta(await self._redis(), key)
        except redis.RedisError:
            meta = None
        return meta[0] if meta is not None else await self.inner.size(key)

    async def exists(self, key: str) -> bool:
        return await self.inner.exists(key)

    async def list(self, prefix: str = "") -> list[str]:
        return await self.inner.list(prefix)

    async def invalidate(self, key: str) -> None:
        """Drop ``key`` from the cache (and make any fill in progress discard what it read)."""
        import redis

        try:
            r = await self._redis()
            await r.incr(self._gen_key(key))
            await r.expire(self._gen_key(key), 2 * self.ttl_seconds)
            await r.delete(self._meta_key(key))  # its parts expire with their TTL
        except redis.RedisError as exc:
            self._redis_failed(exc, "invalidate")

    async def save(self, key: str, data: bytes | bytearray | memoryview) -> None:
        await self.inner.save(key, data)
        await self.invalidate(key)

    async def delete(self, key: str) -> None:
        await self.inner.delete(key)
        await self.invalidate(key)

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        fills = [t for t in self._fills if t.get_loop() is loop]
        if fills:  # let fills started by cancelled reads finish with the client they use
            await asyncio.gather(*fills, return_exceptions=True)
        client, self._client, self._client_loop = self._client, None, None
        if client is not None:
            try:
                await client.aclose()
            except Exception:  # a client of another (closed) loop
                pass
        await self.inner.close()

    def __repr__(self) -> str:
        return f"RedisCacheBackend({self.inner!r}, {self.redis_url!r})"
