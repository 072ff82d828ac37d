"""Where a client gets manifests and units: the interface, and its storage-backed implementation.

:class:`UnitSource` is what the streaming engine talks to. :class:`StorageSource` reads a local chunk
directory or S3 directly (no server); ``client.transport.WebSocketSource`` talks to a weight server.
Every unit is verified against the manifest's BLAKE3 hash before it is decoded or handed out, and is
decoded zero-copy (tensors are views into the unit's receive buffer).
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from typing import TYPE_CHECKING

from ..exceptions import IntegrityError, ManifestError, NotFoundError, StorageError, UnitFormatError
from ..format import MANIFEST_FILE, Manifest, UnitEntry, blake3_hex, decode_unit, join_key
from ..format.manifest import BlobEntry
from ..storage import StorageBackend
from .buffers import BufferPool

if TYPE_CHECKING:
    import torch


@dataclass
class FetchedUnit:
    """A verified unit: ``tensors`` are views into ``buffer`` (which they keep alive)."""

    name: str
    tensors: dict[str, torch.Tensor]
    nbytes: int
    fetch_seconds: float = 0.0
    buffer: bytearray | None = field(default=None, repr=False)


def check_blake3(entry: BlobEntry, hexdigest: str, where: str) -> None:
    """Raise IntegrityError unless ``hexdigest`` is the manifest's BLAKE3 of ``entry``."""
    if hexdigest != entry.blake3:
        raise IntegrityError(
            f"{entry.path} from {where} does not match its manifest hash (corrupted in storage or in transit); "
            "re-chunk the model or check the server's storage"
        )


def verify_blob(entry: BlobEntry, buf: bytes | bytearray | memoryview, where: str) -> None:
    """Raise IntegrityError unless ``buf`` is exactly the manifest's object."""
    if len(buf) != entry.bytes:
        raise IntegrityError(f"{entry.path} from {where}: got {len(buf)} bytes, manifest says {entry.bytes}")
    check_blake3(entry, blake3_hex(buf), where)


def verify_and_decode(entry: UnitEntry, buf: bytearray, where: str) -> dict[str, torch.Tensor]:
    verify_blob(entry, buf, where)
    return decode_verified(entry, buf, where)


def decode_verified(entry: UnitEntry, buf: bytearray, where: str) -> dict[str, torch.Tensor]:
    """Zero-copy decode of a unit whose bytes were already checked against ``entry``'s hash."""
    try:
        return decode_unit(buf, entry.tensors)
    except UnitFormatError as exc:
        raise UnitFormatError(f"{entry.path} from {where}: {exc}") from exc


def pick_model(models: dict[str, object], name: str | None, where: str) -> str:
    """Resolve a requested model name against the hosted ones (one hosted model serves ``None``)."""
    if name is None:
        if len(models) == 1:
            return next(iter(models))
        raise NotFoundError(f"{where} hosts {len(models)} models; pass model_name= one of {sorted(models)}")
    if name in models:
        return name
    raise NotFoundError(f"{where} does not host model {name!r}; it hosts {sorted(models)}")


class UnitSource(ABC):
    """Async interface the engine uses; all methods run on the client's transport event loop."""

    location: str = ""
    #: Set by the engine: where unit receive buffers come from (and return to once no tensor views them).
    buffer_pool: BufferPool | None = None

    def new_buffer(self, size: int) -> bytearray:
        return self.buffer_pool.take(size) if self.buffer_pool is not None else bytearray(size)

    @abstractmethod
    async def list_models(self) -> list[str]: ...

    @abstractmethod
    async def get_manifest(self, model_name: str | None) -> Manifest:
        """The manifest of ``model_name`` (or of the only hosted model). Raises NotFoundError."""

    @abstractmethod
    async def fetch_unit(self, manifest: Manifest, unit: str) -> FetchedUnit:
        """Fetch, verify and decode one unit. Raises IntegrityError, NotFoundError, WeightServerError…"""

    @abstractmethod
    async def fetch_file(self, manifest: Manifest, name: str) -> bytes:
        """Fetch and verify an auxiliary file (tokenizer, generation config)."""

    async def close(self) -> None:
        pass


