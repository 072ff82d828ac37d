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
from .files import LocalFiles
from .index import index_dir_for, read_index, write_index
from .ranges import Piece, from_json, read_pieces, to_json, unit_pieces

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

    def __init__(self, folder: str | Path | Any, index_root: str | Path | None = None, *,
                 memo_bytes: int = 64 << 20) -> None:
        #: the folder's files (:class:`~.files.LocalFiles`, or :class:`~.files.StoredFiles` in a storage)
        self.files = folder if hasattr(folder, "open_source") else LocalFiles(folder)
        self.location: str = self.files.location
        self.folder = Path(self.location)  # for messages (a local folder: its resolved path)
        self.index_dir = index_dir_for(self.location, index_root)
        self.memo_bytes = memo_bytes
        self._lock = threading.RLock()
        self._manifest: bytes | None = None
        self._parsed: Manifest | None = None
        self._stat: dict[str, tuple[int, int]] = {}
        self._plan: Any = None
        self._src: Any = None
        self._ranges: dict[str, list[Piece] | None] = {}
        self._memo: OrderedDict[str, bytes] = OrderedDict()

    # ---------------------------------------------------------------------------------------- manifest
    def manifest_bytes(self) -> bytes:
        """The manifest served for the folder now (indexing it first if its files changed).

        Raises:
            CheckpointError: the folder cannot be served as it is (the message says why and what to do).
        """
        with self._lock:
            names = self.files.names()
            if self._manifest is not None and self.files.stats(names) == self._stat:
                return self._manifest
            self._forget()
            prints = self.files.prints(names)
            found = read_index(self.index_dir, self.location, OPTIONS, prints)
            if found is None:
                data = self._index(names, prints)
            else:  # units read by range need no plan (nor torch) until one needs producing
                data = found[0]
                self._ranges.update({u: from_json(p) for u, p in found[1].items() if p is not None})
            self._manifest, self._parsed = data, Manifest.from_bytes(data)
            self._stat = {n: (p[0], p[1]) for n, p in prints.items()}
            return data

    @property
    def last_manifest(self) -> Manifest:
        """The manifest :meth:`manifest_bytes` returned last (no check of the files)."""
        assert self._parsed is not None, "manifest_bytes() first"
        return self._parsed

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
        if self._src is not None:
            self._src.close()
        self._manifest, self._parsed, self._plan, self._src = None, None, None, None
        self._memo.clear()
        self._ranges.clear()

    def _index(self, names: list[str], prints: dict[str, list[Any]]) -> bytes:
        plan, source = self._open()
        logger.info("indexing checkpoint %s: hashing %d units (%.1f MiB) once; the index is kept in %s",
                    self.location, len(plan.units), plan.total_bytes / 2**20, self.index_dir)
        try:
            data = asyncio.run(self._build(plan, source))
        except CheckpointError:
            source.close()
            raise
        except StreamingWeightsError as exc:  # a tensor the config does not describe, a file cut short...
            source.close()
            raise CheckpointError(f"cannot serve {self.location} as it is: {exc} (does config.json match the "
                                  "tensors? is a file truncated?)") from exc
        if self.files.stats(names) != {n: (p[0], p[1]) for n, p in prints.items()}:
            raise CheckpointError(f"{self.location} changed while it was being indexed; it is indexed again on the "
                                  "next request")
        ranges = {u: to_json(unit_pieces(plan, source, u)) for u in plan.units}
        write_index(self.index_dir, self.location, OPTIONS, prints, data, ranges)
        self._plan, self._src = plan, source  # kept for the reads that follow
        logger.info("indexed checkpoint %s", self.location)
        return data

    async def _build(self, plan: Any, source: Any) -> bytes:
        from ..chunker.naming import default_model_name, source_id
        from ..chunker.produce import produce_group

        sink = _ManifestOnly()
        builder = ModelBuilder(sink, "", name=default_model_name(self.location))
        for group in plan.groups():
            role = "expert" if group[0] in plan.experts else None
            for unit, buf, digests in produce_group(plan, source, group):
                await builder.add_encoded_unit(unit, buf, digests=digests, rows=plan.rows_of(unit), role=role)
                del buf
        for fname, data in sorted(source.aux_files().items()):
            await builder.add_file(fname, data)
        await builder.finish(architecture=plan.architecture, model_type=plan.config.model_type,
                             config=plan.config.to_dict(), dtype=str(plan.dtype).removeprefix("torch."),
                             tied=plan.tied, source=source_id(self.location))
        return bytes(await sink.load(MANIFEST_FILE))

    def _open(self) -> tuple[Any, Any]:
        """(the plan, an open source) of the folder as it is now."""
        from ..chunker.plan import plan_model

        source = self._source()
        try:
            plan = plan_model(source, None, self.location, None, OPTIONS["shard_size"], OPTIONS["expert_units"])
        except Exception as exc:  # noqa: BLE001 - transformers raises plain errors for a config it cannot build
            source.close()
            if isinstance(exc, CheckpointError):
                raise
            why = str(exc) if isinstance(exc, StreamingWeightsError) else \
                f"its config does not build a model ({type(exc).__name__}: {exc})"
            raise CheckpointError(f"cannot serve {self.location} as it is: {why}") from exc
        return plan, source

    # ------------------------------------------------------------------------------------------ bytes
    def read(self, rel: str, start: int = 0, length: int | None = None) -> bytes:
        """Bytes ``[start, start + length)`` (default: to the end) of ``rel`` (``units/<unit>.safetensors`` or
        ``files/<name>``) as the current manifest lists it. A unit that needs no conversion is read by range from
        the original files (:mod:`.ranges`); another is produced whole once and kept for its next ranges. A
        whole unit or file is checked against the index's BLAKE3 before it is returned.

        Raises:
            ManifestError: the manifest lists no such blob.
            CheckpointError: the folder changed (it is indexed again: the client sees a new manifest) or cannot
                be read.
        """
        with self._lock:
            entry = self.manifest().blob(rel)
            stop = entry.bytes if length is None else min(entry.bytes, start + length)
            if not isinstance(entry, UnitEntry):
                return self._file(entry)[start:stop]
            whole = start == 0 and stop == entry.bytes
            pieces = self._pieces(entry.name)
            if pieces is None:
                if entry.name not in self._memo:
                    self._produce(entry.name)
                self._memo.move_to_end(entry.name)
                data = self._memo[entry.name]
                return data if whole else data[start:stop]
            try:
                data = read_pieces(pieces, start, stop - start, self.files.pread)
            except OSError as exc:
                self._forget()
                raise CheckpointError(f"cannot read {rel} from {self.location}: {exc}") from exc
            return self._checked(entry, data) if whole else data

    def _pieces(self, unit: str) -> list[Piece] | None:
        if unit not in self._ranges:
            plan, source = self._opened()
            self._ranges[unit] = unit_pieces(plan, source, unit)
        return self._ranges[unit]

    def _opened(self) -> tuple[Any, Any]:
        """(the plan, its open source), planned once per version of the folder."""
        if self._plan is None:
            self._plan, self._src = self._open()
        return self._plan, self._src

    def _file(self, entry: Any) -> bytes:
        from ..chunker.readers import sentence_module_configs

        data = self.files.read(entry.name)  # the files the chunker copies, read the same way
        if data is None and isinstance(self.files, LocalFiles):
            data = sentence_module_configs(self.files.folder).get(entry.name)
        return self._checked(entry, data or b"")

    def _produce(self, unit: str) -> None:
        from ..chunker.produce import produce_group, unit_group

        plan, source = self._opened()
        assert self._parsed is not None
        try:
            for name, buf, _ in produce_group(plan, source, unit_group(plan, unit)):
                self._memo[name] = self._checked(self._parsed.unit(name), bytes(buf))
                del buf
        except CheckpointError:
            raise
        except StreamingWeightsError as exc:
            self._forget()
            raise CheckpointError(f"cannot read {unit!r} from {self.location}: {exc}") from exc
        while len(self._memo) > 1 and sum(map(len, self._memo.values())) > self.memo_bytes:
            oldest = next(iter(self._memo))
            if oldest == unit:
                self._memo.move_to_end(unit)
                continue
            del self._memo[oldest]

    def _source(self) -> Any:
        try:
            return self.files.open_source()
        except CheckpointError:
            raise
        except ChunkingError as exc:
            raise CheckpointError(f"cannot serve {self.location} as it is: {exc}") from exc

    def _checked(self, entry: Any, data: bytes) -> bytes:
        from ..format.hashing import blake3_hex

        if len(data) != entry.bytes or blake3_hex(data) != entry.blake3:
            self._forget()
            raise CheckpointError(f"{self.location}: {entry.path} no longer matches its index (a checkpoint file "
                                  "changed without a new size or mtime); it is indexed again: request the manifest again")
        return data


__all__ = ["CheckpointModel", "OPTIONS"]
