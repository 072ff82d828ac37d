"""``WeightServer``: serves chunked models' bytes over WebSocket (protocol v1, see docs/protocol.md).

This module is the asyncio pump: websockets runs the connections, :class:`~.handler.RequestHandler`
decides what each message gets (sans-I/O), and this code executes that plan. The server never
deserializes tensors: the handler validates each request against the hosted manifests; the pump has
:class:`~.blobs.BlobSender` send the blob as raw DATA messages (from a byte-bounded LRU for blobs that
fit it; larger ones with ``sendfile`` from a local directory or in ``chunk_bytes`` ranged reads). Every send is awaited, one message at a time
per connection, so a client that stops reading stalls only its own requests and the server holds at
most about one chunk per in-flight request plus ``write_limit`` for it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request as HTTPRequest
from websockets.http11 import Response as HTTPResponse

from .. import protocol as proto
from ..config import token_from_env
from ..exceptions import ConfigurationError
from ..storage import StorageBackend
from .access import OPEN, AccessList, Grant
from .cache import ByteLRU
from .endpoint import authorize, bearer, bind_error, bracket, http_response, is_loopback, is_wildcard, peer, server_tls
from .handler import Answer, Cancel, Hosted, Reject, RequestHandler, error_reply
from .hosting import Catalog, answer_current
from .hosting import resolve_storage as _resolve_storage  # compatibility: it lived here
from .blobs import BlobSender
from .metrics import ServerMetrics
from .options import ServerLimits, ServerTLS, group_legacy
from .sending import DirectWriter

logger = logging.getLogger("streaming_weights.server")

_Hosted = Hosted  # compatibility alias


@dataclass(eq=False)


class _Conn:
    ws: ServerConnection
    peer: str = "?"
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    inflight: dict[int, asyncio.Task] = field(default_factory=dict)
    secret: str | None = None  # its bearer token, to re-check the grant when the token file is reloaded
    grant: Grant = OPEN
    writer: DirectWriter | None = None  # DATA frames (zero-copy on plain connections)


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
        token_file: per-model tokens, one ``TOKEN [MODEL[,MODEL...]]`` per line (no models: all), re-read
            by :meth:`reload_access` (SIGHUP under :func:`run_server`); combines with ``token``.
        tls: :class:`~.options.ServerTLS` to serve ``wss://`` (the original flat keywords ``tls_cert`` /
            ``tls_key``, ``use_ssl`` + ``ssl_cert_path`` / ``ssl_key_path`` and ``ssl_context`` still work).
        limits: :class:`~.options.ServerLimits` (connections, in-flight requests, message and frame sizes,
            keepalive, storage rescans); its field names also work as flat keywords (``max_connections=16``).
        pacer: a :class:`~.pacing.TokenBucket` every connection's sends wait on (``surfing serve --max-rate``).

    Raises:
        ConfigurationError: no storage given, TLS files unreadable, bad limits.
    """

    def __init__(
        self,
        source: str | os.PathLike[str] | StorageBackend | None = None,
        *,
        prefix: str = "",
        host: str = "127.0.0.1",
        port: int = 8765,
        cache_size_mb: float = 100,
        max_cached_blob_mb: float | None = None,
        token: str | None = None,
        token_file: str | os.PathLike[str] | None = None,
        tls: ServerTLS | None = None,
        limits: ServerLimits | None = None,
        pacer: Any = None,
        chunks_dir: str | os.PathLike[str] | None = None,
        storage_backend: StorageBackend | None = None,
        **legacy: Any,
    ) -> None:
        self.storage, self.prefix = _resolve_storage(source, chunks_dir, storage_backend, prefix)
        self.limits, tls, use_ssl = group_legacy(limits, tls, legacy)
        self.host, self.port = host, port
        #: Optional :class:`~.pacing.TokenBucket` shared by all connections (``surfing serve --max-rate``).
        self.pacer = pacer
        self.token = (token_from_env() if token is None else token) or None
        self.access = AccessList(self.token, token_file)
        tls = tls or ServerTLS()
        self.ssl_context = server_tls(tls.context, tls.cert, tls.key, use_ssl)
        cache_bytes = int(cache_size_mb * 2**20)
        max_item = int(max_cached_blob_mb * 2**20) if max_cached_blob_mb is not None else cache_bytes // 4
        self.cache = ByteLRU(cache_bytes, max_item_bytes=max_item)
        lim = self.limits
        self.max_connections, self.max_inflight = lim.max_connections, lim.max_inflight_per_connection
        self.max_request_bytes, self.chunk_bytes, self.write_limit = lim.max_request_bytes, lim.chunk_bytes, lim.write_limit
        self.ping_interval, self.ping_timeout, self.close_timeout = lim.ping_interval, lim.ping_timeout, lim.close_timeout
        self.metrics = ServerMetrics(storage=self.storage)
        self.catalog = Catalog(self.storage, self.prefix, rescan_interval=lim.rescan_interval, cache=self.cache)
        self.models: dict[str, Hosted] = self.catalog.models
        self.handler = RequestHandler(self.models, max_inflight=self.max_inflight)
        self.blobs = BlobSender(self)
        self._server: Server | None = None
        self._conns: set[_Conn] = set()
        # handshake -> connection handler: who authenticated, kept only while the connection object lives
        self._auth: weakref.WeakKeyDictionary[ServerConnection, tuple[str | None, Grant]] = weakref.WeakKeyDictionary()
        #: Most requests seen in flight on one connection (diagnostics and tests).
        self.peak_inflight = 0

    # ------------------------------------------------------------------------------------ lifecycle
    @property
    def scheme(self) -> str:
        return "wss" if self.ssl_context else "ws"

    @property
    def uri(self) -> str:
        """An address clients on this machine can connect to (``localhost`` for a wildcard bind)."""
        host = "localhost" if is_wildcard(self.host) else self.host
        return f"{self.scheme}://{bracket(host)}:{self.port}"

    @property
    def listen_uri(self) -> str:
        """The address really listened on (``ws://0.0.0.0:8765`` for all interfaces)."""
        return f"{self.scheme}://{bracket(self.host or '0.0.0.0')}:{self.port}"

    async def load_models(self) -> dict[str, Hosted]:
        return await self.catalog.load()  # (re)discover the manifests; ConfigurationError if there are none

    def reload_access(self) -> None:
        """Re-read the token file; open connections whose token is gone are closed (1008), the others get
        their new grant at once. Raises ConfigurationError (unreadable/malformed file: old tokens stay)."""
        if self.access.token_file is None:
            return  # nothing to re-read: --token / $SURFING_TOKEN only
        self.access.reload()
        for conn in list(self._conns):
            grant = self.access.grant_for(conn.secret or "") if self.access.enabled else OPEN
            if grant is None:
                logger.warning("closing connection from %s: its token was revoked", conn.peer)
                asyncio.get_running_loop().create_task(conn.ws.close(1008, "token revoked"))
            else:
                conn.grant = grant
        logger.info("reloaded %d token(s) from %s", len(self.access.entries), self.access.token_file)

    async def start(self) -> WeightServer:
        """Load manifests and start listening; returns once the port is bound.

        Raises:
            ConfigurationError: no models, the port is in use, or ``host`` cannot be bound (one-line message).
        """
        if self._server is not None:
            return self
        await self.load_models()
        try:
            self._server = await serve(
                self._handle, self.host, self.port, ssl=self.ssl_context, process_request=self._process_request,
                compression=None, max_size=self.max_request_bytes, max_queue=max(16, self.max_inflight),
                write_limit=self.write_limit, ping_interval=self.ping_interval, ping_timeout=self.ping_timeout,
                close_timeout=self.close_timeout, server_header="surfing-weights",
                logger=logging.getLogger("streaming_weights.server.websockets"),
            )
        except OSError as exc:
            raise bind_error(exc, self.host, self.port) from None
        self.port = self._server.sockets[0].getsockname()[1] if self._server.sockets else self.port
        logger.info("serving %s on %s (%s, %s)", ", ".join(sorted(self.models)), self.listen_uri,
                    self.storage.location, "token auth" if self.access.enabled else "no auth")
        if not self.access.enabled and not is_loopback(self.host):
            logger.warning("listening beyond loopback (%s) without a token: anyone who can reach port %d can read "
                           "the weights; set a token", self.host or "0.0.0.0", self.port)
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
        auth = request.headers.get("Authorization", "")
        if not upgrade:
            return self._http_get(path, auth)
        grant, refusal = authorize(self.access, auth, self.metrics)
        if refusal is not None:
            logger.warning("rejected connection from %s: %s", peer(connection), refusal.body.decode().strip())
            return refusal
        self._auth[connection] = (bearer(auth), grant or OPEN)
        # Authenticate first: a client without the token learns nothing, not even that the server is full.
        if len(self._conns) >= self.max_connections:
            self.metrics.rejected_handshakes.labels("busy").inc()
            logger.warning("refused connection from %s: %d connections already open", peer(connection), len(self._conns))
            resp = http_response(503, b"server busy: too many connections\n")
            resp.headers["Retry-After"] = "1"
            return resp
        return None

    def _http_get(self, path: str, auth: str) -> HTTPResponse:
        """``/healthz`` (models: only those the presented token may read) and ``/metrics`` (its labels name
        models, so with tokens configured it needs a token allowed every model)."""
        given = bearer(auth)
        grant = (self.access.grant_for(given) if given else None) if self.access.enabled else OPEN
        if path == "/healthz":
            models = sorted(grant.visible(self.models)) if grant is not None else []
            body = json.dumps({"status": "ok", "models": models, "connections": len(self._conns)})
            return http_response(200, body.encode(), "application/json")
        if path == "/metrics":
            if grant is None or not grant.everything:
                return http_response(401 if not auth else 403, b"metrics need a token allowed every model\n")
            self.metrics.cache_bytes.set(self.cache.bytes)
            return http_response(200, self.metrics.render(), self.metrics.content_type)
        return http_response(404, b"not found: use a WebSocket client, /healthz or /metrics\n")

    # ------------------------------------------------------------------------------------- serving
    async def _handle(self, ws: ServerConnection) -> None:
        secret, grant = self._auth.pop(ws, (None, OPEN))
        conn = _Conn(ws, peer(ws), secret=secret, grant=grant, writer=DirectWriter(ws.transport))
        self._conns.add(conn)
        self.metrics.active_connections.inc()
        logger.info("connection from %s", conn.peer)
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
            try:
                if tasks:
                    await asyncio.gather(*tasks, return_exceptions=True)
            finally:  # also when this handler is cancelled: the writer's duplicate descriptor keeps the socket open
                conn.writer.close()

    def _dispatch(self, conn: _Conn, raw: str | bytes) -> None:
        plan = self.handler.plan(raw, conn.inflight, conn.grant)
        if isinstance(plan, Cancel):
            task = conn.inflight.get(plan.request_id)
            if task is not None:
                task.cancel()
            return
        loop = asyncio.get_running_loop()
        if isinstance(plan, Reject):
            if plan.reason == "protocol":
                self.metrics.protocol_errors.inc()
            elif plan.op is not None:
                self.metrics.requests.labels(plan.op.value, plan.code).inc()
            logger.info("refused a message from %s: %s", conn.peer, plan.message)
            loop.create_task(self._send_error(conn, plan.request_id, plan.code, plan.message))
            return
        task = loop.create_task(self._serve_request(conn, plan))
        conn.inflight[plan.request_id] = task
        self.peak_inflight = max(self.peak_inflight, len(conn.inflight))
        task.add_done_callback(lambda _t, rid=plan.request_id: conn.inflight.pop(rid, None))

    async def _send(self, conn: _Conn, data: bytes) -> None:
        # One message at a time per connection: each send waits for the transport to drain below
        # write_limit, so a stalled reader makes senders wait instead of the server buffering.
        async with conn.send_lock:
            await conn.ws.send(data)

    async def _send_error(self, conn: _Conn, rid: int, code: str, message: str) -> None:
        try:
            await self._send(conn, proto.encode(proto.Error(rid, code, message)))
        except ConnectionClosed:
            pass

    async def _serve_request(self, conn: _Conn, plan: Answer) -> None:
        t0 = time.perf_counter()
        self.metrics.inflight.inc()
        status = "ok"
        try:
            if plan.refresh:  # it depends on what the storage holds now
                plan = await answer_current(self.catalog, self.handler, plan, conn.grant)
            status = await self._execute(conn, plan)
        except asyncio.CancelledError:
            status = "cancelled"
            raise
        except ConnectionClosed:
            status = "disconnected"
        except Exception as exc:
            code, message, expected = error_reply(exc)
            status = code
            logger.debug("%s failed", plan.op.value, exc_info=not expected)
            await self._fail(conn, plan, code, message, expected)
        finally:
            self.metrics.inflight.dec()
            self.metrics.requests.labels(plan.op.value, status).inc()
            self.metrics.request_seconds.labels(plan.op.value).observe(time.perf_counter() - t0)

    async def _fail(self, conn: _Conn, plan: Answer, code: str, message: str, expected: bool) -> None:
        what = " ".join(x for x in (plan.op.value, plan.entry.path if plan.entry else plan.model) if x)
        level = logging.INFO if expected else logging.WARNING
        logger.log(level, "%s for %s failed: %s", what, conn.peer, message)
        await self._send_error(conn, plan.request_id, code, message)

    async def _execute(self, conn: _Conn, plan: Answer) -> str:
        """Carry out ``plan``; return its status for the metrics (``ok`` or the error code sent)."""
        if plan.error is not None:
            code, message = plan.error
            await self._fail(conn, plan, code, message, True)
            return code
        if plan.body is not None:
            await self._send(conn, proto.encode(proto.Result(plan.request_id, plan.body)))
        elif plan.data is not None:
            await self.blobs.send_bytes(conn, plan.request_id, plan.data)
        else:
            assert plan.entry is not None
            await self.blobs.send_blob(conn, plan.request_id, plan.model, plan.entry, plan.key)
        return "ok"
