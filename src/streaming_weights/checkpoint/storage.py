"""``CheckpointStorage``: a filesystem storage whose Hugging Face checkpoint folders read as chunked models.

Every folder with a ``config.json`` and ``*.safetensors`` files (and no ``manifest.json``) also shows
``manifest.json``, ``units/<unit>.safetensors`` and ``files/<name>`` keys, produced from the original files
(:class:`~.model.CheckpointModel`); everything else is the wrapped backend's. ``manifest.json.sig`` is kept beside
the folder's index, so ``surfing sign`` works on it. Nothing is written into a checkpoint folder: other writes
there are refused.

A folder that cannot be served as it is (truncated, corrupted, a config that does not match its tensors) is
left out of listings with a warning naming the reason (:attr:`CheckpointStorage.problems`); the other models
stay listed. Only when the folder listed is that checkpoint itself is the reason raised
(:class:`~streaming_weights.exceptions.CheckpointError`).
"""

from __future__ import annotations

import json
import logging
import posixpath
import time
from pathlib import Path
from typing import Any

from ..exceptions import CheckpointError, KeyNotFoundError, ManifestError, StorageError
from ..format.names import FILES_DIR, MANIFEST_FILE, SIGNATURE_FILE, UNITS_DIR, join_key
from ..storage.base import StorageBackend, normalize_key
from ..storage.filesystem import FilesystemBackend
from .files import in_thread
from .layout import checkpoint_prefixes

logger = logging.getLogger("streaming_weights.checkpoint")


