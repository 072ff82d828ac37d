"""The weight server's grouped options: limits and TLS (the storage and auth options are its own arguments).

``WeightServer(source, limits=ServerLimits(max_connections=16), tls=ServerTLS(cert="c.pem", key="k.pem"))``;
the original flat keywords (``max_connections=...``, ``tls_cert=...``, ``use_ssl`` / ``ssl_cert_path`` /
``ssl_key_path``, ``chunks_dir`` / ``storage_backend``) keep working and land in these groups
(:func:`group_legacy`).
"""

from __future__ import annotations

import dataclasses
import os
import ssl
from dataclasses import dataclass
from typing import Any

from .. import protocol as proto
from ..exceptions import ConfigurationError


@dataclass(frozen=True)
class ServerLimits:
    """What one server accepts and how it paces its sockets.

    Attributes:
        max_connections: concurrent client connections; more are refused (busy).
        max_inflight_per_connection: requests one connection may have in flight.
        max_request_bytes: largest inbound WebSocket message; larger ones close the connection (1009).
        chunk_bytes: DATA body size.
        write_limit: websockets' transport high-water mark (bytes buffered before a send waits).
        ping_interval, ping_timeout, close_timeout: websockets' keepalive and close timing (seconds).
        rescan_interval: least seconds between two storage listings for models chunked since start-up.
    """

    max_connections: int = 64
    max_inflight_per_connection: int = 32
    max_request_bytes: int = 64 * 1024
    chunk_bytes: int = proto.DEFAULT_CHUNK_BYTES
    write_limit: int = 256 * 1024
    ping_interval: float | None = 20.0
    ping_timeout: float | None = 20.0
    close_timeout: float = 2.0
    rescan_interval: float = 1.0

    def __post_init__(self) -> None:
        if min(self.max_connections, self.max_inflight_per_connection, self.max_request_bytes, self.chunk_bytes) <= 0:
            raise ConfigurationError("server limits must be positive")
        if self.max_request_bytes < proto.HEADER_SIZE + 64:
            raise ConfigurationError(f"max_request_bytes must be at least {proto.HEADER_SIZE + 64}")


@dataclass(frozen=True)
class ServerTLS:
    """``wss://``: a PEM certificate chain and key, or a ready ``ssl.SSLContext`` (not both)."""

    cert: str | os.PathLike[str] | None = None
    key: str | os.PathLike[str] | None = None
    context: ssl.SSLContext | None = None


_LIMITS = {f.name for f in dataclasses.fields(ServerLimits)}
_TLS = {"tls_cert": "cert", "ssl_cert_path": "cert", "tls_key": "key", "ssl_key_path": "key", "ssl_context": "context"}


def group_legacy(limits: ServerLimits | None, tls: ServerTLS | None,
                 legacy: dict[str, Any]) -> tuple[ServerLimits, ServerTLS | None, bool]:
    """``(limits, tls, use_ssl)`` from the grouped options plus the original flat keywords.

    Raises:
        TypeError: a keyword that is neither (named), or the same option given both ways.
    """
    flat_limits = {k: legacy.pop(k) for k in list(legacy) if k in _LIMITS}
    given = {k: legacy.pop(k) for k in list(legacy) if k in _TLS}
    flat_tls: dict[str, Any] = {}
    for k in _TLS:  # in _TLS's order: tls_cert / tls_key win over the original ssl_*_path spellings
        if given.get(k) is not None:
            flat_tls.setdefault(_TLS[k], given[k])
    use_ssl = bool(legacy.pop("use_ssl", False))
    if legacy:
        raise TypeError(f"WeightServer got unexpected keyword arguments {sorted(legacy)}")
    if flat_limits and limits is not None:
        raise TypeError(f"pass limits=ServerLimits(...) or the flat keywords {sorted(flat_limits)}, not both")
    if flat_tls and tls is not None:
        raise TypeError("pass tls=ServerTLS(...) or tls_cert / tls_key / ssl_context, not both")
    return ServerLimits(**flat_limits) if limits is None else limits, ServerTLS(**flat_tls) if flat_tls else tls, use_ssl


__all__ = ["ServerLimits", "ServerTLS", "group_legacy"]
