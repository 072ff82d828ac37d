"""Helpers for streaming-engine tests: a real weight server on loopback, and sources that misbehave."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Iterator

from streaming_weights.client.bridge import LoopThread
from streaming_weights.client import FetchedUnit, StorageSource, UnitSource
from streaming_weights.storage import FilesystemBackend

#: The catalog rescans storage for an unknown name or a listing at most once per ``rescan_interval`` (1 s by
#: default): test servers asked right after start-up use this instead, or each such request waits about a second.
RESCAN = 0.02


@contextlib.contextmanager
def served(chunks_dir, **kw) -> Iterator[str]:
    """Run a WeightServer over ``chunks_dir`` on a free loopback port (own thread); yields its ws:// URI.

    Its catalog rescans storage every 20 ms at most (``rescan_interval``, 1 s by default): a listing or an unknown
    name right after start-up would otherwise wait out the default."""
    from streaming_weights.server import WeightServer

    io = LoopThread("test-server")
    if "limits" not in kw:  # (given limits keep their own interval)
        kw.setdefault("rescan_interval", RESCAN)
    server = WeightServer(str(chunks_dir), host="127.0.0.1", port=0, **kw)
    io.run(server.start(), 30)
    try:
        yield f"{'wss' if kw.get('tls_cert') else 'ws'}://127.0.0.1:{server.port}"
    finally:
        io.run(server.stop(), 30)
        io.close()


class DelayedSource(UnitSource):
    """Wraps a storage source, adding a fixed delay to every unit fetch and counting fetches."""

    def __init__(self, chunks_dir, delay: float = 0.05, fail_units: set[str] | None = None) -> None:
        self.inner = StorageSource(FilesystemBackend(chunks_dir))
        self.delay = delay
        self.fail_units = fail_units or set()
        self.fetched: list[str] = []
        self.location = f"delayed:{chunks_dir}"

    async def list_models(self):
        return await self.inner.list_models()

    async def get_manifest(self, model_name):
        return await self.inner.get_manifest(model_name)

    async def fetch_unit(self, manifest, unit) -> FetchedUnit:
        self.fetched.append(unit)
        await asyncio.sleep(self.delay)
        if unit in self.fail_units:
            raise ConnectionResetError(f"injected failure fetching {unit}")
        return await self.inner.fetch_unit(manifest, unit)

    async def fetch_file(self, manifest, name):
        return await self.inner.fetch_file(manifest, name)
