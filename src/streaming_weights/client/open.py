"""From what a user typed to a :class:`UnitSource`: URI normalization, TLS trust, the source kinds."""

from __future__ import annotations

import dataclasses
import os
import re
import ssl
from typing import Any, Sequence, Union

from ..exceptions import ConfigurationError
from ..storage import S3Options, StorageBackend, open_storage
from .base import UnitSource
from .buffers import BufferPool
from .failover import FailoverSource
from .fingerprint import Fingerprints
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
                     manifest_sha256: str | None = None, pool: BufferPool | None = None,
                     s3: S3Options | None = None) -> UnitSource:
    """A source for a ``ws://``/``wss://``/``host:port`` URI, a list of them (failover), ``s3://bucket/prefix``,
    a :class:`StorageBackend`, a local chunk directory, or a ready :class:`UnitSource` (returned as is).

    The source makes one attempt per call; wrap it in ``retry.RetryingSource`` for retries.
    ``max_retries`` (deprecated) does that wrapping here, for callers written before the split.
    ``trusted_keys`` (Ed25519 public key files) / ``manifest_sha256`` (one pinned manifest): every
    ``get_manifest`` checks the manifest's exact bytes first and raises SignatureError if they fail.
    ``pool``: the receive-buffer pool every source built here takes its buffers from. Both are given to each
    source's constructor; nothing is set on a source afterwards. ``s3``: endpoint, region and credentials for
    ``s3://`` locations (botocore makes one attempt per request here).

    Raises:
        ConfigurationError: a malformed URI (see :func:`normalize_uri`), both ``ssl_context`` and ``ca_cert``,
            an unreadable trusted key, or trust asked of a ready source that cannot check it.
    """
    if ssl_context is not None and ca_cert is not None:
        raise ConfigurationError("pass ssl_context or ca_cert, not both")
    if ca_cert is not None:
        ssl_context = client_ssl_context(ca_cert)
    trust = None
    if trusted_keys or manifest_sha256:
        from ..format.signing import TrustPolicy

        trust = TrustPolicy.from_options(trusted_keys, manifest_sha256)
        if isinstance(uri, UnitSource):
            raise ConfigurationError(f"{type(uri).__name__} is already built, so it cannot verify manifest "
                                     "signatures asked for here: give it its trust policy when you build it, or use a "
                                     "ws://, s3:// or directory location with trusted_keys / manifest_sha256")
    source = _Opener(token, timeout_seconds, ssl_context, trust, pool, s3).open(uri)
    if max_retries is None:
        return source
    return RetryingSource(source, RetryPolicy(max_retries=max_retries, timeout_seconds=timeout_seconds))


class _Opener:
    """Builds the source for one location, giving every leaf source the same options."""

    def __init__(self, token: str | None, timeout: float, ctx: ssl.SSLContext | None, trust: Any,
                 pool: BufferPool | None, s3: S3Options | None) -> None:
        self.token, self.timeout, self.ctx, self.trust, self.pool, self.s3 = token, timeout, ctx, trust, pool, s3
        self.fingerprints = Fingerprints()  # one book for every leaf: a unit verified from one server is known

    def open(self, uri: Location) -> UnitSource:
        if isinstance(uri, UnitSource):
            return uri
        if isinstance(uri, StorageBackend):
            return StorageSource(uri, trust=self.trust, pool=self.pool, fingerprints=self.fingerprints)
        if isinstance(uri, (list, tuple)):
            if len(uri) != 1:
                return FailoverSource([self.open(u) for u in uri])
            uri = uri[0]
        text = normalize_uri(os.fspath(uri))  # type: ignore[arg-type]
        if text.startswith(("ws://", "wss://")):
            return WebSocketSource(text, token=self.token, timeout_seconds=self.timeout, ssl_context=self.ctx,
                                   trust=self.trust, pool=self.pool, fingerprints=self.fingerprints)
        # one attempt per S3 request: the client's retry layer (client.retry) is the one that retries
        backend, prefix = open_storage(text, dataclasses.replace(self.s3 or S3Options(), max_attempts=1))
        return StorageSource(backend, prefix, trust=self.trust, pool=self.pool, fingerprints=self.fingerprints)


__all__ = ["client_ssl_context", "normalize_uri", "open_unit_source"]
