"""WeightServer over loopback, driven by the websockets library's own client (independent of our transport)."""

from __future__ import annotations

import asyncio
import http.client
import socket
import time

import psutil
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosedError, InvalidStatus
from websockets.frames import Frame, Opcode

from streaming_weights import protocol as proto
from streaming_weights.exceptions import ConfigurationError
from streaming_weights.server import ByteLRU, WeightServer
from streaming_weights.storage import FilesystemBackend, MemoryBackend

from tests.support.servers import build_model, start_server_process
from tests.support.streaming import RESCAN
from tests.support.waiting import eventually


@pytest.fixture
def mem_model():
    storage = MemoryBackend()
    manifest = build_model(storage, "m", {"resident": 1000, "model.layers.0": 300_000, "model.layers.1": 4 << 20},
                           files={"tokenizer.json": b'{"x": 1}'})
    return storage, manifest


async def ws_client(server: WeightServer, **kw):
    return await connect(server.uri, max_size=None, compression=None, **kw)


async def request(ws, rid: int, op: proto.Op, model=None, name=None):
    """Send one request and collect (RESULT or ERROR, blob bytes)."""
    await ws.send(proto.encode(proto.Request(rid, op, model, name)))
    return await collect(ws, rid)


async def collect(ws, rid: int):
    buf = bytearray()
    head = None
    while True:
        msg = proto.decode(await ws.recv())
        assert msg.request_id == rid
        if isinstance(msg, proto.Error):
            return msg, bytes(buf)
        if isinstance(msg, proto.Result):
            head = msg
            if msg.size in (None, 0):
                return head, b""
        if isinstance(msg, proto.Data):
            assert msg.offset == len(buf)
            buf += msg.payload
            if len(buf) == head.size:
                return head, bytes(buf)


def http_get(server: WeightServer, path: str) -> tuple[int, bytes, str]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", path)
    resp = conn.getresponse()
    return resp.status, resp.read(), resp.getheader("Content-Type", "")


