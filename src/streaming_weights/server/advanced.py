"""``AdvancedWeightServer``: several weight servers over one storage, behind a shared Redis byte cache.

This is the scale-out building block: the servers are stateless over object storage (an S3 bucket), so
any number of them, in one process (``num_servers``) or many, on one host or many, serve the same models.
With ``redis_url`` every server reads storage through one :class:`RedisCacheBackend`: a unit read from
S3 by any server is stored in Redis, and every other server (in any process pointing at the same Redis)
gets it from there; simultaneous misses read S3 once (single flight). Put the ports behind any TCP load
balancer, or give clients the list of URIs (``websocket_uri=[...]`` fails over).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from ..exceptions import ConfigurationError
from ..storage import StorageBackend, open_storage
from .server import WeightServer


class AdvancedWeightServer:
    """``num_servers`` :class:`WeightServer` s over one storage backend, optionally behind Redis.

    Args:
        chunks_dir: a chunk directory, or ``s3://bucket/prefix`` (credentials and endpoint from the standard
            AWS variables); or pass ``storage_backend``.
        storage_backend: a ready backend (e.g. :class:`~streaming_weights.storage.s3.S3Backend`).
        redis_url: ``redis://host:port/db`` of the shared cache; ``None`` serves storage directly.
        host: interface every server binds.
        port: the first server's port; server ``i`` listens on ``port + i``. ``0`` gives each a free port.
        cache_size_mb: each server's own byte-LRU budget (in front of Redis).
        num_servers: how many servers this process runs (all share the storage chain and its counters).
        token: bearer token (see :class:`WeightServer`).
        prefix: key prefix of the model(s) inside the storage.
        redis_ttl_seconds, redis_max_bytes, redis_key_prefix: the Redis cache's expiry, byte bound
            (``maxmemory``; ``None`` leaves the server's setting) and key namespace.
        **server_kwargs: any other :class:`WeightServer` option (TLS, limits, …).

    Attributes:
        servers: the :class:`WeightServer` instances.
        storage: the backend every server reads (the :class:`RedisCacheBackend` when ``redis_url`` is set).

    Raises:
        ConfigurationError: no storage or both given, ``num_servers < 1``, Redis client not installed.
    """

    def __init__(
        self,
        chunks_dir: str | os.PathLike[str] | None = None,
        *,
        storage_backend: StorageBackend | None = None,
        redis_url: str | None = "redis://localhost:6379/0",
        host: str = "127.0.0.1",
        port: int = 8765,
        cache_size_mb: float = 100,
        num_servers: int = 1,
        token: str | None = None,
        prefix: str = "",
        redis_ttl_seconds: int = 3600,
        redis_max_bytes: int | None = None,
        redis_key_prefix: str = "surfing:",
        **server_kwargs: Any,
    ) -> None:
        if (chunks_dir is None) == (storage_backend is None):
            raise ConfigurationError("AdvancedWeightServer needs exactly one of chunks_dir or storage_backend")
        if num_servers < 1:
            raise ConfigurationError(f"num_servers must be >= 1, got {num_servers}")
        if port < 0:
            raise ConfigurationError(f"port must be >= 0, got {port}")
        if storage_backend is not None:
            base, extra = storage_backend, ""
        else:
            base, extra = open_storage(os.fspath(chunks_dir))  # type: ignore[arg-type]
        storage: StorageBackend = base
        if redis_url:
            from ..storage.redis_cache import RedisCacheBackend

            storage = RedisCacheBackend(base, redis_url, ttl_seconds=redis_ttl_seconds, max_bytes=redis_max_bytes,
                                        key_prefix=redis_key_prefix)
        self.storage = storage
        self.redis_url = redis_url
        self.host = host
        prefix = "/".join(p for p in (extra, prefix.strip("/")) if p)
        self.servers = [
            WeightServer(storage, prefix=prefix, host=host, port=port + i if port else 0,
                         cache_size_mb=cache_size_mb, token=token, **server_kwargs)
            for i in range(num_servers)
        ]

    # --------------------------------------------------------------------------------- addresses
    @property
    def ports(self) -> list[int]:
        """Each server's port (the bound ones once started)."""
        return [s.port for s in self.servers]

    @property
    def uris(self) -> list[str]:
        """Each server's ``ws(s)://host:port``: pass the list as a client's ``websocket_uri``."""
        return [s.uri for s in self.servers]

    @property
    def models(self) -> list[str]:
        return sorted(self.servers[0].models)

    # --------------------------------------------------------------------------------- lifecycle
    async def start(self) -> AdvancedWeightServer:
        """Start every server; returns once all listen. On a failure, the ones started are stopped."""
        try:
            for server in self.servers:  # one after the other: the first one fills Redis with the manifests
                await server.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def stop(self) -> None:
        """Stop every server (connections closed with 1001). The storage stays open: ``start()`` again works."""
        await asyncio.gather(*(s.stop() for s in self.servers), return_exceptions=True)

    async def close(self) -> None:
        """Stop the servers and close the storage chain (Redis and S3 connections)."""
        await self.stop()
        await self.storage.close()

    async def start_servers(self) -> None:
        """Serve until cancelled (the original API), then stop and close everything."""
        await self.start()
        try:
            await asyncio.Future()
        finally:
            await self.close()

    async def __aenter__(self) -> AdvancedWeightServer:
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"AdvancedWeightServer({self.uris}, storage={self.storage!r})"


__all__ = ["AdvancedWeightServer"]
