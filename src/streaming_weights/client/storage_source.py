"""``StorageSource``: units straight from a storage backend (a chunk directory, S3…), no server."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from ..exceptions import IntegrityError, KeyNotFoundError, NotFoundError
from ..format import Manifest, UnitEntry, join_key
from ..storage import StorageBackend
from ..storage.catalog import StoredModel, discover_stored, pick_model, read_stored
from .base import FetchedUnit, UnitSource
from .buffers import BufferPool
from .fingerprint import Fingerprints
from .verify import decode_verified, trusted_manifest, verify_blob

if TYPE_CHECKING:
    from ..format.signing import TrustPolicy


class StorageSource(UnitSource):
    """Read chunks straight from a :class:`StorageBackend`; ``prefix`` is where the model(s) live in it.

    Every :meth:`get_manifest` returns what the storage holds now: a model chunked there since the storage
    was first listed is found (a name the catalog does not know lists the storage again), and a re-chunked
    model's manifest is read again (so a unit that no longer matches an older manifest can be told apart
    from a corrupted one: :class:`~streaming_weights.exceptions.ModelChangedError`).

    ``trust``: when set, :meth:`get_manifest` checks the exact stored ``manifest.json`` bytes against
    ``manifest.json.sig`` (SignatureError) before the manifest is used. ``fingerprints``: where re-read units'
    fingerprints are kept (:mod:`.fingerprint`; default: its own).
    """

    def __init__(self, storage: StorageBackend, prefix: str = "", *, trust: TrustPolicy | None = None,
                 pool: BufferPool | None = None, fingerprints: Fingerprints | None = None) -> None:
        self.trust = trust
        self.buffer_pool = pool
        self.fingerprints = fingerprints if fingerprints is not None else Fingerprints()
        self.storage = storage
        self.prefix = prefix.strip("/")
        self.location = f"{storage.location}/{self.prefix}".rstrip("/")
        self._models: dict[str, StoredModel] | None = None
        self._lock = asyncio.Lock()

    async def _catalog(self, *, again: bool = False) -> tuple[dict[str, StoredModel], bool]:
        """(the models, whether they were just read from the storage)."""
        async with self._lock:
            fresh = self._models is None or again
            if fresh:
                self._models = await discover_stored(self.storage, self.prefix)
            assert self._models is not None
            if not self._models:
                raise NotFoundError(f"no chunked model (manifest.json) under {self.location}")
            return self._models, fresh

    async def list_models(self) -> list[str]:
        return sorted((await self._catalog(again=self._models is not None))[0])

    async def get_manifest(self, model_name: str | None) -> Manifest:
        stored = await self._current(model_name)
        if self.trust is None:
            return stored.manifest
        where = f"{self.storage.location}/{stored.prefix}".rstrip("/")
        return trusted_manifest(stored.data, stored.signature, self.trust, where)

    async def _current(self, model_name: str | None) -> StoredModel:
        """``model_name``'s stored model as the storage holds it now."""
        models, fresh = await self._catalog()
        try:
            stored = models[pick_model(models, model_name, self.location)]
        except NotFoundError:
            if fresh:
                raise
            models, fresh = await self._catalog(again=True)  # chunked since the storage was listed?
            stored = models[pick_model(models, model_name, self.location)]
        if fresh:
            return stored
        try:
            now = await read_stored(self.storage, stored.prefix)
        except KeyNotFoundError:
            raise NotFoundError(f"model {stored.manifest.name!r} is no longer in {self.location}") from None
        async with self._lock:
            models.pop(stored.manifest.name, None)
            models[now.manifest.name] = now
        return now

    async def _key(self, manifest: Manifest, rel: str) -> str:
        models = (await self._catalog())[0]
        return join_key(models[pick_model(models, manifest.name, self.location)].prefix, rel)

    async def fetch_unit(self, manifest: Manifest, unit: str) -> FetchedUnit:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        entry = manifest.unit(unit)
        buf = self.new_buffer(entry.bytes)
        key = await self._key(manifest, entry.path)
        verifier = self.fingerprints.verifier(entry)  # fed as the bytes land (a directory: while later pieces are read)
        self._check_size(entry, await self.storage.read_into(key, buf, on_piece=verifier.update))
        verifier.check(self.location)
        tensors = decode_verified(entry, buf, self.location)
        return FetchedUnit(unit, tensors, entry.bytes, loop.time() - t0, buf)

    def _check_size(self, entry: UnitEntry, got: int) -> None:
        if got != entry.bytes:
            raise IntegrityError(f"{entry.path} in {self.location} is {got} bytes, manifest says {entry.bytes} (truncated?)")

    async def fetch_file(self, manifest: Manifest, name: str) -> bytes:
        entry = manifest.file(name)
        data = await self.storage.load(await self._key(manifest, entry.path))
        verify_blob(entry, data, self.location)
        return data

    async def close(self) -> None:
        await self.storage.close()


__all__ = ["StorageSource"]
