"""WebSocketSource against real WeightServers on loopback: integrity, zero-copy, concurrency, auth, TLS, retries."""

from __future__ import annotations

import asyncio
import os
import ssl

import pytest

from streaming_weights.config import StreamingConfig
import torch

from streaming_weights import protocol as proto
from streaming_weights.client.buffers import BufferPool
from streaming_weights.client.retry import RetryingSource, RetryPolicy
from streaming_weights.client import StorageSource, open_unit_source
from streaming_weights.client.sockets import WakeThreshold
from streaming_weights.client.transport import WebSocketSource
from streaming_weights.protocol import frames
from streaming_weights.protocol.frames import binary_frame_header
from websockets.asyncio.server import serve
from streaming_weights.exceptions import (
    AuthenticationError,
    BadRequestError,
    BusyError,
    ConnectionFailedError,
    FetchTimeoutError,
    IntegrityError,
    NotFoundError,
    RemoteError,
    UnitUnavailableError,
)
from streaming_weights.netutil import free_port
from streaming_weights.server import WeightServer
from streaming_weights.storage import FilesystemBackend, MemoryBackend

from tests.support.servers import build_model, unit_tensors
from tests.support.streaming import RESCAN


def buffer_span(buf: bytearray) -> tuple[int, int]:
    base = torch.frombuffer(buf, dtype=torch.uint8).data_ptr()
    return base, base + len(buf)


@pytest.fixture
def mem_model():
    storage = MemoryBackend()
    sizes = {"resident": 2000, **{f"model.layers.{i}": 200_000 + 4096 * i for i in range(16)}}
    manifest = build_model(storage, "m", sizes, files={"tokenizer.json": b'{"tok": true}'})
    return storage, manifest


@pytest.fixture
def llama_dir(tiny_chunks):
    return tiny_chunks("llama")[1]  # chunked outside the test's event loop


async def test_fetches_real_chunked_model_identically_to_storage(llama_dir):
    chunk_dir = llama_dir
    local = StorageSource(FilesystemBackend(chunk_dir))
    async with WeightServer(chunk_dir, port=0, rescan_interval=RESCAN) as server:
        source = open_unit_source(server.uri, token=None)
        assert isinstance(source, WebSocketSource)
        async with source:
            assert await source.list_models() == ["llama"]
            manifest = await source.get_manifest(None)
            assert manifest == await local.get_manifest("llama")
            for entry in manifest.units:
                got, want = await source.fetch_unit(manifest, entry.name), await local.fetch_unit(manifest, entry.name)
                assert got.name == entry.name and got.nbytes == entry.bytes and got.fetch_seconds > 0
                assert set(got.tensors) == set(want.tensors)
                for name, t in got.tensors.items():
                    assert torch.equal(t, want.tensors[name]) and t.dtype == want.tensors[name].dtype
            for f in manifest.files:
                assert await source.fetch_file(manifest, f.name) == await local.fetch_file(manifest, f.name)
            assert source.reconnects == 1  # one persistent connection


async def test_decoded_tensors_are_views_into_the_receive_buffer(mem_model):
    storage, manifest = mem_model
    async with WeightServer(storage, port=0, rescan_interval=RESCAN) as server, WebSocketSource(server.uri) as source:
        unit = await source.fetch_unit(manifest, "model.layers.3")
        lo, hi = buffer_span(unit.buffer)
        assert len(unit.buffer) == manifest.unit("model.layers.3").bytes
        for t in unit.tensors.values():
            assert lo <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= hi


async def test_a_received_buffer_can_be_given_back_at_once(mem_model):
    """Nothing of the request outlives it: the pool takes the buffer back in the same step, and the next
    fetch reuses it (a refused buffer made the next fetch fault a fresh one in)."""
    storage, manifest = mem_model
    entry = manifest.unit("model.layers.2")
    pool = BufferPool(1 << 30)
    async with WeightServer(storage, port=0, rescan_interval=RESCAN) as server, WebSocketSource(server.uri, pool=pool) as source:
        buf = source.new_buffer(entry.bytes)
        await source._request(proto.Op.GET_UNIT, "m", entry.name, buffer=buf, expected_size=entry.bytes)
        assert pool.give(buf)
        del buf
        unit = await source.fetch_unit(manifest, entry.name)
        assert pool.reused == 1 and pool.allocated == 1 and unit.nbytes == entry.bytes


