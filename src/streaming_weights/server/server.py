"""``WeightServer``: serves chunked models' bytes over WebSocket (protocol v1, see docs/protocol.md).

The server never deserializes tensors: it validates each request against the hosted manifests, reads
the blob from storage (through a byte-bounded LRU for blobs that fit it, or in ``chunk_bytes`` ranged
reads for larger ones) and sends it as raw DATA messages. Every send is awaited, one message at a time
per connection, so a client that stops reading stalls only its own requests and the server holds at
most about one chunk per in-flight request plus ``write_limit`` for it.
"""

from __future__ import annotations

import asyncio
import hmac
import http
import json
import logging
import os
import ssl
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request as HTTPRequest
from websockets.http11 import Response as HTTPResponse

from .. import protocol as proto
from ..client.source import discover_models, pick_model
from ..exceptions import (
    BadRequestError,
    ConfigurationError,
    KeyNotFoundError,
    ManifestError,
    NotFoundError,
    ProtocolError,
    RemoteError,
    StorageError,
)
from ..format import Manifest, check_name, join_key
from ..format.manifest import BlobEntry
from ..storage import StorageBackend, open_storage
from .cache import ByteLRU
from .metrics import ServerMetrics

logger = logging.getLogger("streaming_weights.server")

TOKEN_ENV = "SURFING_TOKEN"


@dataclass
class _Hosted:
    prefix: str
    manifest: Manifest
    manifest_bytes: bytes


@dataclass(eq=False)
class _Conn:
    ws: ServerConnection
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    inflight: dict[int, asyncio.Task] = field(default_factory=dict)