async def discover_models(storage: StorageBackend, prefix: str = "") -> dict[str, tuple[str, Manifest]]:
    """Find every ``manifest.json`` under ``prefix``: ``{model name: (model dir prefix, manifest)}``."""
    found: dict[str, tuple[str, Manifest]] = {}
    keys = [k for k in await storage.list(prefix) if k == join_key(prefix, MANIFEST_FILE) or k.endswith("/" + MANIFEST_FILE)]
    for key in keys:
        model_prefix = key[: -len(MANIFEST_FILE)].rstrip("/")
        try:
            manifest = Manifest.from_bytes(await storage.load(key))
        except ManifestError as exc:
            raise ManifestError(f"{storage.location}/{key}: {exc}") from exc
        if manifest.name in found:
            raise ManifestError(f"two models named {manifest.name!r} under {storage.location}: {found[manifest.name][0]!r} and {model_prefix!r}")
        found[manifest.name] = (model_prefix, manifest)
    return found


class StorageSource(UnitSource):
    """Read chunks straight from a :class:`StorageBackend` (local directory, S3…), no server."""

    def __init__(self, storage: StorageBackend, prefix: str = "") -> None:
        self.storage = storage
        self.prefix = prefix.strip("/")
        self.location = f"{storage.location}/{self.prefix}".rstrip("/")
        self._models: dict[str, tuple[str, Manifest]] | None = None
        self._lock = asyncio.Lock()

    async def _catalog(self) -> dict[str, tuple[str, Manifest]]:
        async with self._lock:
            if self._models is None:
                try:
                    self._models = await discover_models(self.storage, self.prefix)
                except StorageError:
                    raise
                if not self._models:
                    raise NotFoundError(f"no chunked model (manifest.json) under {self.location}")
            return self._models

    async def list_models(self) -> list[str]:
        return sorted(await self._catalog())

    async def get_manifest(self, model_name: str | None) -> Manifest:
        models = await self._catalog()
        return models[pick_model(models, model_name, self.location)][1]

    def _key(self, manifest: Manifest, rel: str) -> str:
        return join_key(self._models[manifest.name][0], rel)  # type: ignore[index]

    async def fetch_unit(self, manifest: Manifest, unit: str) -> FetchedUnit:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        entry = manifest.unit(unit)
        buf = self.new_buffer(entry.bytes)
        got = await self.storage.read_into(self._key(manifest, entry.path), buf)
        if got != entry.bytes:
            raise IntegrityError(f"{entry.path} in {self.location} is {got} bytes, manifest says {entry.bytes} (truncated?)")
        tensors = await asyncio.to_thread(verify_and_decode, entry, buf, self.location)
        return FetchedUnit(unit, tensors, entry.bytes, loop.time() - t0, buf)

    async def fetch_file(self, manifest: Manifest, name: str) -> bytes:
        entry = manifest.file(name)
        data = await self.storage.load(self._key(manifest, entry.path))
        verify_blob(entry, data, self.location)
        return data

    async def close(self) -> None:
        await self.storage.close()


def open_unit_source(uri, *, token: str | None = None, timeout_seconds: float = 30.0, max_retries: int = 3,
                     ssl_context=None) -> UnitSource:
    """A source for ``ws://``/``wss://`` URIs, a list of them (failover), ``s3://bucket/prefix``,
    a :class:`StorageBackend`, or a local chunk directory."""
    from ..storage import FilesystemBackend

    if isinstance(uri, UnitSource):
        return uri
    if isinstance(uri, StorageBackend):
        return StorageSource(uri)
    if isinstance(uri, (list, tuple)):
        if len(uri) == 1:
            uri = uri[0]
        else:
            from .failover import FailoverSource

            # Each server gets one quick try: FailoverSource moves on, and the unit cache retries the whole list.
            return FailoverSource([open_unit_source(u, token=token, timeout_seconds=timeout_seconds,
                                                    max_retries=0, ssl_context=ssl_context) for u in uri])
    uri = str(uri)
    if uri.startswith(("ws://", "wss://")):
        from .transport import WebSocketSource

        return WebSocketSource(uri, token=token, timeout_seconds=timeout_seconds, max_retries=max_retries,
                               ssl_context=ssl_context)
    if uri.startswith("s3://"):
        from ..storage.s3 import S3Backend

        bucket, _, prefix = uri[5:].partition("/")
        return StorageSource(S3Backend(bucket), prefix)
    return StorageSource(FilesystemBackend(uri))
