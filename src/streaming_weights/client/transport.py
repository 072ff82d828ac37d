"""``WebSocketSource``: the client side of the weight-server protocol (v1, docs/protocol.md).

One persistent connection per server carries many concurrent requests, told apart by request id.
This module is the asyncio pump only: the handshake goes through websockets' sans-I/O
:class:`~websockets.client.ClientProtocol`; after it, an :class:`asyncio.BufferedProtocol` hands the
socket's bytes to :class:`~streaming_weights.protocol.frames.FrameReader` (which reads DATA payloads
straight into the unit's preallocated buffer) and its events to :class:`~.inbox.Inbox` (which routes
them to requests). A unit is BLAKE3-verified while it arrives and decoded zero-copy once it matches.

Each call makes one attempt (bounded by ``timeout_seconds``, connecting included); a lost connection
is re-made on the next call. Retrying is :class:`~.retry.RetryingSource`'s job.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import ssl
import time
from typing import Any, Callable, Iterable

from websockets.client import ClientProtocol
from websockets.exceptions import InvalidStatus
from websockets.protocol import State
from websockets.uri import parse_uri

from .. import protocol as proto
from ..exceptions import (AuthenticationError, BadRequestError, BusyError, ConfigurationError, ConnectionFailedError,
                          HandshakeRefusedError, TLSVerificationError,
                          FetchTimeoutError, NotFoundError, ProtocolError, SignatureError)
from ..format import Manifest
from ..format.signing import TrustPolicy
from ..protocol import frames
from .base import FetchedUnit, UnitSource
from .buffers import BufferPool
from .inbox import Inbox, Pending, usable_cpus
from .sockets import WakeThreshold, widen_receive_buffer
from .fingerprint import Fingerprints, Verifier
from .verify import decode_verified, trusted_manifest, verify_blob

logger = logging.getLogger("streaming_weights.client.transport")

_HTTP_END, _MAX_HANDSHAKE = b"\r\n\r\n", 64 * 1024  # a handshake response's end, and its most bytes
_TLS_RECORDS = (b"\x15\x03", b"\x16\x03")  # a TLS alert / handshake record: the server speaks TLS


def _tls_hint(uri: str) -> ConfigurationError:
    return ConfigurationError(f"{uri}: the server speaks TLS: use wss:// instead of ws://")


class _Connection(asyncio.BufferedProtocol):
    """One WebSocket connection: the handshake, then bytes pumped into the frame reader and the inbox."""

    def __init__(self, ws: ClientProtocol, uri: str, token: str | None, secure: bool,
                 on_lost: Callable[[_Connection], None]) -> None:
        self.ws, self.uri, self.token, self.secure, self.on_lost = ws, uri, token, secure, on_lost
        self.transport: asyncio.Transport | None = None
        self.handshake: asyncio.Future = asyncio.get_running_loop().create_future()
        # Retrieve the outcome even if nobody awaits it (a cancelled connect): no "exception was never retrieved".
        self.handshake.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.reader = frames.FrameReader()
        self.inbox = Inbox(self.reader)
        self.closed = False
        self.failure: BaseException | None = None  # why abort() dropped the connection
        self.last_rx = time.monotonic()
        self._handshaking = True
        self.handshake_bytes = 0  # bytes received before the handshake finished
        self._hs = bytearray()
        self._hs_scratch = memoryview(bytearray(16 * 1024))

    @property
    def pending(self) -> dict[int, Pending]:
        return self.inbox.pending

    # ------------------------------------------------------------------------------ asyncio plumbing
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = widen_receive_buffer(transport)  # type: ignore[assignment]
        self.wake = WakeThreshold(transport, self.secure)  # (set before any byte can arrive)
        request = self.ws.connect()
        if self.token:
            request.headers["Authorization"] = f"Bearer {self.token}"
        self.ws.send_request(request)
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.handshake.done():
            if self._hs:
                self.ws.receive_data(bytes(self._hs))
                self._hs.clear()
            self.ws.receive_eof()
            self._finish_handshake(exc)
        why = f"connection to {self.uri} lost: {exc}" if exc else f"connection closed by the server {self.uri}"
        self.inbox.fail_all(ConnectionFailedError(why))
        self.on_lost(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._hs_scratch if self._handshaking else self.reader.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self.last_rx = time.monotonic()
        # Nothing may escape into asyncio (it would log a traceback): any failure drops the connection
        # and fails the requests on it with a specific error.
        try:
            if self._handshaking:
                self._handshake_data(bytes(self._hs_scratch[:nbytes]))
            else:
                self._pump(self.reader.buffer_updated(nbytes))
                self.wake.expect(self.reader.certain())
        except (ProtocolError, ConfigurationError) as exc:
            self.abort(exc)
        except Exception as exc:  # noqa: BLE001 - a bug must not become an asyncio traceback
            logger.debug("receive failed on %s", self.uri, exc_info=True)
            self.abort(ConnectionFailedError(f"receive failed on {self.uri}: {type(exc).__name__}: {exc}"))

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost fails the pending requests

    def _flush(self) -> None:
        data = self.ws.data_to_send()
        if self.transport is not None and not self.transport.is_closing():
            for chunk in data:
                if chunk:
                    self.transport.write(chunk)

    def abort(self, exc: BaseException) -> None:
        if not self._handshaking:  # handshake failures are the connecting caller's error, not news
            logger.warning("closing connection to %s: %s", self.uri, exc)
        self.failure = self.failure or exc
        self.inbox.fail_all(exc)
        if not self.handshake.done():
            self.handshake.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if self.ws.state is State.OPEN:
            self.ws.send_close(1000)
            self._flush()
        self.transport.close()

    # ------------------------------------------------------------------------------ frames
    def _pump(self, events: Iterable[frames.Event]) -> None:
        for ev in self.inbox.handle(events):
            if isinstance(ev, frames.Ping):
                self.ws.send_pong(ev.payload)
                self._flush()
            elif isinstance(ev, frames.Close):
                if self.ws.state is State.OPEN:
                    self.ws.send_close(1000 if ev.code in (1000, 1001, None) else 1002)
                    self._flush()
                if self.transport is not None:
                    self.transport.close()

    def _feed(self, data: bytes) -> None:
        """Bytes that arrived with the handshake response go through the same path as later ones."""
        for ev in self.reader.feed(data):
            self._pump([ev])

    # ------------------------------------------------------------------------------ handshake
    def _handshake_data(self, data: bytes) -> None:
        self.handshake_bytes += len(data)
        self._hs += data
        if not self.secure and self._hs.startswith(_TLS_RECORDS):
            raise _tls_hint(self.uri)
        end = self._hs.find(_HTTP_END)
        if end < 0:
            if len(self._hs) > _MAX_HANDSHAKE:
                raise ProtocolError("handshake response headers exceed 64 KiB")
            return
        if self._hs.startswith(b"HTTP/1.1 101"):
            # Only the HTTP head goes to websockets: frames after it are ours (it would copy them).
            head, rest = bytes(self._hs[: end + 4]), bytes(self._hs[end + 4 :])
            self._hs.clear()
            self.ws.receive_data(head)
            self._finish_handshake(None)
            if self.handshake.done() and not self.handshake.cancelled() and self.handshake.exception() is None:
                self._handshaking = False
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
        self.handshake.set_exception(self._handshake_error(err, exc))
        if self.transport is not None:
            self.transport.abort()

    def _handshake_error(self, err: BaseException | None, exc: BaseException | None) -> BaseException:
        if isinstance(err, InvalidStatus):
            status = err.response.status_code
            body = bytes(err.response.body or b"").decode("utf-8", "replace").strip()
            if status in (401, 403):
                return AuthenticationError(
                    f"weight server refused the token (HTTP {status}: {body}); pass token= or set SURFING_TOKEN")
            if status == 503:
                return BusyError(f"weight server is busy (HTTP 503: {body})")
            if status == 400 and "https" in body.lower() and not self.secure:
                return _tls_hint(self.uri)  # e.g. nginx: "The plain HTTP request was sent to HTTPS port"
            return HandshakeRefusedError(f"weight server {self.uri} refused the WebSocket handshake: HTTP {status} {body}")
        if not self.handshake_bytes:
            return ConnectionFailedError(f"weight server {self.uri} is unreachable: the connection closed before "
                                         "the WebSocket handshake was answered")
        if err is not None:
            return ConnectionFailedError(f"WebSocket handshake with {self.uri} failed: {err}")
        return ConnectionFailedError(f"connection to {self.uri} closed during the handshake: {exc}")

    # ------------------------------------------------------------------------------ requests
    @property
    def usable(self) -> bool:
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    def send(self, data: bytes) -> None:
        if not self.usable:
            why = f"dropped: {self.failure}" if self.failure is not None else "closed"
            raise ConnectionFailedError(f"connection to {self.uri} is {why}")
        self.ws.send_binary(data)
        self._flush()


class WebSocketSource(UnitSource):
    """Manifests and units from a weight server (``ws://`` or ``wss://``), one attempt per call.

    Connects lazily on first use and keeps one connection, shared by all concurrent requests, on one event
    loop (the engine's transport thread). Wrap it in ``RetryingSource`` to retry.

    Args:
        uri: ``ws://host:port`` or ``wss://host:port``.
        token: bearer token sent at the handshake (``StreamingConfig`` defaults it to ``$SURFING_TOKEN``).
        timeout_seconds: limit of one call, connecting included; exceeding it raises FetchTimeoutError.
        ssl_context: for ``wss://`` (default: the system's trust store with hostname checking).
        trust: check every manifest against these keys / pin before use (SignatureError). pool: buffers.
        fingerprints: where re-fetched units' fingerprints are kept (:mod:`.fingerprint`; default: its own).

    Raises (from the fetch methods):
        AuthenticationError: the server refused the token.
        NotFoundError, BadRequestError, TooLargeError: the request itself is wrong.
        IntegrityError: the bytes do not match the manifest's hash (never returned).
        BusyError / RemoteError: the server is busy / failed to answer.
        ConnectionFailedError: no connection could be made or kept.
        ConfigurationError: a ``ws://`` URI names a TLS server (use ``wss://``).
        FetchTimeoutError: the call did not finish within ``timeout_seconds``.
    """

    def __init__(self, uri: str, *, token: str | None = None, timeout_seconds: float = 30.0,
                 ssl_context: ssl.SSLContext | None = None, trust: TrustPolicy | None = None,
                 pool: BufferPool | None = None, fingerprints: Fingerprints | None = None) -> None:
        self.trust = trust
        self.buffer_pool = pool
        self.fingerprints = fingerprints if fingerprints is not None else Fingerprints()
        try:
            self._wsuri = parse_uri(uri)
        except Exception as exc:
            raise ConfigurationError(f"invalid weight server URI {uri!r}: {exc}; use ws://host:port or wss://host:port") from exc
        if not timeout_seconds > 0:
            raise ConfigurationError(f"timeout_seconds must be > 0, got {timeout_seconds}")
        self.uri = self.location = uri
        self.token = token or None
        self.timeout_seconds = timeout_seconds
        if self._wsuri.secure and ssl_context is None:
            ssl_context = ssl.create_default_context()
        self.ssl_context = ssl_context if self._wsuri.secure else None
        self._conn: _Connection | None = None
        self._connect_lock: asyncio.Lock | None = None
        self._next_id = 0
        self.reconnects = 0
        # One thread, so the pieces of a unit are hashed in order; blake3 releases the GIL while hashing.
        self._hash_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="surfing-verify")

    # -------------------------------------------------------------------------------- connection
    async def _connection(self) -> _Connection:
        if self._conn is not None and self._conn.usable:
            return self._conn
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
        async with self._connect_lock:
            if self._conn is None or not self._conn.usable:
                self._conn = await self._connect()
            return self._conn

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        ws = ClientProtocol(self._wsuri, max_size=None)
        conn: _Connection | None = None
        try:
            _, conn = await loop.create_connection(
                lambda: _Connection(ws, self.uri, self.token, self._wsuri.secure, self._lost), self._wsuri.host,
                self._wsuri.port, ssl=self.ssl_context, server_hostname=self._wsuri.host if self.ssl_context else None)
            await conn.handshake
        except asyncio.CancelledError:  # timed out or cancelled mid-handshake: do not leave it half open
            if conn is not None and conn.transport is not None:
                conn.transport.abort()
            raise
        except ssl.SSLCertVerificationError as exc:
            raise TLSVerificationError(f"TLS certificate of {self.uri} rejected: {exc.verify_message or exc}; "
                                       "pass ca_cert= (CLI: --ca-cert) for a private CA") from None
        except ConnectionFailedError:
            # A TLS server closes a plain connection without a byte: ask it for a TLS handshake to say so.
            if conn is not None and not conn.handshake_bytes and not self._wsuri.secure and await self._speaks_tls():
                raise _tls_hint(self.uri) from None
            raise
        except (ssl.SSLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc.strerror or type(exc).__name__
            hint = " (if the server does not use TLS, use ws://)" if self._wsuri.secure else ""
            raise ConnectionFailedError(f"weight server {self.uri} is unreachable: {reason}{hint}") from None
        self.reconnects += 1
        return conn

    async def _speaks_tls(self) -> bool:
        """Whether the server completes a TLS handshake (the certificate is not checked: this only probes)."""
        probe = ssl.create_default_context()
        probe.check_hostname, probe.verify_mode = False, ssl.CERT_NONE
        try:
            async with asyncio.timeout(min(5.0, self.timeout_seconds)):
                _, writer = await asyncio.open_connection(self._wsuri.host, self._wsuri.port, ssl=probe)
        except (OSError, TimeoutError):
            return False
        writer.close()
        return True

    def _lost(self, conn: _Connection) -> None:
        if self._conn is conn:
            self._conn = None

    # -------------------------------------------------------------------------------- requests
    def _new_id(self, taken: dict[int, Pending]) -> int:
        while True:
            self._next_id = self._next_id % proto.MAX_REQUEST_ID + 1
            if self._next_id not in taken:
                return self._next_id

    async def _request(self, op: proto.Op, model: str | None = None, name: str | None = None, *,
                       buffer: bytearray | None = None, expected_size: int | None = None,
                       verifier: Verifier | None = None) -> Pending:
        """One attempt: connect if needed, send the request, wait for its whole answer."""
        started = time.monotonic()
        p: Pending | None = None
        conn: _Connection | None = None
        try:
            async with asyncio.timeout(self.timeout_seconds):
                conn = await self._connection()
                p = Pending(self._new_id(conn.pending), op, asyncio.get_running_loop().create_future(),
                            expected_size=expected_size, buffer=buffer)
                if verifier is not None and buffer is not None:  # on the worker thread, which uses another CPU
                    # meanwhile; inline with one CPU (pinned, 128 MiB: 2.35 GB/s, 376 CPU ms/GB vs 2.14, 435 on the thread)
                    p.hasher, p.hash_pool = verifier, self._hash_pool if usable_cpus() > 1 else None
                conn.send(proto.encode(proto.Request(p.request_id, op, model, name)))
                conn.pending[p.request_id] = p  # replies are parsed in later callbacks: registering after send is safe
                await p.future  # type: ignore[misc]
                return p
        except TimeoutError:
            self._abandon(conn, p, started)
            got = f"{p.received} of {p.size if p.size is not None else '?'} bytes" if p else "not connected"
            raise FetchTimeoutError(
                f"{op.value} {name or model or ''} from {self.uri} did not finish within {self.timeout_seconds}s "
                f"({got}); raise timeout_seconds for slow links") from None
        except asyncio.CancelledError:
            self._abandon(conn, p, None)
            raise
        finally:
            if p is not None:
                # ``p`` refers to its future: break that link now, or every unit buffer could live until the
                # cyclic GC runs (measured: RSS grew by a unit per fetch until a gen-2 collection).
                p.view, p.future = None, None

    def _abandon(self, conn: _Connection | None, p: Pending | None, started: float | None) -> None:
        """Stop waiting for ``p``: tell the server (CANCEL), and drop a connection that went silent."""
        if conn is None or p is None or conn.inbox.forget(p.request_id) is None:
            return
        try:
            conn.send(proto.encode(proto.Cancel(p.request_id)))
        except ConnectionError:
            pass
        if started is not None and conn.last_rx <= started and conn.wake.idle():  # nothing arrived: likely dead
            conn.close()
        conn.wake.expect(0)  # its bytes are discarded from now on: wake at each arrival again

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
        """The served manifest bytes, checked against :attr:`trust` (with the signature) before use."""
        data = bytes((await self._request(proto.Op.GET_MANIFEST, model_name)).buffer or b"")
        sig = await self.get_signature(model_name) if self.trust is not None and self.trust.wants_signature else None
        return trusted_manifest(data, sig, self.trust, self.uri)

    async def get_signature(self, model_name: str | None = None) -> bytes | None:
        """The raw ``manifest.json.sig`` the server holds for the model, None when it is unsigned."""
        try:
            return bytes((await self._request(proto.Op.GET_SIGNATURE, model_name)).buffer or b"")
        except NotFoundError:
            return None
        except BadRequestError as exc:  # a server from before signatures does not know the op
            raise SignatureError(f"{self.uri} cannot serve manifest signatures ({exc}); upgrade the server") from None

    async def fetch_unit(self, manifest: Manifest, unit: str) -> FetchedUnit:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        entry = manifest.unit(unit)
        buf = self.new_buffer(entry.bytes)
        p = await self._request(proto.Op.GET_UNIT, manifest.name, unit, buffer=buf, expected_size=entry.bytes,
                                verifier=self.fingerprints.verifier(entry))
        # Hashed while it arrived: wait for the last piece, compare, then parse the header (no re-hash).
        if p.hash_future is not None:  # None: hashed inline, done
            await asyncio.wrap_future(p.hash_future)
        p.hasher.check(self.uri)
        tensors = decode_verified(entry, buf, self.uri)
        return FetchedUnit(unit, tensors, entry.bytes, loop.time() - t0, buf)

    async def fetch_file(self, manifest: Manifest, name: str) -> bytes:
        entry = manifest.file(name)
        buf = bytearray(entry.bytes)
        await self._request(proto.Op.GET_FILE, manifest.name, name, buffer=buf, expected_size=entry.bytes)
        verify_blob(entry, buf, self.uri)
        return bytes(buf)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        conn is not None and conn.close()
        self._hash_pool.shutdown(wait=False)

    async def __aenter__(self) -> WebSocketSource:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


__all__ = ["WebSocketSource"]
