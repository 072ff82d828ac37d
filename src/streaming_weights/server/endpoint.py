"""The HTTP side of the server's port, and its addresses: plain responses, bearer-token checks,
peer names, loopback/wildcard tests and one-line bind errors (no I/O)."""

from __future__ import annotations

import errno
import http
import ipaddress
import os
import ssl

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Response as HTTPResponse

from ..exceptions import ConfigurationError
from .access import OPEN, AccessList, Grant
from .metrics import ServerMetrics


def http_response(status: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> HTTPResponse:
    headers = Headers([("Content-Type", ctype), ("Content-Length", str(len(body))), ("Connection", "close")])
    return HTTPResponse(status, http.HTTPStatus(status).phrase, headers, body)


def peer(connection: ServerConnection) -> str:
    addr = connection.remote_address
    return f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) and len(addr) >= 2 else str(addr)


def is_wildcard(host: str | None) -> bool:
    return host in ("0.0.0.0", "::", "", None)


def is_loopback(host: str | None) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address((host or "").strip("[]")).is_loopback
    except ValueError:
        return False


def bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def bind_error(exc: OSError, host: str, port: int) -> ConfigurationError:
    """A one-line error for a failed bind: the port in use, or a host this machine cannot listen on."""
    if exc.errno == errno.EADDRINUSE or "address already in use" in str(exc).lower():
        return ConfigurationError(f"port {port} is in use: stop the other server or choose another port (0 picks a free one)")
    return ConfigurationError(f"cannot listen on host {host!r} port {port}: {exc.strerror or exc}")


def bearer(auth: str) -> str | None:
    """The token of an ``Authorization: Bearer …`` header value (None: missing or another scheme)."""
    scheme, _, given = auth.partition(" ")
    return given.strip() if scheme.lower() == "bearer" and given.strip() else None


def authorize(access: AccessList, auth: str, metrics: ServerMetrics) -> tuple[Grant | None, HTTPResponse | None]:
    """(grant, None) for an accepted ``Authorization`` header, else (None, the refusal: 401 missing / 403 wrong).

    An open server (no tokens) grants everything to everyone."""
    if not access.enabled:
        return OPEN, None
    if not auth:
        metrics.rejected_handshakes.labels("missing_token").inc()
        resp = http_response(401, b"missing bearer token\n")
        resp.headers["WWW-Authenticate"] = 'Bearer realm="surfing-weights"'
        return None, resp
    given = bearer(auth)
    grant = access.grant_for(given) if given is not None else None
    if grant is None:
        metrics.rejected_handshakes.labels("bad_token").inc()
        return None, http_response(403, b"invalid bearer token\n")
    return grant, None


def check_token(token: str, auth: str, metrics: ServerMetrics) -> HTTPResponse | None:
    """The refusal for ``auth`` against one all-models ``token`` (compatibility wrapper of :func:`authorize`)."""
    return authorize(AccessList(token), auth, metrics)[1]


def tls_context(cert: str | os.PathLike[str], key: str | os.PathLike[str] | None) -> ssl.SSLContext:
    """A TLS 1.2+ server context from PEM files. Raises ConfigurationError if they cannot be loaded."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(cert), str(key) if key else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(f"cannot load TLS certificate {cert!r} / key {key!r}: {exc}") from exc
    return ctx


def server_tls(ctx: ssl.SSLContext | None, cert: str | os.PathLike[str] | None,
               key: str | os.PathLike[str] | None, use_ssl: bool) -> ssl.SSLContext | None:
    """The server's TLS context: a given one, one built from PEM files, or None (plain ``ws://``)."""
    if ctx is not None:
        return ctx
    if cert:
        return tls_context(cert, key)
    if use_ssl:
        raise ConfigurationError("use_ssl=True needs ssl_cert_path/ssl_key_path (or tls_cert/tls_key)")
    return None
