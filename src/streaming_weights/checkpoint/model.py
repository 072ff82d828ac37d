"""One Hugging Face checkpoint folder served as it is: the chunker's plan, with each unit's bytes produced on
demand from the original safetensors files instead of written out.

The plan is :func:`~streaming_weights.chunker.plan.plan_model` with the chunker's default options (dtype
kept, no quantization, ``shard_size="auto"``, one unit per expert), and a unit's bytes come from
:func:`~streaming_weights.chunker.produce.produce_group`, the function ``surfing chunk`` writes through:
a served-as-is model and the same folder chunked have byte-identical units and the same manifest.

The manifest needs every unit's hashes, so the first time a folder is seen (or after any of its files
changed) every unit is produced once and hashed (a log line says so); the manifest is then kept in the
folder's index (:mod:`.index`), outside the folder, and later starts, and other servers sharing the index
directory, read it from there. Nothing is ever written into the checkpoint folder.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from ..exceptions import CheckpointError, ChunkingError, StreamingWeightsError
from ..format import Manifest
from ..format.manifest import UnitEntry
from ..format.builder import ModelBuilder
from ..format.names import MANIFEST_FILE, SIGNATURE_FILE
from ..storage.memory import MemoryBackend
from .index import fingerprint, index_dir_for, read_index, stat_print, write_index
from .layout import checkpoint_files

logger = logging.getLogger("streaming_weights.checkpoint")

#: the plan options of a served-as-is checkpoint: ``surfing chunk``'s defaults
OPTIONS = {"dtype": None, "quantize": None, "shard_size": "auto", "expert_units": True}


class _ManifestOnly(MemoryBackend):
    """A storage that keeps what :class:`ModelBuilder` writes except unit files: the builder validates and
    records each unit, the bytes are dropped (they are produced again on demand)."""

    async def save(self, key: str, data: Any) -> None:
        if not key.startswith("units/"):
            await super().save(key, data)


class CheckpointModel:
    """The checkpoint in ``folder``, its index under ``index_root`` (default: the cache directory's ``index``).

    Blocking methods (they read files and run the plan): call them from a worker thread. Thread-safe.
    ``memo_bytes``: produced units kept for the next ranged read of the same unit (the units of a row group,
    produced together, wait here for their own requests).
    """

    def __init__(self, folder: str | Path, index_root: str | Path | None = None, *, memo_bytes: int = 64 << 20) -> None:
        self.folder = Path(folder).resolve()
        self.index_dir = index_dir_for(self.folder, index_root)
        self.memo_bytes = memo_bytes
        self._lock = threading.RLock()
        self._manifest: bytes | None = None
        self._parsed: Manifest | None = None
        self._stat: dict[str, tuple[int, int]] = {}
        self._plan: Any = None
        self._memo: OrderedDict[str, bytes] = OrderedDict()

    # ---------------------------------------------------------------------------------------- manifest
    def manifest_bytes(self) -> bytes:
        """The manifest served for the folder now (indexing it first if its files changed).

        Raises:
            CheckpointError: the folder cannot be served as it is (the message says why and what to do).
        """
        with self._lock:
            names = checkpoint_files(self.folder)
            if self._manifest is not None and stat_print(self.folder, names) == self._stat:
                return self._manifest
            self._forget()
            prints = fingerprint(self.folder, names)
            data = read_index(self.index_dir, self.folder, OPTIONS, prints)
            if data is None:
                data = self._index(names, prints)
            self._manifest, self._parsed = data, Manifest.from_bytes(data)
            self._stat = {n: (p[0], p[1]) for n, p in prints.items()}
            return data

    def manifest(self) -> Manifest:
        self.manifest_bytes()
        assert self._parsed is not None
        return self._parsed

    def signature(self) -> bytes | None:
        """The detached signature kept beside the index (``surfing sign FOLDER``), if any."""
        self.manifest_bytes()
        try:
            return (self.index_dir / SIGNATURE_FILE).read_bytes()
        except OSError:
            return None

    def save_signature(self, data: bytes) -> None:
        """Keep a signature over the current manifest beside the index (never in the checkpoint folder)."""
        from .index import save_atomic

        self.manifest_bytes()
        save_atomic(self.index_dir / SIGNATURE_FILE, data)

    def delete_signature(self) -> None:
        (self.index_dir / SIGNATURE_FILE).unlink(missing_ok=True)

    def _forget(self) -> None:
        self._manifest, self._parsed, self._plan = None, None, None
        self._memo.clear()

    def _index(self, names: list[str], prints: dict[str, list[Any]]) -> bytes:
        plan, source = self._open()
        logger.info("indexing checkpoint %s: hashing %d units (%.1f MiB) once; the index is kept in %s",
                    self.folder, len(plan.units), plan.total_bytes / 2**20, self.index_dir)
        try:
            data = asyncio.run(self._build(plan, source))
        except CheckpointError:
            raise
        except StreamingWeightsError as exc:  # a tensor the config does not describe, a file cut short...
            raise CheckpointError(f"cannot serve {self.folder} as it is: {exc} (does config.json match the "
                                  "tensors? is a file truncated?)") from exc
        finally:
            source.close()
        if stat_print(self.folder, names) != {n: (p[0], p[1]) for n, p in prints.items()}:
            raise CheckpointError(f"{self.folder} changed while it was being indexed; it is indexed again on the "
                                  "next request")
        write_index(self.index_dir, self.folder, OPTIONS, prints, data)
        logger.info("indexed checkpoint %s", self.folder)
        return data

    async def _build(self, plan: Any, source: Any) -> bytes:
        from ..chunker.naming import default_model_name, source_id
        from ..chunker.produce import produce_group

        sink = _ManifestOnly()
        builder = ModelBuilder(sink, "", name=default_model_name(str(self.folder)))
        for group in plan.groups():
            role = "expert" if group[0] in plan.experts else None
            for unit, buf, digests in produce_group(plan, source, group):
                await builder.add_encoded_unit(unit, buf, digests=digests, rows=plan.rows_of(unit), role=role)
                del buf
        for fname, data in sorted(source.aux_files().items()):
            await builder.add_file(fname, data)
        await builder.finish(architecture=plan.architecture, model_type=plan.config.model_type,
                             config=plan.config.to_dict(), dtype=str(plan.dtype).removeprefix("torch."),
                             tied=plan.tied, source=source_id(str(self.folder)))
        return bytes(await sink.load(MANIFEST_FILE))

    def _open(self) -> tuple[Any, Any]:
        """(the plan, an open source) of the folder as it is now."""
        from ..chunker.plan import plan_model

        source = self._source()
        try:
            plan = plan_model(source, None, str(self.folder), None, OPTIONS["shard_size"], OPTIONS["expert_units"])
        except Exception as exc:  # noqa: BLE001 - transformers raises plain errors for a config it cannot build
            source.close()
            if isinstance(exc, CheckpointError):
                raise
            why = str(exc) if isinstance(exc, StreamingWeightsError) else \
                f"its config does not build a model ({type(exc).__name__}: {exc})"
            raise CheckpointError(f"cannot serve {self.folder} as it is: {why}") from exc
        return plan, source

    # ------------------------------------------------------------------------------------------ bytes
    def blob(self, rel: str) -> bytes:
        """The bytes of ``rel`` (``units/<unit>.safetensors`` or ``files/<name>``) as the manifest lists them.

        Raises:
            KeyError: the manifest lists no such blob.
            CheckpointError: the folder changed (re-indexed: the client sees a new manifest) or cannot be read.
        """
        with self._lock:
            manifest = self.manifest()
            entry = manifest.blob(rel)
            if not isinstance(entry, UnitEntry):
                return self._file(entry)
            if entry.name not in self._memo:
                self._produce(entry.name)
            self._memo.move_to_end(entry.name)
            return self._memo[entry.name]

    def _file(self, entry: Any) -> bytes:
        from ..chunker.readers import sentence_module_configs

        path = self.folder / entry.name  # the files the chunker copies, read the same way
        data = path.read_bytes() if path.is_file() else sentence_module_configs(self.folder).get(entry.name, b"")
        return self._checked(entry, data)

    def _produce(self, unit: str) -> None:
        from ..chunker.produce import produce_group, unit_group

        if self._plan is None:
            self._plan, source = self._open()
        else:
            source = self._source()
        assert self._parsed is not None
        try:
            for name, buf, _ in produce_group(self._plan, source, unit_group(self._plan, unit)):
                self._memo[name] = self._checked(self._parsed.unit(name), bytes(buf))
                del buf
        except ChunkingError as exc:
            raise CheckpointError(f"cannot read {unit!r} from {self.folder}: {exc}") from exc
        finally:
            source.close()
        while len(self._memo) > 1 and sum(map(len, self._memo.values())) > self.memo_bytes:
            oldest = next(iter(self._memo))
            if oldest == unit:
                self._memo.move_to_end(unit)
                continue
            del self._memo[oldest]

    def _source(self) -> Any:
        from ..chunker.readers import open_source

        try:
            return open_source(self.folder)
        except ChunkingError as exc:
            raise CheckpointError(f"cannot serve {self.folder} as it is: {exc}") from exc

    def _checked(self, entry: Any, data: bytes) -> bytes:
        from ..format.hashing import blake3_hex

        if len(data) != entry.bytes or blake3_hex(data) != entry.blake3:
            self._forget()
            raise CheckpointError(f"{self.folder}: {entry.path} no longer matches its index (a checkpoint file "
                                  "changed without a new size or mtime); it is indexed again: request the manifest again")
        return data


__all__ = ["CheckpointModel", "OPTIONS"]