def metric(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        key, _, value = line.rpartition(" ")
        if key.split("{")[0] != name:
            continue
        if all(f'{k}="{v}"' in key for k, v in labels.items()):
            total += float(value)
    return total


async def test_serves_list_manifest_units_and_files(mem_model):
    storage, manifest = mem_model
    async with WeightServer(storage, port=0, rescan_interval=RESCAN) as server:
        assert server.port != 0 and server.host == "127.0.0.1"
        async with await ws_client(server) as ws:
            head, _ = await request(ws, 1, proto.Op.PING)
            assert head.body["pong"] is True
            head, _ = await request(ws, 2, proto.Op.LIST_MODELS)
            assert head.body == {"models": ["m"]}
            _, raw = await request(ws, 3, proto.Op.GET_MANIFEST)
            assert raw == manifest.to_bytes()
            for u in manifest.units:
                head, data = await request(ws, 10 + u.order, proto.Op.GET_UNIT, "m", u.name)
                assert head.size == u.bytes and data == storage.objects[u.path]
            _, data = await request(ws, 50, proto.Op.GET_FILE, None, "tokenizer.json")
            assert data == b'{"x": 1}'


async def test_serves_a_directory_of_models(tmp_path):
    fs = FilesystemBackend(tmp_path)
    build_model(fs, "a", {"resident": 100}, prefix="a")
    build_model(fs, "b", {"resident": 200}, prefix="nested/b")
    async with WeightServer(chunks_dir=tmp_path, port=0, rescan_interval=RESCAN) as server:
        async with await ws_client(server) as ws:
            head, _ = await request(ws, 1, proto.Op.LIST_MODELS)
            assert head.body["models"] == ["a", "b"]
            err, _ = await request(ws, 2, proto.Op.GET_MANIFEST)  # ambiguous: two models
            assert isinstance(err, proto.Error) and err.code == "not_found"
            head, data = await request(ws, 3, proto.Op.GET_UNIT, "b", "resident")
            assert len(data) == head.size > 200


@pytest.mark.parametrize("name, code", [
    ("../../etc/passwd", "bad_request"),
    ("..", "bad_request"),
    ("/etc/passwd", "bad_request"),
    ("units/resident.safetensors", "bad_request"),
    ("model.layers.99", "not_found"),
    ("manifest", "not_found"),
    ("", "bad_request"),
])
async def test_unlisted_and_traversal_names_rejected(mem_model, name, code):
    storage, _ = mem_model
    async with WeightServer(storage, port=0, rescan_interval=RESCAN) as server:
        storage.reads = 0  # the manifest was read at start
        async with await ws_client(server) as ws:
            for op in (proto.Op.GET_UNIT, proto.Op.GET_FILE):
                err, data = await request(ws, 1, op, "m", name)
                assert isinstance(err, proto.Error) and err.code == code and data == b""
            assert storage.reads == 0  # nothing unlisted ever reaches storage
            err, _ = await request(ws, 2, proto.Op.GET_MANIFEST, "../nope")  # a model name is never a key
            assert err.code == "not_found"
            head, _ = await request(ws, 3, proto.Op.PING)  # the connection survives
            assert isinstance(head, proto.Result)


async def test_malformed_messages_get_errors_and_connection_survives(mem_model):
    storage, _ = mem_model
    async with WeightServer(storage, port=0, rescan_interval=RESCAN) as server:
        async with await ws_client(server) as ws:
            bad = [
                ("a text frame", 0),
                (b"\x01", 0),
                (proto.encode_header(proto.Kind.REQUEST, 5) + b"{nope", 5),
                (proto.encode_header(proto.Kind.REQUEST, 6) + b'{"op":"format_disk"}', 6),
                (proto.encode(proto.Result(7, {})), 7),
                (bytes([9]) + bytes(15), 0),
            ]
            for raw, rid in bad:
                await ws.send(raw)
                err = proto.decode(await ws.recv())
                assert isinstance(err, proto.Error) and err.code == "bad_request" and err.request_id == rid
            head, _ = await request(ws, 8, proto.Op.PING)
            assert isinstance(head, proto.Result)
        status, body, _ = await asyncio.to_thread(http_get, server, "/metrics")
        assert metric(body.decode(), "surfing_server_protocol_errors_total") == len(bad)


async def test_oversized_frame_closes_connection_and_server_keeps_serving(mem_model):
    storage, _ = mem_model
    async with WeightServer(storage, port=0, rescan_interval=RESCAN, max_request_bytes=4096) as server:
        async with await ws_client(server) as ws:
            await ws.send(proto.encode_header(proto.Kind.REQUEST, 1) + b" " * 10_000)
            with pytest.raises(ConnectionClosedError) as info:
                await ws.recv()
            assert info.value.rcvd.code == 1009  # message too big
        async with await ws_client(server) as ws:  # a new connection is served normally
            head, _ = await request(ws, 1, proto.Op.PING)
            assert isinstance(head, proto.Result)


async def test_duplicate_id_and_busy_limit(mem_model):
    storage, _ = mem_model
    async with WeightServer(storage, port=0, rescan_interval=RESCAN, max_inflight_per_connection=1, cache_size_mb=0, chunk_bytes=64 << 10) as server:
        async with await ws_client(server) as ws:
            await ws.send(proto.encode(proto.Request(1, proto.Op.GET_UNIT, "m", "model.layers.1")))
            await ws.send(proto.encode(proto.Request(2, proto.Op.PING)))
            busy = None
            while busy is None:
                msg = proto.decode(await ws.recv())
                if msg.request_id == 2:
                    busy = msg
            assert isinstance(busy, proto.Error) and busy.code == "busy"
            await ws.send(proto.encode(proto.Request(1, proto.Op.PING)))  # id 1 may still be streaming
            while True:
                msg = proto.decode(await ws.recv())
                if isinstance(msg, proto.Error):
                    break
            assert msg.request_id == 1 and msg.code in ("bad_request", "busy")
    assert server.peak_inflight == 1


async def test_max_connections_refused_with_503(mem_model):
    storage, _ = mem_model
    async with WeightServer(storage, port=0, rescan_interval=RESCAN, max_connections=1) as server:
        async with await ws_client(server):
            with pytest.raises(InvalidStatus) as info:
                await ws_client(server)
            assert info.value.response.status_code == 503

        async def connect_once_slot_freed():  # the server frees the slot when it sees the close
            try:
                return await ws_client(server)
            except InvalidStatus:
                return None

        async with await eventually(connect_once_slot_freed, what="the connection slot to be freed") as ws:
            assert isinstance((await request(ws, 1, proto.Op.PING))[0], proto.Result)


async def test_token_checked_at_handshake(mem_model, monkeypatch):
    storage, _ = mem_model
    monkeypatch.delenv("SURFING_TOKEN", raising=False)
    async with WeightServer(storage, port=0, rescan_interval=RESCAN, token="s3cret") as server:
        with pytest.raises(InvalidStatus) as info:
            await ws_client(server)
        assert info.value.response.status_code == 401
        with pytest.raises(InvalidStatus) as info:
            await ws_client(server, additional_headers={"Authorization": "Bearer wrong"})
        assert info.value.response.status_code == 403
        with pytest.raises(InvalidStatus):
            await ws_client(server, additional_headers={"Authorization": "Basic s3cret"})
        async with await ws_client(server, additional_headers={"Authorization": "Bearer s3cret"}) as ws:
            assert isinstance((await request(ws, 1, proto.Op.PING))[0], proto.Result)
        assert (await asyncio.to_thread(http_get, server, "/healthz"))[0] == 200  # health checks need no token
    monkeypatch.setenv("SURFING_TOKEN", "from-env")
    assert WeightServer(storage, port=0).token == "from-env"
    assert WeightServer(storage, port=0, token="").token is None


async def test_healthz_and_metrics(mem_model):
    storage, manifest = mem_model
    async with WeightServer(storage, port=0, rescan_interval=RESCAN) as server:
        async with await ws_client(server) as ws:
            for rid in (1, 2, 3):
                await request(ws, rid, proto.Op.GET_UNIT, "m", "model.layers.0")
            await request(ws, 4, proto.Op.GET_UNIT, "m", "nope")
            status, body, ctype = await asyncio.to_thread(http_get, server, "/healthz")
            assert status == 200 and b'"models": ["m"]' in body and ctype == "application/json"
            status, body, ctype = await asyncio.to_thread(http_get, server, "/metrics")
        assert status == 200 and ctype.startswith("text/plain")
        text = body.decode()
        unit = manifest.unit("model.layers.0")
        assert metric(text, "surfing_server_requests_total", op="get_unit", status="ok") == 3
        assert metric(text, "surfing_server_requests_total", op="get_unit", status="not_found") == 1
        assert metric(text, "surfing_server_storage_reads_total", blob=unit.path) == 1  # then cache hits
        assert metric(text, "surfing_server_storage_read_bytes_total", blob=unit.path) == unit.bytes
        assert metric(text, "surfing_server_cache_hits_total") == 2
        assert metric(text, "surfing_server_cache_misses_total") == 1
        assert metric(text, "surfing_server_bytes_sent_total") == 3 * unit.bytes
        assert metric(text, "surfing_server_active_connections") == 1
        assert (await asyncio.to_thread(http_get, server, "/nope"))[0] == 404


async def test_concurrent_misses_read_storage_once(mem_model):
    storage, manifest = mem_model
    async with WeightServer(storage, port=0, rescan_interval=RESCAN) as server:
        storage.reads = 0
        async with await ws_client(server) as ws:
            for rid in range(1, 9):
                await ws.send(proto.encode(proto.Request(rid, proto.Op.GET_UNIT, "m", "model.layers.0")))
            sizes = {}
            while len(sizes) < 8 or any(v < manifest.unit("model.layers.0").bytes for v in sizes.values()):
                msg = proto.decode(await ws.recv())
                if isinstance(msg, proto.Data):
                    sizes[msg.request_id] = sizes.get(msg.request_id, 0) + len(msg.payload)
    assert storage.reads == 1


async def test_large_blob_streamed_in_ranges_not_cached(mem_model):
    storage, manifest = mem_model
    big = manifest.unit("model.layers.1")
    async with WeightServer(storage, port=0, rescan_interval=RESCAN, cache_size_mb=1, chunk_bytes=1 << 20) as server:
        async with await ws_client(server) as ws:
            head, data = await request(ws, 1, proto.Op.GET_UNIT, "m", big.name)
            assert data == storage.objects[big.path]
        text = (await asyncio.to_thread(http_get, server, "/metrics"))[1].decode()
        assert metric(text, "surfing_server_storage_reads_total", blob=big.path) == -(-big.bytes // (1 << 20))
        assert server.cache.bytes <= 1 << 20 and big.path not in server.cache


async def test_large_blob_of_a_local_directory_is_sent_from_its_file(tmp_path):
    manifest = build_model(FilesystemBackend(tmp_path), "m", {"resident": 1000, "model.layers.0": 3 << 20})
    big = manifest.unit("model.layers.0")
    stored = tmp_path / big.path
    async with WeightServer(tmp_path, port=0, rescan_interval=RESCAN, cache_size_mb=1, chunk_bytes=256 << 10) as server:
        async with await ws_client(server) as ws:
            head, data = await request(ws, 1, proto.Op.GET_UNIT, "m", big.name)
            assert head.size == big.bytes and data == stored.read_bytes()
            writers = [c.writer for c in server._conns]
            assert writers and writers[0].direct_bytes >= big.bytes  # sendfile / sendmsg, not the transport
            with open(stored, "r+b") as f:
                f.truncate(big.bytes - 100)
            head, data = await request(ws, 2, proto.Op.GET_UNIT, "m", big.name)
            assert isinstance(head, proto.Error) and "shorter than the manifest" in head.message
        assert big.path not in server.cache


def test_config_errors(tmp_path):
    with pytest.raises(ConfigurationError):
        WeightServer()
    with pytest.raises(ConfigurationError):
        WeightServer(tmp_path, storage_backend=MemoryBackend())
    with pytest.raises(ConfigurationError):
        WeightServer(tmp_path, use_ssl=True)
    with pytest.raises(ConfigurationError):
        WeightServer(tmp_path, tls_cert=tmp_path / "missing.pem", tls_key=tmp_path / "missing.key")
    with pytest.raises(ConfigurationError, match="no chunked model"):
        asyncio.run(WeightServer(tmp_path, port=0).start())


async def test_byte_lru():
    lru = ByteLRU(100, max_item_bytes=60)
    loads = []

    async def load(key, n):
        loads.append(key)
        await asyncio.sleep(0.01)  # a slow load, so the concurrent gets overlap it
        return bytes(n)

    got = await asyncio.gather(*[lru.get_or_load("a", lambda: load("a", 50)) for _ in range(5)])
    assert loads == ["a"] and [hit for _, hit in got].count(False) == 1
    await lru.get_or_load("b", lambda: load("b", 40))
    await lru.get_or_load("c", lambda: load("c", 30))  # evicts a (least recently used)
    assert "a" not in lru and "b" in lru and "c" in lru and lru.bytes == 70
    await lru.get_or_load("big", lambda: load("big", 80))  # larger than max_item: not cached
    assert "big" not in lru and lru.bytes == 70

    async def fail():
        raise KeyError("x")

    with pytest.raises(KeyError):
        await lru.get_or_load("x", fail)
    assert "x" not in lru


# ------------------------------------------------------------------------------------ subprocess
def _raw_ws_request(port: int, request: bytes) -> socket.socket:
    """A WebSocket client on a bare socket: handshake, send one request, then read nothing more."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
    s.connect(("127.0.0.1", port))
    s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    s.sendall(Frame(Opcode.BINARY, request).serialize(mask=True, extensions=[]))
    return s


def test_stalled_reader_does_not_grow_server_rss_and_sigterm_is_graceful(tmp_path):
    build_model(FilesystemBackend(tmp_path), "big", {"resident": 1000, "huge": 200 << 20})
    proc, port = start_server_process(tmp_path, "--cache-size", "16")
    try:
        ps = psutil.Process(proc.pid)
        s = _raw_ws_request(port, proto.encode(proto.Request(1, proto.Op.PING)))
        s.recv(4096)  # warm up the server's code paths; the pong means it is idle again
        before = ps.memory_info().rss
        stalled = _raw_ws_request(port, proto.encode(proto.Request(1, proto.Op.GET_UNIT, None, "huge")))
        stalled.recv(1 << 20)  # read a little, then stop reading
        peak = before
        for _ in range(20):  # sample RSS over a 2 s window while the reader stays stalled
            time.sleep(0.1)
            peak = max(peak, ps.memory_info().rss)
        grew = (peak - before) / 2**20
        assert grew < 32, f"server RSS grew by {grew:.1f} MiB while the client stalled"
        assert proc.poll() is None
        proc.terminate()  # SIGTERM: graceful shutdown even with a stalled client
        assert proc.wait(timeout=30) == 0
        stalled.close()
        s.close()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
