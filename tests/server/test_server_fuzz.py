"""Hostile input to a live weight-server *process*: hypothesis-generated malformed, truncated, oversized and
out-of-order messages, unknown models/units, path traversal, bad tokens, connection and in-flight floods.

Every reply must be a well-formed protocol message (an ERROR with a known code and a message, or a
correct answer) or a close; afterwards the same connection (or, after a close, a new one) must still
answer a PING. Meanwhile a well-behaved ``WebSocketSource`` keeps fetching and verifying units on its own
thread, and the server's RSS must stay bounded.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import threading

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from streaming_weights import protocol as proto
from streaming_weights.client.bridge import LoopThread
from streaming_weights.client.retry import RetryingSource, RetryPolicy
from streaming_weights.client.transport import WebSocketSource
from streaming_weights.storage import FilesystemBackend

from tests.support.servers import build_model, start_server_process

pytestmark = pytest.mark.timeout(180)

TOKEN = "fuzz-token-0123456789"
MAX_CONN, MAX_INFLIGHT, CACHE_MB = 6, 4, 16
UNITS = {"resident": 1000, "model.layers.0": 300_000, "model.layers.1": 2 << 20}
PING_ID = proto.MAX_REQUEST_ID  # reserved for the liveness probe: generated messages never use it
KNOWN_CODES = {c.value for c in proto.ErrorCode}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    manifest = build_model(FilesystemBackend(root), "m", UNITS, files={"tokenizer.json": b'{"x": 1}'})
    # Its log (a line per connection, rejected token and failed request) goes nowhere: an unread pipe would
    # fill up under the fuzzers' thousands of connections and block the server.
    proc, port = start_server_process(root, "--token", TOKEN, "--cache-size", str(CACHE_MB),
                                      "--max-connections", str(MAX_CONN), "--max-inflight", str(MAX_INFLIGHT),
                                      stdout=subprocess.DEVNULL)
    good = GoodClient(f"ws://127.0.0.1:{port}", manifest)
    try:
        yield proc, port, manifest, good
    finally:
        good.stop()
        proc.kill()
        proc.wait()


class GoodClient:
    """A well-behaved client fetching every unit in a loop on its own thread; records any error."""

    def __init__(self, uri: str, manifest) -> None:
        self.uri, self.manifest = uri, manifest
        self.fetches = 0
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._io = LoopThread("good-client")
        self._fut = self._io.submit(self._run())

    async def _run(self) -> None:
        async with RetryingSource(WebSocketSource(self.uri, token=TOKEN, timeout_seconds=30), RetryPolicy(max_retries=3)) as src:
            while not self._stop.is_set():
                for u in self.manifest.units:
                    try:
                        unit = await src.fetch_unit(self.manifest, u.name)
                        assert unit.nbytes == u.bytes  # verified against the manifest's hash inside
                        self.fetches += 1
                    except BaseException as exc:  # noqa: BLE001 - recorded, asserted on by the tests
                        self.errors.append(exc)
                await asyncio.sleep(0.02)  # pacing: a steady client, not a flood

    def stop(self) -> None:
        self._stop.set()
        try:
            self._fut.result(30)
        finally:
            self._io.close()


# ------------------------------------------------------------------------------- message strategies
NAMES = st.sampled_from([
    "resident", "model.layers.0", "model.layers.1", "model.layers.2", "nope", "", ".", "..", "../manifest.json",
    "../../etc/passwd", "/etc/passwd", "units/../manifest.json", "model.layers.0/../../x", "a\x00b", "C:\\win",
    "tokenizer.json", "manifest.json", "é" * 40, "x" * 5000, "%2e%2e/%2e%2e",
]) | st.text(max_size=40)
MODELS = st.sampled_from([None, "m", "other", "../m", "", "m\x00"]) | st.text(max_size=20)
IDS = st.integers(0, PING_ID - 1)


@st.composite
def well_formed_request(draw) -> bytes:
    op = draw(st.sampled_from(list(proto.Op)))
    body: dict = {"op": op.value}
    if draw(st.booleans()):
        body["model"] = draw(MODELS)
    if op in (proto.Op.GET_UNIT, proto.Op.GET_FILE) or draw(st.booleans()):
        body["name"] = draw(NAMES)
    return proto.encode_header(proto.Kind.REQUEST, draw(IDS)) + json.dumps(body).encode()


@st.composite
def odd_json_request(draw) -> bytes:
    body = draw(st.dictionaries(st.sampled_from(["op", "model", "name", "extra", "size"]),
                                st.none() | st.integers() | st.text(max_size=10) | st.lists(st.integers(), max_size=3),
                                max_size=4))
    return proto.encode_header(proto.Kind.REQUEST, draw(IDS)) + json.dumps(body).encode()


@st.composite
def random_header(draw) -> bytes:
    head = proto.HEADER.pack(draw(st.integers(0, 255)), draw(st.integers(0, 255)), draw(st.integers(0, 0xFFFF)),
                             draw(st.integers(0, PING_ID - 1)), draw(st.integers(0, 2**64 - 1)))
    return head + draw(st.binary(max_size=64))


@st.composite
def wrong_direction(draw) -> bytes:  # messages only a server may send, and cancels of unknown ids
    rid = draw(IDS)
    return draw(st.sampled_from([
        proto.encode(proto.Result(rid, {"size": 10})),
        proto.encode_data(rid, draw(st.integers(0, 2**40)), b"x" * 8),
        proto.encode(proto.Error(rid, "busy", "nope")),
        proto.encode(proto.Cancel(rid)),
    ]))


@st.composite
def truncated(draw) -> bytes:
    full = draw(well_formed_request())
    return full[: draw(st.integers(0, len(full) - 1))]


MESSAGE = st.one_of(
    well_formed_request(), odd_json_request(), random_header(), wrong_direction(), truncated(),
    st.binary(max_size=100),
    st.text(max_size=50),  # text frames are not part of the protocol
    st.just(b"\x01" * (70 * 1024)),  # over the server's 64 KiB inbound limit: the connection is closed
)


async def exchange(port: int, messages: list, errors_for: frozenset[int] = frozenset()) -> tuple[list[proto.Message], bool]:
    """Send ``messages``, then a PING; collect replies until its PONG (or a close), and an ERROR for each
    request id in ``errors_for`` (a reply that waits on the storage, e.g. an unknown model's, may come later)."""
    replies: list[proto.Message] = []
    pong = False
    async with connect(f"ws://127.0.0.1:{port}", max_size=None, compression=None, open_timeout=20,
                       additional_headers={"Authorization": f"Bearer {TOKEN}"}) as ws:
        try:
            for m in messages:
                await ws.send(m)
            await ws.send(proto.encode(proto.Request(PING_ID, proto.Op.PING)))
            async with asyncio.timeout(20):
                while True:
                    raw = await ws.recv()
                    assert isinstance(raw, bytes), "the server sent a text message"
                    msg = proto.decode(raw)  # anything the server sends is well-formed
                    replies.append(msg)
                    pong = pong or (isinstance(msg, proto.Result) and msg.request_id == PING_ID and msg.body.get("pong"))
                    if pong and errors_for <= {r.request_id for r in replies if isinstance(r, proto.Error)}:
                        return replies, False
                    if isinstance(msg, proto.Error) and msg.request_id == PING_ID:
                        assert msg.code == "busy", msg  # the probe hit the in-flight limit: ask again
                        await asyncio.sleep(0.05)  # re-ask interval of a bounded poll (asyncio.timeout above)
                        await ws.send(proto.encode(proto.Request(PING_ID, proto.Op.PING)))
        except ConnectionClosed as exc:
            # Only an oversized message may make the server close (1009 "message too big").
            assert exc.rcvd is not None and exc.rcvd.code == 1009, exc
            return replies, True


def check_replies(replies: list[proto.Message]) -> None:
    for msg in replies:
        assert isinstance(msg, (proto.Result, proto.Data, proto.Error)), msg
        if isinstance(msg, proto.Error):
            assert msg.code in KNOWN_CODES and msg.code != "internal", msg
            assert len(msg.message) > 10, msg


def rss_mb(proc) -> float:
    return psutil.Process(proc.pid).memory_info().rss / 2**20


# ----------------------------------------------------------------------------------------------- tests
def test_fuzzed_messages_get_clear_errors_and_server_keeps_serving(live):
    proc, port, manifest, good = live
    for _ in range(3):  # warm the server's code paths and cache before taking the RSS baseline
        asyncio.run(exchange(port, [proto.encode(proto.Request(1, proto.Op.GET_UNIT, "m", u)) for u in UNITS]))
    base = rss_mb(proc)
    sent = {"messages": 0, "closes": 0}

    @settings(max_examples=250, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.lists(MESSAGE, min_size=1, max_size=16))
    def fuzz(messages):
        replies, closed = asyncio.run(exchange(port, messages))
        check_replies(replies)
        sent["messages"] += len(messages)
        sent["closes"] += closed
        if closed:  # a new connection is served normally
            replies, closed = asyncio.run(exchange(port, []))
            assert not closed

    fuzz()
    assert sent["messages"] >= 1000, sent
    assert proc.poll() is None, "the server process died"
    grown = rss_mb(proc) - base
    # Bound: per connection the server holds at most max_queue (<= 32) inbound messages of <= 64 KiB
    # (2 MiB) plus ~one 1 MiB chunk per in-flight request and write_limit; the blob cache is <= CACHE_MB
    # and was already filled by the warm-up. 48 MiB covers all of that with room for allocator noise.
    assert grown < 48, f"server RSS grew {grown:.1f} MiB during fuzzing"
    assert not good.errors, good.errors[:3]
    assert good.fetches > 0


def test_unknown_models_units_and_traversal_are_not_found_or_bad_request(live):
    _, port, _, _ = live
    cases = {
        (proto.Op.GET_UNIT, "other", "resident"): "not_found",
        (proto.Op.GET_MANIFEST, "nope", None): "not_found",
        (proto.Op.GET_UNIT, "m", "model.layers.9"): "not_found",
        (proto.Op.GET_UNIT, "m", "../manifest.json"): "bad_request",
        (proto.Op.GET_FILE, "m", "../../etc/passwd"): "bad_request",
        (proto.Op.GET_FILE, "m", "/etc/passwd"): "bad_request",
        (proto.Op.GET_FILE, "m", "manifest.json"): "not_found",
    }
    replies = []
    for i, (op, model, name) in enumerate(cases):  # one at a time: stay under the in-flight limit
        got, closed = asyncio.run(exchange(port, [proto.encode(proto.Request(i + 1, op, model, name))], frozenset({i + 1})))
        assert not closed
        replies += got
    errors = {r.request_id: r for r in replies if isinstance(r, proto.Error)}
    for i, ((op, model, name), code) in enumerate(cases.items()):
        assert errors[i + 1].code == code, (op, model, name, errors[i + 1])
    assert "['m']" in errors[1].message  # an unknown model's error lists the hosted names
    assert not any(isinstance(r, proto.Data) for r in replies)  # nothing was served for any of them


def test_missing_or_wrong_token_refused_at_handshake(live):
    _, port, _, _ = live

    async def attempt(headers):
        async with connect(f"ws://127.0.0.1:{port}", additional_headers=headers, open_timeout=10):
            pass

    for headers, status in [({}, 401), ({"Authorization": "Bearer wrong"}, 403),
                            ({"Authorization": f"Basic {TOKEN}"}, 403), ({"Authorization": "Bearer"}, 403),
                            ({"Authorization": f"Bearer {TOKEN}x"}, 403)]:
        with pytest.raises(InvalidStatus) as ei:
            asyncio.run(attempt(headers))
        assert ei.value.response.status_code == status


def test_raw_garbage_on_the_socket_is_dropped(live):
    proc, port, _, good = live
    for payload in [b"\x00" * 100, b"GET / HTTP/1.1\r\n" + b"X: " + b"a" * 100_000 + b"\r\n\r\n",
                    b"\xff\xfe" * 5000, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"]:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            try:
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
                while s.recv(65536):  # the server answers with an HTTP error or just closes: never hangs
                    pass
            except (ConnectionResetError, BrokenPipeError):
                pass
    assert proc.poll() is None
    assert asyncio.run(exchange(port, []))[1] is False


def test_connection_and_inflight_floods_are_refused_clearly(live):
    _, port, _, good = live

    async def go():
        hdr = {"Authorization": f"Bearer {TOKEN}"}
        opened, refused = [], 0
        try:
            for _ in range(MAX_CONN + 3):
                try:
                    opened.append(await connect(f"ws://127.0.0.1:{port}", additional_headers=hdr, max_size=None,
                                                compression=None, open_timeout=10))
                except InvalidStatus as exc:
                    assert exc.response.status_code == 503
                    refused += 1
            assert refused >= 3 and len(opened) <= MAX_CONN - 1  # the good client holds one slot
            # too many in flight on one connection: the extra ones are answered "busy", none dropped
            ws = opened[0]
            n = 4 * MAX_INFLIGHT
            for rid in range(1, n + 1):
                await ws.send(proto.encode(proto.Request(rid, proto.Op.GET_UNIT, "m", "model.layers.1")))
            done: dict[int, str] = {}
            async with asyncio.timeout(60):
                sizes: dict[int, int] = {}
                while len(done) < n:
                    msg = proto.decode(await ws.recv())
                    if isinstance(msg, proto.Error):
                        done[msg.request_id] = msg.code
                    elif isinstance(msg, proto.Result):
                        sizes[msg.request_id] = msg.size
                    elif isinstance(msg, proto.Data):
                        if msg.offset + len(msg.payload) == sizes[msg.request_id]:
                            done[msg.request_id] = "ok"
            codes = list(done.values())
            assert set(codes) <= {"ok", "busy"} and codes.count("busy") >= 1 and codes.count("ok") >= MAX_INFLIGHT
        finally:
            for ws in opened:
                await ws.close()

    asyncio.run(go())
    # exchange() re-asks while the server answers busy: it returns once the slots were released
    assert asyncio.run(exchange(port, []))[1] is False
    assert not good.errors, good.errors[:3]
