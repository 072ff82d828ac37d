"""``StorageSource``: units straight from a storage backend (a chunk directory, S3…), no server."""

from __future__ import annotations

import asyncio

from typing import TYPE_CHECKING

from ..exceptions import IntegrityError, NotFoundError
from ..format import Manifest, join_key
from ..storage import StorageBackend
from ..storage.catalog import StoredModel, discover_stored, pick_model
from .base import FetchedUnit, UnitSource
from .verify import trusted_manifest, verify_and_decode, verify_blob

if TYPE_CHECKING:
    from ..format.signing import TrustPolicy


class StorageSource(UnitSource):
    """Read chunks straight from a :class:`StorageBackend`; ``prefix`` is where the model(s) live in it.

    ``trust``: when set, :meth:`get_manifest` checks the exact stored ``manifest.json`` bytes against
    ``manifest.json.sig`` (SignatureError) before the manifest is used; both were read once, together,
    when the storage was first listed (:func:`~..storage.catalog.discover_stored`).
    """

    def __init__(self, storage: StorageBackend, prefix: str = "", *, trust: TrustPolicy | None = None) -> None:
        self.trust = trust
        self.storage = storage
        self.prefix = prefix.strip("/")
        self.location = f"{storage.location}/{self.prefix}".rstrip("/")
        self._models: dict[str, StoredModel] | None = None
        self._lock = asyncio.Lock()

    async def _catalog(self) -> dict[str, StoredModel]:
        async with self._lock:
            if self._models is None:
                self._models = await discover_stored(self.storage, self.prefix)
                if not self._models:
                    raise NotFoundError(f"no chunked model (manifest.json) under {self.location}")
            return self._models

    async def list_models(self) -> list[str]:
        return sorted(await self._catalog())

    async def get_manifest(self, model_name: str | None) -> Manifest:
        models = await self._catalog()
        stored = models[pick_model(models, model_name, self.location)]
        if self.trust is None:
            return stored.manifest
        where = f"{self.storage.location}/{stored.prefix}".rstrip("/")
        return trusted_manifest(stored.data, stored.signature, self.trust, where)

    async def _key(self, manifest: Manifest, rel: str) -> str:
        models = await self._catalog()
        return join_key(models[pick_model(models, manifest.name, self.location)].prefix, rel)

    async def fetch_unit(self, manifest: Manifest, unit: str) -> FetchedUnit:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        entry = manifest.unit(unit)
        buf = self.new_buffer(entry.bytes)
        got = await self.storage.read_into(await self._key(manifest, entry.path), buf)
        if got != entry.bytes:
            raise IntegrityError(f"{entry.path} in {self.location} is {got} bytes, manifest says {entry.bytes} (truncated?)")
        tensors = await asyncio.to_thread(verify_and_decode, entry, buf, self.location)
        return FetchedUnit(unit, tensors, entry.bytes, loop.time() - t0, buf)

    async def fetch_file(self, manifest: Manifest, name: str) -> bytes:
        entry = manifest.file(name)
        data = await self.storage.load(await self._key(manifest, entry.path))
        verify_blob(entry, data, self.location)
        return data

    async def close(self) -> None:
        await self.storage.close()


__all__ = ["StorageSource"]
