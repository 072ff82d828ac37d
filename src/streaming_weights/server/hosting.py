"""What a server hosts: the storage it reads, and each model's manifest bytes (verbatim) and signature,
kept in step with the storage by :class:`Catalog` (models chunked, re-chunked or removed while it runs)."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from collections.abc import Collection
from typing import Any, Callable

from ..exceptions import ConfigurationError, KeyNotFoundError, ManifestError, NotFoundError, StorageError
from ..format import join_key
from ..format.names import SIGNATURE_FILE
from ..protocol import Op
from ..storage import StorageBackend, open_storage
from ..storage.catalog import StoredModel, discover_stored, manifest_prefixes, read_stored
from .access import Grant
from .cache import ByteLRU
from .handler import Answer, Hosted, RequestHandler

logger = logging.getLogger("streaming_weights.server")


async def load_hosted(storage: StorageBackend, prefix: str) -> dict[str, Hosted]:
    """``{model name: Hosted}`` for every manifest under ``prefix``, with the stored bytes kept exactly as
    written (a signature is over those bytes, so the server must never re-serialize them).

    Raises:
        ConfigurationError: no manifest under ``prefix``.
        ManifestError: a manifest is malformed, or two name the same model.
    """
    found = await discover_stored(storage, prefix)
    if not found:
        raise ConfigurationError(f"no chunked model (manifest.json) under {storage.location}/{prefix}")
    hosted: dict[str, Hosted] = {}
    for name, stored in found.items():
        # the bytes we serve are the bytes we validated (and the ones a signature covers)
        hosted[name] = Hosted(stored.prefix, stored.manifest, stored.data, stored.signature)
    return hosted


def resolve_storage(source: Any, chunks_dir: Any, storage_backend: StorageBackend | None,
                    prefix: str) -> tuple[StorageBackend, str]:
    """(backend, key prefix) from the constructor's three spellings of "where the models are"."""
    given = [x for x in (source, chunks_dir, storage_backend) if x is not None]
    if len(given) > 1:
        raise ConfigurationError("pass only one of source, chunks_dir, storage_backend")
    if not given:
        raise ConfigurationError("WeightServer needs a chunk directory or a storage backend (source=...)")
    location = given[0]
    if isinstance(location, StorageBackend):
        storage, extra = location, ""
    else:
        storage, extra = open_storage(str(Path(location)) if isinstance(location, os.PathLike) else location)
    return storage, (join_key(extra, prefix.strip("/")).strip("/") if prefix else extra)