async def test_on_one_cpu_units_are_hashed_inline_and_still_verified(mem_model):
    storage, manifest = mem_model
    good, bad = manifest.unit("model.layers.5"), manifest.unit("model.layers.6")
    data = bytearray(storage.objects[bad.path])
    data[len(data) // 2] ^= 1
    storage.objects[bad.path] = bytes(data)
    before = os.sched_getaffinity(0)
    async with WeightServer(storage, port=0, rescan_interval=RESCAN, chunk_bytes=16 << 10) as server, WebSocketSource(server.uri) as source:
        os.sched_setaffinity(0, {min(before)})  # this thread (the event loop's) may use one CPU only
        try:
            unit = await source.fetch_unit(manifest, good.name)
            with pytest.raises(IntegrityError, match="does not match its manifest hash"):
                await source.fetch_unit(manifest, bad.name)
        finally:
            os.sched_setaffinity(0, before)
        assert unit.nbytes == good.bytes and not source._hash_pool._threads  # no worker thread was needed


@pytest.mark.parametrize("one_cpu", [True, False], ids=["inline", "on-the-hash-thread"])
async def test_a_fingerprinted_refetch_is_checked_inline_and_on_the_hash_thread(mem_model, one_cpu):
    """The third fetch of a unit is checked against its fingerprint (client.fingerprint), hashed inline on one CPU
    or on the worker thread otherwise: the right bytes decode as stored, one changed byte in the server's storage
    is refused by the fingerprint alone."""
    storage, manifest = mem_model
    entry = manifest.unit("model.layers.7")
    before = os.sched_getaffinity(0)
    if not one_cpu and len(before) < 2:
        pytest.skip("needs 2 usable CPUs for the hash thread")
    async with WeightServer(storage, port=0, rescan_interval=RESCAN, cache_size_mb=0, chunk_bytes=16 << 10) as server, \
            WebSocketSource(server.uri) as source:
        if one_cpu:
            os.sched_setaffinity(0, {min(before)})
        try:
            units = [await source.fetch_unit(manifest, entry.name) for _ in range(3)]
            book = source.fingerprints
            assert (book.blake3_bytes, book.tag_bytes) == (2 * entry.bytes, entry.bytes)
            data = bytearray(storage.objects[entry.path])
            assert all(bytes(u.buffer) == bytes(data) for u in units)
            data[len(data) // 2] ^= 0x20
            storage.objects[entry.path] = bytes(data)
            with pytest.raises(IntegrityError, match="differs from the bytes verified"):
                await source.fetch_unit(manifest, entry.name)
        finally:
            os.sched_setaffinity(0, before)
        assert book.blake3_bytes == 2 * entry.bytes
        assert bool(source._hash_pool._threads) is not one_cpu


async def test_a_frame_wakes_the_loop_once_its_payload_is_there(mem_model, monkeypatch):
    """While a frame's payload lands in a unit's buffer, the socket's wake-up threshold is the rest of that payload
    (client.sockets.WakeThreshold); between frames it is back to 1. The unit arrives intact."""
    storage, manifest = mem_model
    entry = manifest.unit("model.layers.9")
    seen: list[int] = []
    original = WakeThreshold.expect
    monkeypatch.setattr(WakeThreshold, "expect", lambda self, n: (seen.append(n), original(self, n))[1])
    async with WeightServer(storage, port=0, rescan_interval=RESCAN, chunk_bytes=150_000) as server, \
            WebSocketSource(server.uri) as source:
        unit = await source.fetch_unit(manifest, entry.name)
        assert source._conn.wake.bytes == 1  # the unit is in: back to waking at each arrival
    assert bytes(unit.buffer) == storage.objects[entry.path]
    assert frames.READ_AHEAD < max(seen) < 150_000  # the rest of a frame, after its read-ahead
    assert seen[-1] == 0


async def test_a_timeout_beside_a_frame_arriving_below_the_threshold_keeps_the_connection():
    """Request A's frame trickles in below its wake-up threshold (nothing is read, so nothing "arrived"); request
    B times out meanwhile. The connection is not taken for dead (bytes wait unread in the socket) and A completes
    intact. Treating a quiet connection as dead without asking the socket would have failed A."""
    n, blob = 3 << 20, os.urandom(3 << 20)

    async def handler(ws):
        async for raw in ws:
            msg = proto.decode(raw)
            if msg.op is proto.Op.PING:  # queued behind A's frame: cannot arrive before that ends
                await ws.send(proto.encode(proto.Result(msg.request_id, {"ok": True})))
                continue
            await ws.send(proto.encode(proto.Result(msg.request_id, {"size": n})))
            t, sent = ws.transport, 200_000
            t.write(binary_frame_header(16 + n) + proto.encode_header(proto.Kind.DATA, msg.request_id, 0) + blob[:sent])
            await asyncio.sleep(0.3)
            for _ in range(30):  # 1.5 s of 4 KB pieces, each far below the threshold
                t.write(blob[sent : sent + 4096])
                sent += 4096
                await asyncio.sleep(0.05)
            t.write(blob[sent:])

    async with serve(handler, "127.0.0.1", 0, max_size=None) as server:
        async with WebSocketSource(f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}", timeout_seconds=10) as src:
            buf = bytearray(n)
            a = asyncio.ensure_future(src._request(proto.Op.GET_UNIT, "m", "u", buffer=buf, expected_size=n))
            for _ in range(200):  # until A's frame is under way (its threshold set), at most 2 s
                if src._conn is not None and src._conn.wake.bytes > 1:
                    break
                await asyncio.sleep(0.01)
            conn = src._conn
            assert conn.wake.bytes > 1  # A's frame is under way, its threshold set
            src.timeout_seconds = 0.5
            with pytest.raises(FetchTimeoutError):
                await src._request(proto.Op.PING)
            assert conn.usable
            await a
            assert bytes(buf) == blob


async def test_sixteen_requests_in_flight_on_one_connection(mem_model):
    storage, manifest = mem_model
    async with WeightServer(storage, port=0, rescan_interval=RESCAN, chunk_bytes=16 << 10) as server, WebSocketSource(server.uri) as source:
        await source.ping()
        names = [u.name for u in manifest.streamed]
        assert len(names) == 16
        units = await asyncio.gather(*[source.fetch_unit(manifest, n) for n in names])
        assert [u.name for u in units] == names
        for u in units:
            w = u.tensors[f"{u.name}.weight"]
            order = manifest.unit(u.name).order
            assert w[0].item() == order and w[-1].item() == w.numel() - 1 + order
        assert server.peak_inflight == 16
        assert source.reconnects == 1 and len(server._conns) == 1


async def test_unit_over_100_mb_streams_intact(tmp_path):
    size = 110 << 20
    build_model(FilesystemBackend(tmp_path), "big", {"resident": 1000, "huge": size})
    async with WeightServer(tmp_path, port=0, rescan_interval=RESCAN, cache_size_mb=16) as server:
        async with WebSocketSource(server.uri, timeout_seconds=120) as source:
            manifest = await source.get_manifest(None)
            unit = await source.fetch_unit(manifest, "huge")  # BLAKE3-verified against the manifest
            w = unit.tensors["huge.weight"]
            assert unit.nbytes == manifest.unit("huge").bytes > 100 << 20
            assert torch.equal(w, unit_tensors("huge", size, seed=1)["huge.weight"])
            lo, hi = buffer_span(unit.buffer)
            assert lo <= w.data_ptr() < hi


async def test_corrupted_unit_in_storage_is_detected_and_never_returned(mem_model):
    storage, manifest = mem_model
    entry = manifest.unit("model.layers.2")
    data = bytearray(storage.objects[entry.path])
    data[-5] ^= 0xFF  # same size, one flipped byte
    storage.objects[entry.path] = bytes(data)
    short = manifest.unit("model.layers.4")
    storage.objects[short.path] = storage.objects[short.path][:-100]  # truncated
    async with WeightServer(storage, port=0, rescan_interval=RESCAN) as server:
        async with WebSocketSource(server.uri) as source:
            with pytest.raises(IntegrityError, match="does not match its manifest hash"):
                await source.fetch_unit(manifest, entry.name)
            with pytest.raises(RemoteError, match="shorter than the manifest"):
                await source.fetch_unit(manifest, short.name)
            retrying = RetryingSource(source, RetryPolicy(max_retries=1, base_delay=0.01))
            with pytest.raises(UnitUnavailableError, match="failed verification after 2 attempts"):
                await retrying.fetch_unit(manifest, entry.name)
            ok = await source.fetch_unit(manifest, "model.layers.1")  # the connection survives
            assert ok.nbytes == manifest.unit("model.layers.1").bytes


async def test_remote_errors_are_typed_and_connection_survives(mem_model):
    storage, manifest = mem_model
    async with WeightServer(storage, port=0, rescan_interval=RESCAN) as server, WebSocketSource(server.uri) as source:
        with pytest.raises(BadRequestError):
            await source._request(proto.Op.GET_UNIT, "m", "../../etc/passwd")
        with pytest.raises(NotFoundError):
            await source._request(proto.Op.GET_UNIT, "m", "model.layers.99")
        with pytest.raises(NotFoundError):
            await source.get_manifest("other-model")
        assert (await source.ping())["pong"] is True
        assert source.reconnects == 1


async def test_token_auth(mem_model, monkeypatch):
    storage, manifest = mem_model
    monkeypatch.delenv("SURFING_TOKEN", raising=False)
    async with WeightServer(storage, port=0, rescan_interval=RESCAN, token="tok-123") as server:
        for bad in (None, "wrong"):
            async with RetryingSource(WebSocketSource(server.uri, token=bad), RetryPolicy(max_retries=3)) as source:
                with pytest.raises(AuthenticationError):
                    await source.list_models()
                assert source.retries == 0  # never retried
        async with WebSocketSource(server.uri, token="tok-123") as source:
            assert await source.list_models() == ["m"]
        monkeypatch.setenv("SURFING_TOKEN", "tok-123")  # the options object reads it (the transport does not)
        async with WebSocketSource(server.uri, token=StreamingConfig.resolve(None).token) as source:
            assert await source.list_models() == ["m"]


async def test_tls_with_test_certificate(mem_model, tmp_path):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    storage, manifest = mem_model
    async with WeightServer(storage, port=0, rescan_interval=RESCAN, tls_cert=tmp_path / "server.pem") as server:
        assert server.uri.startswith("wss://")
        client_ctx = ssl.create_default_context()
        ca.configure_trust(client_ctx)
        async with WebSocketSource(server.uri, ssl_context=client_ctx) as source:
            unit = await source.fetch_unit(manifest, "model.layers.0")
            assert unit.nbytes == manifest.unit("model.layers.0").bytes
        async with WebSocketSource(server.uri) as untrusting:  # system CAs only
            with pytest.raises(ConnectionFailedError, match="certificate"):
                await untrusting.ping()
    # the original API names
    legacy = WeightServer(storage, port=0, rescan_interval=RESCAN, use_ssl=True, ssl_cert_path=tmp_path / "server.pem")
    assert legacy.scheme == "wss"


async def test_reconnects_after_server_restart_and_gives_up_when_down(mem_model):
    storage, manifest = mem_model
    port = free_port()
    server = await WeightServer(storage, port=port).start()
    ws = WebSocketSource(f"ws://127.0.0.1:{port}")
    source = RetryingSource(ws, RetryPolicy(max_retries=5, base_delay=0.05, max_delay=0.2))
    try:
        await source.fetch_unit(manifest, "model.layers.0")
        await server.stop()
        server = await WeightServer(storage, port=port).start()
        unit = await source.fetch_unit(manifest, "model.layers.1")
        assert unit.nbytes == manifest.unit("model.layers.1").bytes
        assert ws.reconnects == 2
        await server.stop()
        source.policy = RetryPolicy(max_retries=2, base_delay=0.01)
        with pytest.raises(UnitUnavailableError, match="after 3 attempts") as info:
            await source.fetch_unit(manifest, "model.layers.2")
        assert isinstance(info.value.__cause__, ConnectionFailedError)
    finally:
        await source.close()
        await server.stop()


class SlowBackend(MemoryBackend):
    delay = 0.0

    async def read_range(self, key, start, length):
        await asyncio.sleep(self.delay)
        return await super().read_range(key, start, length)


async def test_per_request_timeout(mem_model):
    storage, manifest = mem_model
    slow = SlowBackend(storage.objects)
    async with WeightServer(slow, port=0, rescan_interval=RESCAN) as server:
        async with WebSocketSource(server.uri, timeout_seconds=0.3) as source:
            await source.ping()
            slow.delay = 5
            with pytest.raises(FetchTimeoutError, match="within 0.3s"):
                await source.fetch_unit(manifest, "model.layers.0")
            slow.delay = 0
            assert (await source.fetch_unit(manifest, "model.layers.1")).nbytes > 0
            assert isinstance(FetchTimeoutError("x"), TimeoutError)


async def test_busy_server_is_retried_then_reported(mem_model):
    storage, manifest = mem_model
    async with WeightServer(storage, port=0, rescan_interval=RESCAN, max_connections=1) as server:
        async with WebSocketSource(server.uri) as first:
            await first.ping()
            policy = RetryPolicy(max_retries=1, base_delay=0.01)
            async with RetryingSource(WebSocketSource(server.uri), policy) as second:
                with pytest.raises(BusyError):
                    await second.list_models()
                assert second.retries == 1
