"""The server's catalog follows its storage (issue 23, item 5): models added, re-chunked, removed or broken
while it runs. End-to-end runs with real models and a ``surfing serve`` process are in
tests/integration/test_rechunk.py; these drive one in-process server over the wire protocol."""

from __future__ import annotations

import asyncio

import pytest

from streaming_weights.client.transport import WebSocketSource
from streaming_weights.exceptions import NotFoundError, StorageError
from streaming_weights.server import WeightServer
from streaming_weights.storage import MemoryBackend
from tests.support.servers import build_model


class CountingStorage(MemoryBackend):
    """A memory storage that counts listings, and whose reads fail (StorageError) while ``failing``."""

    def __init__(self) -> None:
        super().__init__()
        self.listings = 0
        self.failing = False

    async def list(self, prefix: str = "") -> list[str]:
        self.listings += 1
        return await super().list(prefix)

    async def load(self, key: str) -> bytes:
        if self.failing:
            raise StorageError(f"injected: cannot read {key}")
        return await super().load(key)


async def test_models_added_changed_broken_and_removed_while_serving():
    storage = CountingStorage()
    build_model(storage, "a", {"resident": 500, "model.layers.0": 2000}, prefix="a")
    async with WeightServer(storage, port=0, rescan_interval=0) as server, WebSocketSource(server.uri) as client:
        first = await client.get_manifest("a")
        unit = await client.fetch_unit(first, "model.layers.0")  # now in the server's byte cache
        assert await client.list_models() == ["a"]

        build_model(storage, "b", {"resident": 700}, prefix="b")  # chunked after start-up
        assert (await client.get_manifest("b")).name == "b"
        assert await client.list_models() == ["a", "b"]

        build_model(storage, "a", {"resident": 500, "model.layers.0": 3000}, prefix="a")  # re-chunked
        now = await client.get_manifest("a")
        assert now.unit("model.layers.0").blake3 != first.unit("model.layers.0").blake3
        got = await client.fetch_unit(now, "model.layers.0")  # the new bytes, not the cached old ones
        assert got.nbytes == now.unit("model.layers.0").bytes != unit.nbytes

        await storage.save("b/manifest.json", b'{"format_version": 1, "name": ')  # broken: b is withdrawn
        await storage.save("c/manifest.json", b"[" * 10_000)  # hostile: never served, never crashes the server
        with pytest.raises(NotFoundError, match=r"does not host model 'b'; it hosts \['a'\]"):
            await client.get_manifest("b")
        assert await client.list_models() == ["a"] and "a" in server.models

        storage.failing = True  # a storage that cannot answer for a moment does not withdraw a model
        assert (await client.get_manifest("a")).unit("model.layers.0").blake3 == now.unit("model.layers.0").blake3
        assert await client.list_models() == ["a"]
        storage.failing = False

        await storage.delete("a/manifest.json")  # removed
        with pytest.raises(NotFoundError, match="does not host model 'a'"):
            await client.get_manifest("a")
        assert await client.ping()  # the connection and the server are fine


async def test_requests_for_unknown_names_share_rescans():
    storage = CountingStorage()
    build_model(storage, "a", {"resident": 500}, prefix="a")
    async with WeightServer(storage, port=0, rescan_interval=3600) as server, WebSocketSource(server.uri) as client:
        build_model(storage, "b", {"resident": 500}, prefix="b")
        listed = storage.listings  # (the builder lists too)
        # within the interval since start-up a request waits for the next listing: as if an hour had passed
        server.catalog._scanned_at -= 3600
        found = await asyncio.gather(*(client.get_manifest("b") for _ in range(20)), return_exceptions=True)
        assert all(not isinstance(m, BaseException) and m.name == "b" for m in found), found
        assert storage.listings == listed + 1  # 20 requests, one rescan: those that waited for it need no other
