"""``WebSocketSource``: the client side of the weight-server protocol (v1, docs/protocol.md).

One persistent connection per server carries many concurrent requests, told apart by request id.
The receive path is an :class:`asyncio.BufferedProtocol` under a small WebSocket frame parser: the
handshake goes through websockets' sans-I/O :class:`~websockets.client.ClientProtocol`, and after it
the socket reads DATA payload bytes straight into the unit's preallocated ``bytearray`` (server→client
frames are unmasked, so nothing has to be transformed). A unit is verified against the manifest's BLAKE3
hash before anything is decoded or returned, then decoded zero-copy (tensors are views of that buffer).

Transient failures (connection refused or lost, ``busy``, ``internal``) are retried ``max_retries``
times with exponential backoff and jitter over a fresh connection; authentication, not-found, bad
requests and integrity failures are not.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import random
import ssl
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import blake3
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidStatus
from websockets.protocol import State
from websockets.uri import parse_uri

from .. import protocol as proto
from ..exceptions import (
    AuthenticationError,
    BusyError,
    ConfigurationError,
    ConnectionFailedError,
    FetchTimeoutError,
    IntegrityError,
    ProtocolError,
    RemoteError,
)
from ..format import Manifest
from .source import FetchedUnit, UnitSource, check_blake3, decode_verified, verify_blob

logger = logging.getLogger("streaming_weights.client.transport")

TOKEN_ENV = "SURFING_TOKEN"
#: A manifest or file whose announced size is larger than this is refused (a hostile server cannot OOM us).
MAX_UNSIZED_BLOB = 256 << 20
_HTTP_END = b"\r\n\r\n"
_SCRATCH = 256 * 1024

# WebSocket opcodes (RFC 6455 §5.2)
_OP_CONT, _OP_TEXT, _OP_BINARY, _OP_CLOSE, _OP_PING, _OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

_HASH_BATCH = 4 << 20  # hash received bytes in 4 MiB pieces

class _LinkLost(ConnectionError):
    """The connection died under a request (transient: retried on a new connection)."""


@dataclass
class _Pending:
    request_id: int
    op: proto.Op
    future: asyncio.Future | None
    expected_size: int | None = None  # units: the manifest's size; others: announced by RESULT
    buffer: bytearray | None = None
    view: memoryview | None = None
    size: int | None = None
    received: int = 0
    body: dict[str, Any] = field(default_factory=dict)
    # Incremental BLAKE3 over the received prefix, fed to a worker thread while bytes keep arriving,
    # so verification overlaps the transfer instead of following it.
    hasher: Any = None
    hashed: int = 0
    hash_future: concurrent.futures.Future | None = None
    hash_pool: concurrent.futures.Executor | None = None

    def feed_hash(self, final: bool) -> None:
        if self.hasher is None or self.buffer is None:
            return
        if self.received - self.hashed >= _HASH_BATCH or (final and self.received > self.hashed):
            piece = memoryview(self.buffer)[self.hashed : self.received]
            self.hash_future = self.hash_pool.submit(self.hasher.update, piece)
            self.hashed = self.received

    def fail(self, exc: BaseException) -> None:
        if self.future is not None and not self.future.done():
            self.future.set_exception(exc)

    def finish(self) -> None:
        if self.future is not None and not self.future.done():
            self.future.set_result(self)


class _Link(asyncio.BufferedProtocol):
    """One WebSocket connection: handshake, frame parsing into request buffers, request bookkeeping."""

    def __init__(self, ws: ClientProtocol, on_lost: Callable[[_Link], None]) -> None:
        self.ws = ws
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self.handshake: asyncio.Future = asyncio.get_running_loop().create_future()
        self.handshake.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.pending: dict[int, _Pending] = {}
        self.closed = False
        self.last_rx = time.monotonic()
        self._hs = bytearray()
        self._hs_is_101: bool | None = None
        self._scratch = bytearray(_SCRATCH)
        self._scratch_view = memoryview(self._scratch)
        # Frame parser state: we read into ``_dest`` until ``_need`` bytes arrived, then ``_on_segment``.
        self._stage = "hdr"
        self._hdr = bytearray(14)
        self._hdr_view = memoryview(self._hdr)
        self._got = 0
        self._need = 2
        self._dest: memoryview = self._hdr_view[:2]
        self._opcode = 0
        self._fin = True
        self._frame_left = 0  # payload bytes still to read in the current frame
        self._ctrl = bytearray()
        # Message-level state (a message may span several frames).
        self._in_message = False
        self._msg_pos = 0  # payload bytes of the current message consumed so far
        self._app = bytearray(proto.HEADER_SIZE)
        self._kind: proto.Kind | None = None
        self._rid = 0
        self._offset = 0
        self._target: _Pending | None = None  # DATA destination, or None to discard
        self._body = bytearray()

    # ------------------------------------------------------------------------------ asyncio plumbing
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        request = self.ws.connect()
        self._request_hook(request)
        self.ws.send_request(request)
        self._flush()

    _request_hook: Callable[[Any], None] = staticmethod(lambda request: None)  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.handshake.done():
            if self._hs and self._hs_is_101 is False:
                self.ws.receive_data(bytes(self._hs))
                self._hs.clear()
            self.ws.receive_eof()
            self._finish_handshake(exc)
        err = _LinkLost(f"connection lost: {exc}" if exc else "connection closed by the server")
        for p in list(self.pending.values()):
            p.fail(err)
        self.pending.clear()
        self.on_lost(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._stage == "handshake":
            return self._scratch_view
        if self._stage == "payload" and self._dest is None:  # discarding
            return self._scratch_view[: min(self._need - self._got, _SCRATCH)]
        return self._dest[self._got : self._need]

    def buffer_updated(self, nbytes: int) -> None:
        self.last_rx = time.monotonic()
        try:
            if self._stage == "handshake":
                self._handshake_data(bytes(self._scratch_view[:nbytes]))
            else:
                self._advance(nbytes)
        except ProtocolError as exc:
            self.abort(exc)

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost fails the pending requests

    def _flush(self) -> None:
        data = self.ws.data_to_send()
        if self.transport is not None and not self.transport.is_closing():
            for chunk in data:
                if chunk:
                    self.transport.write(chunk)

    def abort(self, exc: BaseException) -> None:
        logger.warning("closing connection: %s", exc)
        for p in list(self.pending.values()):
            p.fail(exc if isinstance(exc, ProtocolError) else _LinkLost(str(exc)))
        self.pending.clear()
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        try:
            if self.ws.state is State.OPEN:
                self.ws.send_close(1000)
                self._flush()
        except Exception:  # pragma: no cover - best effort
            pass
        self.transport.close()

    # ---------------------------------------------------------------------------------- handshake
    def start_handshake(self) -> None:
        self._stage = "handshake"

    def _handshake_data(self, data: bytes) -> None:
        self._hs += data
        if self._hs_is_101 is None:
            end = self._hs.find(_HTTP_END)
            if end < 0:
                if len(self._hs) > 64 * 1024:
                    raise ProtocolError("handshake response headers exceed 64 KiB")
                return
            self._hs_is_101 = self._hs.startswith(b"HTTP/1.1 101")
            if self._hs_is_101:
                head, rest = bytes(self._hs[: end + 4]), bytes(self._hs[end + 4 :])
                self._hs.clear()
                self.ws.receive_data(head)
                self._finish_handshake(None)
                if self.handshake.done() and self.handshake.exception() is None:
                    self._reset_frame()
                    if rest:
                        self._feed(rest)
                return
        # A refusal (401/403/503...) comes with a body: let websockets parse all of it.
        self.ws.receive_data(bytes(self._hs))
        self._hs.clear()
        if self.ws.events_received() or self.ws.handshake_exc is not None:
            self._finish_handshake(None)

    def _finish_handshake(self, exc: BaseException | None) -> None:
        if self.handshake.done():
            return
        err = self.ws.handshake_exc
        if err is None and self.ws.state is State.OPEN:
            self.handshake.set_result(None)
            return
        if isinstance(err, InvalidStatus):
            status = err.response.status_code
            body = bytes(err.response.body or b"").decode("utf-8", "replace").strip()
            if status in (401, 403):
                e: BaseException = AuthenticationError(
                    f"weight server refused the token (HTTP {status}: {body}); pass token= or set {TOKEN_ENV}"
                )
            elif status == 503:
                e = BusyError(f"weight server is busy (HTTP 503: {body})")
            else:
                e = ConnectionFailedError(f"weight server refused the WebSocket handshake: HTTP {status} {body}")
        elif err is not None:
            e = _LinkLost(f"WebSocket handshake failed: {err}")
        else:
            e = _LinkLost(f"connection closed during the handshake: {exc}")
        self.handshake.set_exception(e)
        if self.transport is not None:
            self.transport.abort()

    # -------------------------------------------------------------------------------- frame parser
    def _feed(self, data: bytes) -> None:
        """Push bytes that did not arrive through get_buffer (leftovers after the handshake)."""
        mv = memoryview(data)
        while mv:
            dest = self.get_buffer(len(mv))
            n = min(len(dest), len(mv))
            dest[:n] = mv[:n]
            mv = mv[n:]
            self._advance(n)

    def _reset_frame(self) -> None:
        self._stage, self._got, self._need, self._dest = "hdr", 0, 2, self._hdr_view[:2]

    def _advance(self, nbytes: int) -> None:
        self._got += nbytes
        if self._got < self._need:
            return
        stage = self._stage
        if stage == "hdr":
            b0, b1 = self._hdr[0], self._hdr[1]
            if b0 & 0x70:
                raise ProtocolError("server frame has reserved bits set (compression is not negotiated)")
            if b1 & 0x80:
                raise ProtocolError("server frames must not be masked")
            self._fin, self._opcode = bool(b0 & 0x80), b0 & 0x0F
            n = b1 & 0x7F
            if n >= 126:
                ext = 2 if n == 126 else 8
                self._stage, self._got, self._need, self._dest = "ext", 0, ext, self._hdr_view[2 : 2 + ext]
                return
            self._start_payload(n)
        elif stage == "ext":
            n = struct.unpack(">H" if self._need == 2 else ">Q", self._dest)[0]
            self._start_payload(n)
        elif stage == "ctrl":
            self._control_frame(bytes(self._ctrl))
            self._reset_frame()
        else:  # payload segment done
            self._payload_consumed(self._need)

    def _start_payload(self, n: int) -> None:
        op = self._opcode
        if op >= 0x8:
            if n > 125 or not self._fin:
                raise ProtocolError("invalid control frame")
            self._ctrl = bytearray(n)
            if n == 0:
                self._control_frame(b"")
                self._reset_frame()
            else:
                self._stage, self._got, self._need, self._dest = "ctrl", 0, n, memoryview(self._ctrl)
            return
        if op == _OP_TEXT:
            raise ProtocolError("the server sent a text message; protocol v1 is binary only")
        if op == _OP_BINARY:
            if self._in_message:
                raise ProtocolError("new message before the previous one finished")
            self._in_message, self._msg_pos, self._kind = True, 0, None
        elif op == _OP_CONT:
            if not self._in_message:
                raise ProtocolError("continuation frame without a message")
        else:
            raise ProtocolError(f"unknown opcode {op:#x}")
        self._frame_left = n
        self._next_segment()

    def _next_segment(self) -> None:
        """Point the reader at the next run of payload bytes of the current frame."""
        if self._frame_left == 0:
            if self._fin:
                self._message_done()
            self._reset_frame()
            return
        self._stage, self._got = "payload", 0
        if self._msg_pos < proto.HEADER_SIZE:  # the application header
            n = min(self._frame_left, proto.HEADER_SIZE - self._msg_pos)
            self._need, self._dest = n, memoryview(self._app)[self._msg_pos : self._msg_pos + n]
            return
        if self._kind is proto.Kind.DATA:
            n = self._frame_left
            t = self._target
            if t is not None:
                pos = self._offset + self._msg_pos - proto.HEADER_SIZE
                if t.view is None or t.size is None or pos + n > t.size:
                    raise ProtocolError(f"DATA for request {t.request_id} overruns its {t.size}-byte blob")
                self._need, self._dest = n, t.view[pos : pos + n]
            else:
                self._need, self._dest = n, None  # type: ignore[assignment]
            return
        n = self._frame_left
        if len(self._body) + n > proto.MAX_JSON_BODY:
            raise ProtocolError(f"{self._kind.name if self._kind else 'message'} body exceeds {proto.MAX_JSON_BODY} bytes")
        start = len(self._body)
        self._body.extend(bytes(n))
        self._need, self._dest = n, memoryview(self._body)[start:]

    def _payload_consumed(self, n: int) -> None:
        had_header = self._msg_pos >= proto.HEADER_SIZE
        self._msg_pos += n
        self._frame_left -= n
        if not had_header and self._msg_pos == proto.HEADER_SIZE:
            self._app_header_done()
        elif had_header and self._kind is proto.Kind.DATA and self._target is not None:
            self._target.received += n
            done = self._target.received == self._target.size
            self._target.feed_hash(final=done)
            if done:
                self._complete(self._target)
        self._dest = None  # type: ignore[assignment]  # release views of request buffers promptly
        self._next_segment()

    def _app_header_done(self) -> None:
        kind, rid, offset = proto.parse_header(self._app)
        self._kind, self._rid, self._offset = kind, rid, offset
        self._body = bytearray()
        self._target = None
        if kind is proto.Kind.DATA:
            p = self.pending.get(rid)
            if p is None:
                return  # a cancelled or timed-out request: discard its bytes
            if p.view is None or p.size is None:
                raise ProtocolError(f"DATA for request {rid} before its RESULT")
            if offset != p.received:
                raise ProtocolError(f"DATA for request {rid} at offset {offset}, expected {p.received}")
            self._target = p  # bounds are checked per frame in _next_segment

    def _message_done(self) -> None:
        self._in_message = False
        kind = self._kind
        if self._msg_pos < proto.HEADER_SIZE:
            raise ProtocolError(f"message of {self._msg_pos} bytes is shorter than the protocol header")
        if kind is proto.Kind.DATA:
            self._target = None
            return
        try:
            msg = proto.decode(bytes(self._app) + bytes(self._body))
        finally:
            self._body = bytearray()
        p = self.pending.get(msg.request_id)
        if isinstance(msg, proto.Error):
            err = msg.to_exception()
            if p is not None:
                self.pending.pop(msg.request_id, None)
                p.fail(err)
            elif msg.request_id == 0:
                logger.warning("weight server reported: %s: %s", msg.code, msg.message)
            return
        if not isinstance(msg, proto.Result):
            raise ProtocolError(f"unexpected {type(msg).__name__} message from the server")
        if p is None:
            return
        if p.op not in proto.BLOB_OPS:
            p.body = msg.body
            self._complete(p)
            return
        size = msg.size
        if size is None:
            raise ProtocolError(f"RESULT for {p.op.value} lacks a valid 'size'")
        if p.expected_size is not None and size != p.expected_size:
            self.pending.pop(p.request_id, None)
            p.fail(IntegrityError(f"server announced {size} bytes, the manifest says {p.expected_size}"))
            return
        if p.buffer is None:
            if size > MAX_UNSIZED_BLOB:
                self.pending.pop(p.request_id, None)
                p.fail(ProtocolError(f"server announced a {size}-byte {p.op.value} response; refusing"))
                return
            p.buffer = bytearray(size)
        p.view, p.size = memoryview(p.buffer), size
        if size == 0:
            self._complete(p)

    def _complete(self, p: _Pending) -> None:
        self.pending.pop(p.request_id, None)
        p.view = None
        p.finish()

    def _control_frame(self, payload: bytes) -> None:
        op = self._opcode
        if op == _OP_PING:
            self.ws.send_pong(payload)
            self._flush()
        elif op == _OP_CLOSE:
            if self.ws.state is State.OPEN:
                code = struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else 1005
                self.ws.send_close(1000 if code in (1000, 1001) else 1002)
                self._flush()
            if self.transport is not None:
                self.transport.close()
        elif op != _OP_PONG:
            raise ProtocolError(f"unknown control opcode {op:#x}")

    # ------------------------------------------------------------------------------------ requests
    @property
    def usable(self) -> bool:
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    def send(self, data: bytes) -> None:
        if not self.usable:
            raise _LinkLost("connection is closed")
        self.ws.send_binary(data)
        self._flush()


class WebSocketSource(UnitSource):
    """Manifests and units from a weight server (``ws://`` or ``wss://``).

    Connects lazily on first use and keeps one connection, shared by all concurrent requests; must be
    used from one event loop (the engine's transport thread).

    Args:
        uri: ``ws://host:port`` or ``wss://host:port``.
        token: bearer token sent at the handshake (default ``$SURFING_TOKEN``).
        timeout_seconds: per-request limit (also for connecting); exceeding it raises FetchTimeoutError.
        max_retries: extra attempts after a transient failure (connection refused/lost, busy, internal).
        ssl_context: for ``wss://`` (default: the system's trust store with hostname checking).
        backoff_base, backoff_max: exponential backoff with full jitter between attempts, in seconds.

    Raises (from the fetch methods):
        AuthenticationError: the server refused the token (never retried).
        NotFoundError, BadRequestError, TooLargeError: the request itself is wrong (never retried).
        IntegrityError: the bytes do not match the manifest's hash (never returned, never retried).
        BusyError / RemoteError: the server stayed busy / failing after the retries.
        ConnectionFailedError: no connection could be made or kept after the retries.
        FetchTimeoutError: a request did not finish within ``timeout_seconds``.
    """

    def __init__(self, uri: str, *, token: str | None = None, timeout_seconds: float = 30.0, max_retries: int = 3,
                 ssl_context: ssl.SSLContext | None = None, backoff_base: float = 0.1, backoff_max: float = 5.0) -> None:
        try:
            self._wsuri = parse_uri(uri)
        except Exception as exc:
            raise ConfigurationError(f"invalid weight server URI {uri!r}: {exc}") from exc
        if timeout_seconds <= 0 or max_retries < 0:
            raise ConfigurationError("timeout_seconds must be > 0 and max_retries >= 0")
        self.uri = uri
        self.location = uri
        self.token = os.environ.get(TOKEN_ENV) if token is None else token
        self.token = self.token or None
        self.timeout_seconds = timeout_seconds
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        if self._wsuri.secure and ssl_context is None:
            ssl_context = ssl.create_default_context()
        self.ssl_context = ssl_context if self._wsuri.secure else None
        self._link: _Link | None = None
        self._connect_lock: asyncio.Lock | None = None
        self._next_id = 0
        self.reconnects = 0
        self.retries = 0
        # One thread, so the pieces of a unit are hashed in order; blake3 releases the GIL while hashing.
        self._hash_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="surfing-verify")

    # -------------------------------------------------------------------------------- connection
    async def _connection(self) -> _Link:
        link = self._link
        if link is not None and link.usable:
            return link
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
        async with self._connect_lock:
            if self._link is not None and self._link.usable:
                return self._link
            self._link = await self._connect()
            return self._link

    async def _connect(self) -> _Link:
        loop = asyncio.get_running_loop()
        ws = ClientProtocol(self._wsuri, max_size=None)
        token = self.token

        def add_auth(request: Any) -> None:
            if token:
                request.headers["Authorization"] = f"Bearer {token}"

        def factory() -> _Link:
            link = _Link(ws, self._lost)
            link._request_hook = add_auth  # type: ignore[method-assign]
            link.start_handshake()
            return link

        try:
            async with asyncio.timeout(self.timeout_seconds):
                _, link = await loop.create_connection(
                    factory, self._wsuri.host, self._wsuri.port, ssl=self.ssl_context,
                    server_hostname=self._wsuri.host if self.ssl_context else None,
                )
                await link.handshake
        except TimeoutError as exc:
            raise _LinkLost(f"connecting to {self.uri} timed out after {self.timeout_seconds}s") from exc
        except ssl.SSLCertVerificationError as exc:
            raise ConnectionFailedError(f"TLS certificate of {self.uri} rejected: {exc}") from exc
        except (_LinkLost, ConnectionFailedError):
            raise
        except OSError as exc:
            raise _LinkLost(f"cannot connect to {self.uri}: {exc}") from exc
        self.reconnects += 1
        return link

    def _lost(self, link: _Link) -> None:
        if self._link is link:
            self._link = None

    # -------------------------------------------------------------------------------- requests
    def _new_id(self) -> int:
        self._next_id = self._next_id % proto.MAX_REQUEST_ID + 1
        return self._next_id

    async def _once(self, op: proto.Op, model: str | None, name: str | None,
                    buffer: bytearray | None, expected_size: int | None, hash_incremental: bool = False) -> _Pending:
        link = await self._connection()
        loop = asyncio.get_running_loop()
        rid = self._new_id()
        while rid in link.pending:
            rid = self._new_id()
        p = _Pending(rid, op, loop.create_future(), expected_size=expected_size, buffer=buffer)
        if hash_incremental and buffer is not None:
            p.hasher, p.hash_pool = blake3.blake3(), self._hash_pool  # a fresh hasher per attempt
        started = time.monotonic()
        link.send(proto.encode(proto.Request(rid, op, model, name)))
        link.pending[rid] = p  # replies are parsed in later callbacks, so registering after send is safe
        try:
            async with asyncio.timeout(self.timeout_seconds):
                return await p.future
        except TimeoutError:
            link.pending.pop(rid, None)
            try:
                link.send(proto.encode(proto.Cancel(rid)))
            except ConnectionError:
                pass
            if link.last_rx <= started:  # nothing at all arrived: the connection is likely dead
                link.close()
            raise FetchTimeoutError(
                f"{op.value} {name or model or ''} from {self.uri} did not finish within {self.timeout_seconds}s "
                f"({p.received} of {p.size if p.size is not None else '?'} bytes); raise timeout_seconds for slow links"
            ) from None
        except asyncio.CancelledError:
            if link.pending.pop(rid, None) is not None:
                try:
                    link.send(proto.encode(proto.Cancel(rid)))
                except ConnectionError:
                    pass
            raise
        finally:
            # The future's result is ``p`` itself: break that cycle now, or every unit buffer would
            # live until the cyclic GC runs (measured: RSS grew by a unit per fetch until a gen-2 collection).
            p.view = None
            p.future = None  # type: ignore[assignment]

    async def _request(self, op: proto.Op, model: str | None = None, name: str | None = None, *,
                       buffer: bytearray | None = None, expected_size: int | None = None,
                       hash_incremental: bool = False) -> _Pending:
        last: BaseException | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.retries += 1
                delay = min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1))
                await asyncio.sleep(random.uniform(delay / 2, delay))
            try:
                return await self._once(op, model, name, buffer, expected_size, hash_incremental)
            except _LinkLost as exc:
                last = exc
            except BusyError as exc:
                last = exc
            except RemoteError as exc:
                if exc.code != proto.ErrorCode.INTERNAL.value:
                    raise
                last = exc
            logger.debug("%s %s: attempt %d failed: %s", op.value, name or "", attempt + 1, last)
        if isinstance(last, RemoteError):
            raise last
        raise ConnectionFailedError(
            f"weight server {self.uri} unreachable after {self.max_retries + 1} attempts: {last}"
        ) from last

    # ------------------------------------------------------------------------------- UnitSource API
    async def ping(self) -> dict[str, Any]:
        return (await self._request(proto.Op.PING)).body

    async def list_models(self) -> list[str]:
        body = (await self._request(proto.Op.LIST_MODELS)).body
        models = body.get("models")
        if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
            raise ProtocolError("list_models RESULT lacks a list of model names")
        return models

    async def get_manifest(self, model_name: str | None = None) -> Manifest:
        p = await self._request(proto.Op.GET_MANIFEST, model_name)
        return Manifest.from_bytes(p.buffer or b"")

    async def fetch_unit(self, manifest: Manifest, unit: str) -> FetchedUnit:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        entry = manifest.unit(unit)
        buf = self.new_buffer(entry.bytes)
        p = await self._request(proto.Op.GET_UNIT, manifest.name, unit, buffer=buf, expected_size=entry.bytes,
                                hash_incremental=True)
        # Hashed while it arrived: wait for the last piece, compare, then parse the header (no re-hash).
        assert p.hasher is not None and p.hashed == entry.bytes, "every received byte is fed to the hasher"
        if p.hash_future is not None:
            await asyncio.wrap_future(p.hash_future)
        check_blake3(entry, p.hasher.hexdigest(), self.uri)
        tensors = decode_verified(entry, buf, self.uri)
        return FetchedUnit(unit, tensors, entry.bytes, loop.time() - t0, buf)

    async def fetch_file(self, manifest: Manifest, name: str) -> bytes:
        entry = manifest.file(name)
        buf = bytearray(entry.bytes)
        await self._request(proto.Op.GET_FILE, manifest.name, name, buffer=buf, expected_size=entry.bytes)
        verify_blob(entry, buf, self.uri)
        return bytes(buf)

    async def close(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            link.close()
        self._hash_pool.shutdown(wait=False)

    async def __aenter__(self) -> WebSocketSource:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


__all__ = ["WebSocketSource"]