class CheckpointStorage(StorageBackend):
    """``base`` with its checkpoint folders presented as chunked models; indexes under ``index_root``
    (default ``<cache dir>/index``)."""

    def __init__(self, base: StorageBackend, *, index_root: str | Path | None = None) -> None:
        self.base = base
        self.location = base.location
        self.index_root = index_root
        #: ``{folder prefix: why it is not served}`` for the checkpoint folders that cannot be served
        self.problems: dict[str, str] = {}
        self._models: dict[str, Any] = {}
        self._listed: dict[str, tuple[float, bool]] = {}
        #: seconds an object store's listing of a folder is trusted to say whether it is a checkpoint
        self.relist = 2.0

    # ------------------------------------------------------------------------------------ which keys
    async def _is_checkpoint(self, prefix: str) -> bool:
        if not isinstance(self.base, FilesystemBackend):  # an object store: its listing, kept a moment
            now = time.monotonic()
            seen = self._listed.get(prefix)
            if seen is None or now - seen[0] > self.relist:
                found = checkpoint_prefixes(await self.base.list(prefix + "/" if prefix else ""))
                seen = self._listed[prefix] = (now, prefix in found)
            return seen[1]
        folder = self.base.base_dir / prefix if prefix else self.base.base_dir
        return ((folder / "config.json").is_file() and not (folder / MANIFEST_FILE).exists()
                and any(folder.glob("*.safetensors")))

    def _where(self, prefix: str) -> str:
        """The folder's location: a resolved local path, or ``s3://bucket/prefix``."""
        if isinstance(self.base, FilesystemBackend):
            return str((self.base.base_dir / prefix).resolve())
        return join_key(self.base.location, prefix) if prefix else self.base.location

    async def _virtual(self, key: str) -> tuple[str, str] | None:
        """``(folder prefix, relative key)`` when ``key`` is one a checkpoint folder presents."""
        key = normalize_key(key)
        folder, name = posixpath.split(key)
        if name in (MANIFEST_FILE, SIGNATURE_FILE):
            prefix, rel = folder, name
        else:
            parent, sub = posixpath.split(folder)
            if sub not in (UNITS_DIR, FILES_DIR):
                return None
            prefix, rel = parent, f"{sub}/{name}"
        return (prefix, rel) if await self._is_checkpoint(prefix) else None

    def model(self, prefix: str) -> Any:
        """The :class:`~.model.CheckpointModel` of the folder under ``prefix``."""
        from .model import CheckpointModel

        from .files import LocalFiles, StoredFiles

        got = self._models.get(prefix)
        if got is None:
            files = (LocalFiles(self._where(prefix)) if isinstance(self.base, FilesystemBackend)
                     else StoredFiles(self.base, prefix))
            got = self._models[prefix] = CheckpointModel(files, self.index_root)
        return got

    def signature_location(self, prefix: str) -> str | None:
        """Where the signature of the checkpoint under ``prefix`` is kept (its index directory), else ``None``."""
        return str(self._models[prefix].index_dir) if prefix in self._models else None

    async def _manifest(self, prefix: str) -> bytes:
        """The folder's manifest bytes (indexed on first use); a problem is recorded and raised."""
        try:
            data = await in_thread(self.model(prefix).manifest_bytes)
        except CheckpointError as exc:
            if self.problems.get(prefix) != str(exc):
                logger.warning("not serving checkpoint %s: %s", self._where(prefix), exc)
            self.problems[prefix] = str(exc)
            raise
        self.problems.pop(prefix, None)
        return data

    # ------------------------------------------------------------------------------ StorageBackend
    async def list(self, prefix: str = "") -> list[str]:
        keys = await self.base.list(prefix)
        shown = set(keys)
        folders = checkpoint_prefixes(keys)
        taken = await self._chunked_names(keys) if folders else set()
        for folder in folders:
            if self._where(folder) in taken:  # chunked from it: not even indexed
                self._shadowed(folder, "a chunked model made from it")
                continue
            try:
                await self._manifest(folder)
            except CheckpointError:
                if folder == prefix.strip("/"):
                    raise  # the folder asked for is that checkpoint: nothing else to list
                continue
            model = self.model(folder)
            manifest = model.last_manifest  # just checked by _manifest (no blocking call on the event loop)
            if manifest.name in taken:  # one model per name: a chunked one (or the first folder) wins
                self._shadowed(folder, f"another model named {manifest.name!r}")
                continue
            taken.add(manifest.name)
            rel = [MANIFEST_FILE, *(b.path for b in (*manifest.units, *manifest.files))]
            if await in_thread(model.signature) is not None:
                rel.append(SIGNATURE_FILE)
            shown.update(join_key(folder, r) for r in rel)
        return sorted(k for k in shown if k.startswith(prefix))

    def _shadowed(self, folder: str, by: str) -> None:
        why = f"{by} is served instead"
        if self.problems.get(folder) != why:
            logger.info("not serving checkpoint %s as it is: %s", self._where(folder), why)
        self.problems[folder] = why

    async def _chunked_names(self, keys: list[str]) -> set[str]:
        """Names and sources of the chunked models among ``keys`` (read leniently: a malformed manifest is the
        catalog's to report)."""
        out: set[str] = set()
        for key in keys:
            if posixpath.basename(key) != MANIFEST_FILE:
                continue
            try:
                record = json.loads(await self.base.load(key))
            except (StorageError, ValueError):
                continue
            if isinstance(record, dict):
                out.update(v for v in (record.get("name"), record.get("source")) if isinstance(v, str) and v)
        return out

    async def load(self, key: str) -> bytes:
        where = await self._virtual(key)
        if where is None:
            return await self.base.load(key)
        prefix, rel = where
        try:
            if rel == MANIFEST_FILE:
                return await self._manifest(prefix)
            if rel == SIGNATURE_FILE:
                sig = await in_thread(self.model(prefix).signature)
                if sig is None:
                    raise KeyNotFoundError(f"{key}: the checkpoint is not signed (surfing sign {self.location})")
                return sig
            return await self._read(key, prefix, rel, 0, None)
        except ManifestError:
            raise KeyNotFoundError(f"{key}: the checkpoint's manifest lists no such unit or file") from None

    async def read_range(self, key: str, start: int, length: int) -> bytes:
        where = await self._virtual(key)
        if where is None or where[1] in (MANIFEST_FILE, SIGNATURE_FILE):
            return (await self.base.read_range(key, start, length) if where is None
                    else (await self.load(key))[start:start + length])
        return await self._read(key, *where, start, length)

    async def _read(self, key: str, prefix: str, rel: str, start: int, length: int | None) -> bytes:
        try:
            return await in_thread(self.model(prefix).read, rel, start, length)
        except ManifestError:
            raise KeyNotFoundError(f"{key}: the checkpoint's manifest lists no such unit or file") from None

    async def size(self, key: str) -> int:
        if await self._virtual(key) is None:
            return await self.base.size(key)
        return len(await self.load(key))

    async def exists(self, key: str) -> bool:
        if await self._virtual(key) is None:
            return await self.base.exists(key)
        try:
            await self.load(key)
        except (KeyNotFoundError, CheckpointError):
            return False
        return True

    async def save(self, key: str, data: bytes | bytearray | memoryview) -> None:
        where = await self._virtual(key)
        if where is not None and where[1] == SIGNATURE_FILE:
            await in_thread(self.model(where[0]).save_signature, bytes(data))
            return
        await self._refuse(key, where)
        await self.base.save(key, data)

    async def delete(self, key: str) -> None:
        where = await self._virtual(key)
        if where is not None and where[1] == SIGNATURE_FILE:
            await in_thread(self.model(where[0]).delete_signature)
            return
        await self._refuse(key, where)
        await self.base.delete(key)

    async def _refuse(self, key: str, where: tuple[str, str] | None) -> None:
        folder = posixpath.dirname(normalize_key(key))
        if where is not None or await self._is_checkpoint(folder):
            raise StorageError(f"{key}: checkpoint folders are served as they are and never written; chunk the "
                               f"model (surfing chunk) to store it elsewhere")

    async def close(self) -> None:
        await self.base.close()

    def __getattr__(self, name: str) -> Any:
        if name == "base":  # not set yet (during construction): no recursion
            raise AttributeError(name)
        return getattr(self.base, name)  # the wrapped backend's own extras (S3 counters, endpoint...)

    def __repr__(self) -> str:
        return f"CheckpointStorage({self.location!r})"


__all__ = ["CheckpointStorage"]
