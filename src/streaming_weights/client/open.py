"""From what a user typed to a :class:`UnitSource`: URI normalization, TLS trust, the source kinds."""

from __future__ import annotations

import os
import re
import ssl
from typing import Any, Sequence, Union

from ..exceptions import ConfigurationError
from ..storage import FilesystemBackend, StorageBackend
from .base import UnitSource
from .failover import FailoverSource
from .retry import RetryingSource, RetryPolicy
from .storage_source import StorageSource
from .transport import WebSocketSource

Location = Union[str, "os.PathLike[str]", StorageBackend, UnitSource, Sequence[str]]
_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.\-]*):(\d{1,5})(/.*)?$")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")


def normalize_uri(uri: str) -> str:
    """The canonical form of a weight location: ``ws://``/``wss://`` URI, ``s3://`` URI or a local path.

    ``host:port`` (no scheme, not an existing path) means ``ws://host:port``; other strings without a
    scheme are local chunk directories.

    Raises:
        ConfigurationError: an ``http(s)://`` URI (the server speaks WebSocket), or an unknown scheme.
    """
    text = uri.strip()
    m = _SCHEME.match(text)
    if m:
        scheme = m.group(1).lower()
        if scheme in ("ws", "wss", "s3"):
            return scheme + text[len(scheme):]
        if scheme in ("http", "https"):
            hint = "wss" if scheme == "https" else "ws"
            raise ConfigurationError(f"{uri!r} is an HTTP URI; weight servers speak WebSocket: use ws:// or wss:// "
                                     f"(e.g. {hint}://{text[m.end():]})")
        raise ConfigurationError(f"unsupported URI scheme {scheme!r} in {uri!r}: use ws://, wss://, s3:// or a path")
    if _HOST_PORT.match(text) and not os.path.exists(text):
        return f"ws://{text}"
    return text


def client_ssl_context(ca_cert: str | os.PathLike[str] | None = None) -> ssl.SSLContext:
    """A verifying TLS context: the system trust store, plus ``ca_cert`` (a PEM file) for a private CA.

    Raises:
        ConfigurationError: ``ca_cert`` cannot be read as PEM certificates.
    """
    ctx = ssl.create_default_context()
    if ca_cert is not None:
        try:
            ctx.load_verify_locations(cafile=os.fspath(ca_cert))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigurationError(f"cannot load CA certificate {os.fspath(ca_cert)!r}: {exc}") from exc
    return ctx


def open_unit_source(uri: Location, *, token: str | None = None, timeout_seconds: float = 30.0,
                     ssl_context: ssl.SSLContext | None = None, ca_cert: str | os.PathLike[str] | None = None,
                     max_retries: int | None = None, trusted_keys: Sequence[Any] | None = None,
                     manifest_sha256: str | None = None) -> UnitSource:
    """A source for a ``ws://``/``wss://``/``host:port`` URI, a list of them (failover), ``s3://bucket/prefix``,
    a :class:`StorageBackend`, a local chunk directory, or a ready :class:`UnitSource` (returned as is).

    The source makes one attempt per call; wrap it in ``retry.RetryingSource`` for retries.
    ``max_retries`` (deprecated) does that wrapping here, for callers written before the split.
    ``trusted_keys`` (Ed25519 public key files) / ``manifest_sha256`` (one pinned manifest): every
    ``get_manifest`` checks the manifest's exact bytes first and raises SignatureError if they fail.

    Raises:
        ConfigurationError: a malformed URI (see :func:`normalize_uri`), both ``ssl_context`` and ``ca_cert``,
            an unreadable trusted key, or trust asked of a ready source that cannot check it.
    """
    if ssl_context is not None and ca_cert is not None:
        raise ConfigurationError("pass ssl_context or ca_cert, not both")
    if ca_cert is not None:
        ssl_context = client_ssl_context(ca_cert)
    source = _open(uri, token, timeout_seconds, ssl_context)
    if trusted_keys or manifest_sha256:
        from ..format.signing import TrustPolicy

        set_trust(source, TrustPolicy.from_options(trusted_keys, manifest_sha256))
    if max_retries is None:
        return source
    return RetryingSource(source, RetryPolicy(max_retries=max_retries, timeout_seconds=timeout_seconds))


def set_trust(source: UnitSource, trust: Any) -> None:
    """Make every leaf source under ``source`` (retry and failover wrappers included) check manifests with
    ``trust``. Raises ConfigurationError for a source that cannot (it never sees the manifest's bytes)."""
    inner = getattr(source, "sources", None)
    if inner is None and isinstance(getattr(source, "source", None), UnitSource):  # RetryingSource & co.
        inner = [source.source]  # type: ignore[attr-defined]
    if inner:
        for s in inner:
            set_trust(s, trust)
    elif isinstance(source, (WebSocketSource, StorageSource)):
        source.trust = trust
    else:
        raise ConfigurationError(f"{type(source).__name__} cannot verify manifest signatures; use a ws://, "
                                 "s3:// or directory location with trusted_keys / manifest_sha256")


def _open(uri: Location, token: str | None, timeout: float, ctx: ssl.SSLContext | None) -> UnitSource:
    if isinstance(uri, UnitSource):
        return uri
    if isinstance(uri, StorageBackend):
        return StorageSource(uri)
    if isinstance(uri, (list, tuple)):
        if len(uri) != 1:
            return FailoverSource([_open(u, token, timeout, ctx) for u in uri])
        uri = uri[0]
    text = normalize_uri(os.fspath(uri))  # type: ignore[arg-type]
    if text.startswith(("ws://", "wss://")):
        return WebSocketSource(text, token=token, timeout_seconds=timeout, ssl_context=ctx)
    if text.startswith("s3://"):
        from ..storage.s3 import S3Backend

        bucket, _, prefix = text[5:].partition("/")
        return StorageSource(S3Backend(bucket), prefix)
    return StorageSource(FilesystemBackend(text))


__all__ = ["client_ssl_context", "normalize_uri", "open_unit_source", "set_trust"]