class Catalog:
    """The models a server hosts (:attr:`models`, ``{name: Hosted}``, one dict updated in place), kept in
    step with the storage while the server runs.

    * :meth:`refresh` re-reads one model's ``manifest.json`` (and signature): a server answers every
      ``get_manifest`` with what the storage holds now, so a re-chunked model is served with the manifest
      that matches its units, never the one read at start-up.
    * :meth:`rescan` lists the storage again and reads its manifests: a request naming a model the server
      does not know (or ``list_models``) finds a model chunked after start-up. Rescans are coalesced and
      at most one starts per ``rescan_interval`` seconds, so requests for unknown names cannot hammer the
      storage; a request waits for a rescan that starts after it arrived.

    Manifests are read from the storage under any cache in front of it (its ``inner`` backend): they are
    how the server knows which bytes are current. A manifest that turns malformed while serving is logged
    and its model withdrawn; it never stops the server. When a model's stored manifest changes or vanishes,
    the bytes cached for it (the server's ``cache``, a shared cache's entries) are dropped.
    """

    def __init__(self, storage: StorageBackend, prefix: str, *, rescan_interval: float = 1.0,
                 cache: ByteLRU | None = None) -> None:
        self.cached = storage  # the storage the server reads blobs through (it may be a shared cache)
        self.storage = getattr(storage, "inner", storage)
        self.cache = cache
        self.prefix = prefix
        self.rescan_interval = rescan_interval
        self.models: dict[str, Hosted] = {}
        self._stored: dict[str, tuple[bytes, bytes | None]] = {}  # prefix -> (manifest bytes, signature) as stored
        self._scan_lock = asyncio.Lock()
        self._scanned_at = float("-inf")
        self._read_locks: dict[str, asyncio.Lock] = {}
        self._read_at: dict[str, float] = {}

    async def load(self) -> dict[str, Hosted]:
        """The start-up discovery: strict (raises what :func:`load_hosted` raises)."""
        found = await discover_stored(self.storage, self.prefix)
        if not found:
            raise ConfigurationError(f"no chunked model (manifest.json) under {self.storage.location}/{self.prefix}")
        self._scanned_at = asyncio.get_running_loop().time()
        await self._apply({s.prefix: s for s in found.values()})
        return self.models

    async def rescan(self, satisfied: Callable[[], bool] | None = None) -> None:
        """Discover the storage's models again (coalesced, at most one start per ``rescan_interval``), unless
        a rescan that started after this call has finished, or ``satisfied()`` says the last one was enough."""
        loop = asyncio.get_running_loop()
        arrived = loop.time()
        async with self._scan_lock:
            if self._scanned_at >= arrived or (satisfied is not None and satisfied()):
                return
            wait = self._scanned_at + self.rescan_interval - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            self._scanned_at = loop.time()
            try:
                prefixes, listed = await manifest_prefixes(self.storage, self.prefix)
            except StorageError as exc:
                logger.warning("cannot list %s to find new models: %s", self.storage.location, exc)
                return
            found: dict[str, StoredModel] = {}
            unread: set[str] = set()  # a storage error: keep serving what was read before
            for p in prefixes:
                try:
                    stored = await self._read(p, signed=join_key(p, SIGNATURE_FILE) in listed)
                except StorageError:
                    unread.add(p)
                    continue
                if stored is not None:
                    found[p] = stored
            await self._apply(found, keep=unread)

    async def refresh(self, name: str) -> None:
        """Re-read hosted model ``name``'s manifest from the storage (coalesced per model)."""
        hosted = self.models.get(name)
        if hosted is None:
            return
        loop = asyncio.get_running_loop()
        arrived, prefix = loop.time(), hosted.prefix
        async with self._read_locks.setdefault(prefix, asyncio.Lock()):
            if self._read_at.get(prefix, float("-inf")) >= arrived:
                return
            self._read_at[prefix] = loop.time()
            try:
                stored = await self._read(prefix)
            except StorageError:
                return  # keep serving what was read before
            await self._apply({prefix: stored} if stored is not None else {}, only=prefix)

    async def _read(self, prefix: str, *, signed: bool | None = None) -> StoredModel | None:
        """The model under ``prefix`` as stored now; None when it is gone or its manifest is malformed (logged).
        Raises StorageError (logged) when the storage could not say."""
        try:
            return await read_stored(self.storage, prefix, signed=signed)
        except KeyNotFoundError:
            return None
        except ManifestError as exc:
            logger.warning("not serving the model under %r: %s", prefix, exc)
            return None
        except StorageError as exc:
            logger.warning("cannot re-read the manifest under %r: %s", prefix, exc)
            raise

    async def _apply(self, found: dict[str, StoredModel], *, only: str | None = None, keep: Collection[str] = ()) -> None:
        """Make :attr:`models` hold ``found`` (``{prefix: StoredModel}``): for prefix ``only``, or (``None``)
        for every prefix but those in ``keep``; unchanged models keep their ``Hosted``."""
        by_prefix = {h.prefix: (name, h) for name, h in self.models.items()}
        changed: list[Hosted] = []
        for prefix in set(by_prefix) | set(found):
            if prefix in keep or (only is not None and prefix != only):
                continue
            stored, (name, old) = found.get(prefix), by_prefix.get(prefix, ("", None))
            if old is not None and stored is not None and self._stored.get(prefix) == (stored.data, stored.signature):
                continue  # unchanged: keep serving the same Hosted
            if old is not None:
                changed.append(self.models.pop(name))
                self._stored.pop(prefix, None)
            if stored is not None:
                if stored.manifest.name in self.models:
                    logger.warning("two models named %r: serving %r, not %r", stored.manifest.name,
                                   self.models[stored.manifest.name].prefix, prefix)
                    continue
                self.models[stored.manifest.name] = Hosted(prefix, stored.manifest, stored.data, stored.signature)
                self._stored[prefix] = (stored.data, stored.signature)
                logger.info("serving %r from %r%s", stored.manifest.name, prefix, " (changed)" if old else "")
        for old in changed:
            await self._forget(old)

    async def _forget(self, old: Hosted) -> None:
        keys = [join_key(old.prefix, b.path) for b in (*old.manifest.units, *old.manifest.files)]
        if self.cache is not None:
            self.cache.discard(keys)
        invalidate = getattr(self.cached, "invalidate", None) if self.cached is not self.storage else None
        for key in keys if invalidate is not None else ():
            await invalidate(key)


async def answer_current(catalog: Catalog, handler: RequestHandler, plan: Answer, grant: Grant) -> Answer:
    """Answer ``plan``'s request again once ``catalog`` is up to date for it (:attr:`Answer.refresh`):
    ``get_manifest`` after re-reading that model's manifest (and, if it is gone, a rescan); an unknown
    model name and ``list_models`` after a rescan."""
    assert plan.request is not None and plan.refresh
    req = plan.request

    def found() -> bool:  # the model is known now (a rescan that ran while this request waited found it)
        again = handler.answer(req, grant)
        return again.error is None or again.error[0] != NotFoundError.code

    if plan.refresh == "manifest":
        await catalog.refresh(plan.model)
        if found():
            return handler.answer(req, grant)
    await catalog.rescan(None if req.op is Op.LIST_MODELS else found)
    return handler.answer(req, grant)


__all__ = ["Catalog", "answer_current", "load_hosted", "resolve_storage"]