def _tls_context(cert: str | os.PathLike[str], key: str | os.PathLike[str] | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(cert), str(key) if key else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(f"cannot load TLS certificate {cert!r} / key {key!r}: {exc}") from exc
    return ctx


class WeightServer:
    """Serve one chunked model directory, or a directory of several, over ``ws://`` / ``wss://``.

    Args:
        source: a chunk directory path, ``s3://bucket/prefix``, or a :class:`StorageBackend`.
        chunks_dir: same as a path ``source`` (the original README's keyword).
        storage_backend: same as a backend ``source`` (the original code's keyword).
        prefix: key prefix inside the backend where the model(s) live.
        host: interface to bind; ``127.0.0.1`` unless told otherwise.
        port: TCP port; ``0`` picks a free one (read it from :attr:`port` after :meth:`start`).
        cache_size_mb: the server byte-LRU's budget. Blobs larger than ``max_cached_blob_mb`` (default: a
            quarter of the budget) bypass it and are streamed from storage with ranged reads.
        token: bearer token required at the handshake (``Authorization: Bearer <token>``); default
            ``$SURFING_TOKEN``; ``""`` disables auth even when the variable is set.
        tls_cert, tls_key: PEM files to serve ``wss://`` (also ``use_ssl`` + ``ssl_cert_path`` /
            ``ssl_key_path``, the original names), or a ready ``ssl_context``.
        max_connections: concurrent connections; more are refused with HTTP 503 at the handshake.
        max_inflight_per_connection: concurrent requests per connection; more are answered ``busy``.
        max_request_bytes: largest inbound WebSocket message; larger ones close the connection (1009).
        chunk_bytes: DATA body size.
        write_limit: websockets' transport high-water mark (bytes buffered before a send waits).

    Raises:
        ConfigurationError: no storage given, TLS files unreadable, bad limits.
    """

    def __init__(
        self,
        source: str | os.PathLike[str] | StorageBackend | None = None,
        *,
        chunks_dir: str | os.PathLike[str] | None = None,
        storage_backend: StorageBackend | None = None,
        prefix: str = "",
        host: str = "127.0.0.1",
        port: int = 8765,
        cache_size_mb: float = 100,
        max_cached_blob_mb: float | None = None,
        token: str | None = None,
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
        use_ssl: bool = False,
        ssl_cert_path: str | os.PathLike[str] | None = None,
        ssl_key_path: str | os.PathLike[str] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        max_connections: int = 64,
        max_inflight_per_connection: int = 32,
        max_request_bytes: int = 64 * 1024,
        chunk_bytes: int = proto.DEFAULT_CHUNK_BYTES,
        write_limit: int = 256 * 1024,
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = 20.0,
        close_timeout: float = 2.0,
    ) -> None:
        given = [x for x in (source, chunks_dir, storage_backend) if x is not None]
        if len(given) > 1:
            raise ConfigurationError("pass only one of source, chunks_dir, storage_backend")
        location = given[0] if given else None
        if location is None:
            raise ConfigurationError("WeightServer needs a chunk directory or a storage backend (source=...)")
        if isinstance(location, StorageBackend):
            self.storage, extra = location, ""
        else:
            self.storage, extra = open_storage(str(Path(location)) if isinstance(location, os.PathLike) else location)
        self.prefix = join_key(extra, prefix.strip("/")).strip("/") if prefix else extra
        if min(max_connections, max_inflight_per_connection, max_request_bytes, chunk_bytes) <= 0:
            raise ConfigurationError("server limits must be positive")
        if max_request_bytes < proto.HEADER_SIZE + 64:
            raise ConfigurationError(f"max_request_bytes must be at least {proto.HEADER_SIZE + 64}")
        self.host = host
        self.port = port
        self.token = os.environ.get(TOKEN_ENV) if token is None else token
        self.token = self.token or None
        cert = tls_cert or ssl_cert_path
        key = tls_key or ssl_key_path
        if ssl_context is not None:
            self.ssl_context: ssl.SSLContext | None = ssl_context
        elif cert:
            self.ssl_context = _tls_context(cert, key)
        elif use_ssl:
            raise ConfigurationError("use_ssl=True needs ssl_cert_path/ssl_key_path (or tls_cert/tls_key)")
        else:
            self.ssl_context = None
        cache_bytes = int(cache_size_mb * 2**20)
        max_item = int(max_cached_blob_mb * 2**20) if max_cached_blob_mb is not None else cache_bytes // 4
        self.cache = ByteLRU(cache_bytes, max_item_bytes=max_item)
        self.max_connections = max_connections
        self.max_inflight = max_inflight_per_connection
        self.max_request_bytes = max_request_bytes
        self.chunk_bytes = chunk_bytes
        self.write_limit = write_limit
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.close_timeout = close_timeout
        self.metrics = ServerMetrics(storage=self.storage)
        self.models: dict[str, _Hosted] = {}
        self._server: Server | None = None
        self._conns: set[_Conn] = set()
        #: Most requests seen in flight on one connection (diagnostics and tests).
        self.peak_inflight = 0

    # ------------------------------------------------------------------------------------ lifecycle
    @property
    def scheme(self) -> str:
        return "wss" if self.ssl_context else "ws"

    @property
    def uri(self) -> str:
        host = "localhost" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"{self.scheme}://{host}:{self.port}"

    async def load_models(self) -> dict[str, _Hosted]:
        """(Re)discover the hosted models' manifests. Raises ConfigurationError if there are none."""
        found = await discover_models(self.storage, self.prefix)
        if not found:
            raise ConfigurationError(f"no chunked model (manifest.json) under {self.storage.location}/{self.prefix}")
        self.models = {name: _Hosted(p, m, m.to_bytes()) for name, (p, m) in found.items()}
        return self.models

    async def start(self) -> WeightServer:
        """Load manifests and start listening; returns once the port is bound."""
        if self._server is not None:
            return self
        await self.load_models()
        self._server = await serve(
            self._handle,
            self.host,
            self.port,
            ssl=self.ssl_context,
            process_request=self._process_request,
            compression=None,
            max_size=self.max_request_bytes,
            max_queue=max(16, self.max_inflight),
            write_limit=self.write_limit,
            ping_interval=self.ping_interval,
            ping_timeout=self.ping_timeout,
            close_timeout=self.close_timeout,
            server_header="surfing-weights",
            logger=logging.getLogger("streaming_weights.server.websockets"),
        )
        self.port = self._server.sockets[0].getsockname()[1] if self._server.sockets else self.port
        logger.info("serving %s on %s (%s)", sorted(self.models), self.uri, self.storage.location)
        return self

    async def stop(self) -> None:
        """Stop listening, abandon in-flight responses, close every connection (code 1001).

        A client that stopped reading cannot delay this beyond ``close_timeout``.
        """
        server, self._server = self._server, None
        if server is None:
            return
        for conn in list(self._conns):
            for task in list(conn.inflight.values()):
                task.cancel()
        server.close()
        try:
            await asyncio.wait_for(asyncio.shield(server.wait_closed()), self.close_timeout + 0.5)
        except TimeoutError:
            # A peer that stopped reading leaves our close frame stuck behind unsent data: drop it.
            for conn in list(self._conns):
                conn.ws.transport.abort()
            await server.wait_closed()

    async def start_server(self) -> None:
        """Serve until cancelled (the original API)."""
        await self.start()
        try:
            await asyncio.Future()
        finally:
            await self.stop()

    async def serve_forever(self) -> None:
        await self.start_server()

    async def __aenter__(self) -> WeightServer:
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    # ----------------------------------------------------------------------------------- handshake
    def _process_request(self, connection: ServerConnection, request: HTTPRequest) -> HTTPResponse | None:
        path = request.path.split("?", 1)[0]
        upgrade = "websocket" in request.headers.get("Upgrade", "").lower()
        if path == "/healthz" and not upgrade:
            body = json.dumps({"status": "ok", "models": sorted(self.models), "connections": len(self._conns)})
            return self._http(connection, 200, body.encode(), "application/json")
        if path == "/metrics" and not upgrade:
            self.metrics.cache_bytes.set(self.cache.bytes)
            return self._http(connection, 200, self.metrics.render(), self.metrics.content_type)
        if not upgrade:
            return self._http(connection, 404, b"not found: use a WebSocket client, /healthz or /metrics\n")
        if self.token is not None:
            auth = request.headers.get("Authorization", "")
            scheme, _, given = auth.partition(" ")
            if not auth:
                self.metrics.rejected_handshakes.labels("missing_token").inc()
                resp = self._http(connection, 401, b"missing bearer token\n")
                resp.headers["WWW-Authenticate"] = 'Bearer realm="surfing-weights"'
                return resp
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
                self.metrics.rejected_handshakes.labels("bad_token").inc()
                return self._http(connection, 403, b"invalid bearer token\n")
        # Authenticate first: a client without the token learns nothing, not even that the server is full.
        if len(self._conns) >= self.max_connections:
            self.metrics.rejected_handshakes.labels("busy").inc()
            resp = self._http(connection, 503, b"server busy: too many connections\n")
            resp.headers["Retry-After"] = "1"
            return resp
        return None

    @staticmethod
    def _http(connection: ServerConnection, status: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> HTTPResponse:
        headers = Headers([("Content-Type", ctype), ("Content-Length", str(len(body))), ("Connection", "close")])
        return HTTPResponse(status, http.HTTPStatus(status).phrase, headers, body)

    # ------------------------------------------------------------------------------------- serving
    async def _handle(self, ws: ServerConnection) -> None:
        conn = _Conn(ws)
        self._conns.add(conn)
        self.metrics.active_connections.inc()
        try:
            async for raw in ws:
                self._dispatch(conn, raw)
        except ConnectionClosed:
            pass
        finally:
            self._conns.discard(conn)
            self.metrics.active_connections.dec()
            tasks = list(conn.inflight.values())
            for t in tasks:
                t.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)

    def _dispatch(self, conn: _Conn, raw: str | bytes) -> None:
        if isinstance(raw, str):
            self.metrics.protocol_errors.inc()
            self._spawn_error(conn, 0, proto.ErrorCode.BAD_REQUEST, "text messages are not part of the protocol; send binary")
            return
        try:
            msg = proto.decode(raw)
        except ProtocolError as exc:
            self.metrics.protocol_errors.inc()
            rid = proto.HEADER.unpack_from(raw, 0)[3] if len(raw) >= proto.HEADER_SIZE else 0
            self._spawn_error(conn, rid, proto.ErrorCode.BAD_REQUEST, f"malformed message: {exc}")
            return
        if isinstance(msg, proto.Cancel):
            task = conn.inflight.get(msg.request_id)
            if task is not None:
                task.cancel()
            return
        if not isinstance(msg, proto.Request):
            self.metrics.protocol_errors.inc()
            self._spawn_error(conn, msg.request_id, proto.ErrorCode.BAD_REQUEST, f"clients may not send {type(msg).__name__} messages")
            return
        if msg.request_id in conn.inflight:
            self._spawn_error(conn, msg.request_id, proto.ErrorCode.BAD_REQUEST, f"request id {msg.request_id} is already in flight")
            return
        if len(conn.inflight) >= self.max_inflight:
            self.metrics.requests.labels(msg.op.value, "busy").inc()
            self._spawn_error(conn, msg.request_id, proto.ErrorCode.BUSY,
                              f"more than {self.max_inflight} requests in flight on one connection; wait for some to finish")
            return
        task = asyncio.get_running_loop().create_task(self._serve_request(conn, msg))
        conn.inflight[msg.request_id] = task
        self.peak_inflight = max(self.peak_inflight, len(conn.inflight))
        task.add_done_callback(lambda _t, rid=msg.request_id: conn.inflight.pop(rid, None))

    def _spawn_error(self, conn: _Conn, rid: int, code: proto.ErrorCode, message: str) -> None:
        asyncio.get_running_loop().create_task(self._send_error(conn, rid, code.value, message))

    async def _send(self, conn: _Conn, data: bytes) -> None:
        # One message at a time per connection: each send waits for the transport to drain below
        # write_limit, so a stalled reader makes senders wait instead of the server buffering.
        async with conn.send_lock:
            await conn.ws.send(data)

    async def _send_data(self, conn: _Conn, rid: int, offset: int, piece: bytes | memoryview) -> None:
        """Send one DATA message as a single unmasked binary frame, written straight to the transport.

        Equivalent to ``ws.send(proto.encode_data(...))`` on the wire, without the three 1 MiB copies that
        path makes (header concatenation, frame serialization into a buffer and out of it). websockets'
        ``send_context`` still checks the connection state and applies flow control (drain) afterwards.
        """
        head = proto.encode_header(proto.Kind.DATA, rid, offset)
        async with conn.send_lock:
            ws = conn.ws
            if ws.send_in_progress is not None:  # never the case here; keep websockets' invariants anyway
                await ws.send(head + piece)
                return
            async with ws.send_context():
                ws.transport.write(_binary_frame_header(len(head) + len(piece)) + head)
                ws.transport.write(piece)

    async def _send_error(self, conn: _Conn, rid: int, code: str, message: str) -> None:
        try:
            await self._send(conn, proto.encode(proto.Error(rid, code, message)))
        except ConnectionClosed:
            pass

    async def _serve_request(self, conn: _Conn, req: proto.Request) -> None:
        t0 = time.perf_counter()
        self.metrics.inflight.inc()
        status = "ok"
        try:
            await self._answer(conn, req)
        except asyncio.CancelledError:
            status = "cancelled"
            raise
        except ConnectionClosed:
            status = "disconnected"
        except Exception as exc:
            if isinstance(exc, (RemoteError,)):
                code, message = proto.code_for_exception(exc), str(exc)
            else:
                logger.exception("request %s failed", req)
                code, message = proto.ErrorCode.INTERNAL.value, f"internal server error: {type(exc).__name__}: {exc}"
            status = code
            await self._send_error(conn, req.request_id, code, message)
        finally:
            self.metrics.inflight.dec()
            self.metrics.requests.labels(req.op.value, status).inc()
            self.metrics.request_seconds.labels(req.op.value).observe(time.perf_counter() - t0)

    def _model(self, name: str | None) -> _Hosted:
        return self.models[pick_model(self.models, name, "this server")]

    async def _answer(self, conn: _Conn, req: proto.Request) -> None:
        rid = req.request_id
        if req.op is proto.Op.PING:
            await self._send(conn, proto.encode(proto.Result(rid, {"pong": True, "version": proto.PROTOCOL_VERSION})))
            return
        if req.op is proto.Op.LIST_MODELS:
            await self._send(conn, proto.encode(proto.Result(rid, {"models": sorted(self.models)})))
            return
        hosted = self._model(req.model)
        if req.op is proto.Op.GET_MANIFEST:
            await self._send_bytes(conn, rid, hosted.manifest_bytes)
            return
        assert req.name is not None  # decode() guarantees it for get_unit / get_file
        what = "unit" if req.op is proto.Op.GET_UNIT else "file"
        try:
            check_name(req.name, f"{what} name")
        except ManifestError as exc:
            raise BadRequestError(str(exc)) from None
        try:
            entry = hosted.manifest.unit(req.name) if what == "unit" else hosted.manifest.file(req.name)
        except ManifestError:
            raise NotFoundError(f"model {hosted.manifest.name!r} has no {what} {req.name!r}") from None
        await self._send_blob(conn, rid, hosted, entry)

    async def _send_bytes(self, conn: _Conn, rid: int, data: bytes) -> None:
        await self._send(conn, proto.encode(proto.Result(rid, {"size": len(data)})))
        view = memoryview(data)
        for off in range(0, len(data), self.chunk_bytes):
            piece = view[off : off + self.chunk_bytes]
            await self._send_data(conn, rid, off, piece)
            self.metrics.bytes_sent.inc(len(piece))

    async def _read(self, hosted: _Hosted, entry: BlobEntry, key: str, start: int, length: int) -> bytes:
        try:
            data = await self.storage.read_range(key, start, length)
        except KeyNotFoundError:
            raise NotFoundError(f"{entry.path} of model {hosted.manifest.name!r} is listed in the manifest but missing from storage") from None
        except StorageError as exc:
            raise RemoteError(f"storage error reading {entry.path}: {exc}", code="internal") from exc
        self.metrics.storage_reads.labels(hosted.manifest.name, entry.path).inc()
        self.metrics.storage_read_bytes.labels(hosted.manifest.name, entry.path).inc(len(data))
        if len(data) != length:
            raise RemoteError(f"{entry.path} in storage is shorter than the manifest's {entry.bytes} bytes (truncated?)", code="internal")
        return data

    async def _send_blob(self, conn: _Conn, rid: int, hosted: _Hosted, entry: BlobEntry) -> None:
        key = join_key(hosted.prefix, entry.path)
        if self.cache.cacheable(entry.bytes):
            data, hit = await self.cache.get_or_load(key, lambda: self._read(hosted, entry, key, 0, entry.bytes))
            (self.metrics.cache_hits if hit else self.metrics.cache_misses).inc()
            self.metrics.cache_bytes.set(self.cache.bytes)
            await self._send_bytes(conn, rid, data)
            return
        # Too big for the cache: stream it in ranged reads; read-ahead of one chunk overlaps storage
        # latency with the send while holding at most two chunks for this request.
        size, step = entry.bytes, self.chunk_bytes
        first = await self._read(hosted, entry, key, 0, min(step, size)) if size else b""
        await self._send(conn, proto.encode(proto.Result(rid, {"size": size})))
        off, piece = 0, first
        while off < size:
            nxt = off + len(piece)
            ahead = asyncio.ensure_future(self._read(hosted, entry, key, nxt, min(step, size - nxt))) if nxt < size else None
            try:
                await self._send_data(conn, rid, off, piece)
                self.metrics.bytes_sent.inc(len(piece))
                piece = await ahead if ahead is not None else b""
            except BaseException:
                if ahead is not None:
                    ahead.cancel()
                raise
            off = nxt


def _binary_frame_header(n: int) -> bytes:
    """RFC 6455 §5.2 header of a final, unmasked (server-to-client) binary frame with an n-byte payload."""
    if n < 126:
        return bytes((0x82, n))
    if n < 1 << 16:
        return struct.pack("!BBH", 0x82, 126, n)
    return struct.pack("!BBQ", 0x82, 127, n)


async def run_server(server: WeightServer, *, ready=None) -> None:
    """Run ``server`` until SIGINT/SIGTERM, then close connections gracefully.

    ``ready`` (optional) is called with the server once it listens (the CLI prints the address).
    """
    import signal

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):  # not the main thread / not supported
            pass
    try:
        await server.start()
        if ready is not None:
            ready(server)
        await stop.wait()
        logger.info("shutting down")
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        await server.stop()
