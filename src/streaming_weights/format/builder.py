"""The one writer of a chunked model: unit files and auxiliary files first, ``manifest.json`` last.

Every chunked model in storage is written through :class:`ModelBuilder` (the chunker, the benchmarks and
the tests' hand-built models alike), so the write protocol lives in one place:

1. :meth:`ModelBuilder.check` (read-only): refuse a target that holds a *different* model unless
   ``force``. Nothing is written yet, so a refused or failed run leaves the old model intact.
2. :meth:`ModelBuilder.begin` (first write): delete the old manifest before any unit is replaced, so no
   manifest ever points at units of another run; with ``force`` (or a different model), also delete
   everything under ``units/`` and ``files/``.
3. ``add_unit`` / ``add_encoded_unit`` / ``add_file``: each object hashed (sha256 + BLAKE3) and saved.
4. :meth:`ModelBuilder.finish`: the manifest, saved atomically by the backend, then the removal of any
   ``units/`` or ``files/`` object the new manifest does not list (leftovers of an earlier model).

A reader therefore sees the old model, the new one, or no manifest at all, never a manifest whose
units are missing or partial.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..exceptions import ChunkingError, ManifestError, ModelExistsError
from .chunkfile import encode_tensors, parse_header
from .hashing import Digests
from .manifest import BlobEntry, Manifest, UnitEntry
from .names import FILES_DIR, MANIFEST_FILE, RESIDENT_UNIT, SIGNATURE_FILE, UNITS_DIR, file_path, join_key, unit_path

if TYPE_CHECKING:
    import torch

    from ..storage.base import StorageBackend

Buffer = bytes | bytearray | memoryview


def default_role(unit: str) -> str:
    """``"resident"`` for the unit named :data:`RESIDENT_UNIT`, ``"streamed"`` for every other."""
    return "resident" if unit == RESIDENT_UNIT else "streamed"


async def stored_model_name(storage: StorageBackend, prefix: str = "") -> str | None:
    """The ``name`` recorded in ``<prefix>/manifest.json``; ``None`` if there is no manifest.

    Read leniently (only the JSON's ``name``), so a manifest of an older format version still names
    its model. Raises ModelExistsError (a ChunkingError) for a manifest that is not JSON or names nothing.
    """
    key = join_key(prefix, MANIFEST_FILE)
    if not await storage.exists(key):
        return None
    try:
        name = json.loads(bytes(await storage.load(key))).get("name")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        name = None
    if not isinstance(name, str) or not name:
        raise ModelExistsError(
            f"{_where(storage, prefix)} holds a manifest.json that names no model; refusing to overwrite it "
            "(use --force, or force=True, to replace it)"
        )
    return name


def _where(storage: StorageBackend, prefix: str) -> str:
    return f"{storage.location}/{prefix}" if prefix else storage.location


class ModelBuilder:
    """Write one chunked model under ``prefix`` of ``storage``.

    Args:
        storage: where the model goes (any :class:`~streaming_weights.storage.StorageBackend`).
        prefix: key prefix of the model directory (``""``: the storage root).
        name: the model name recorded in the manifest.
        force: replace a different model already stored there (its units and files are deleted first).

    Units get ``order`` 0, 1, ... in the order they are added. Not safe for concurrent use.
    """

    def __init__(self, storage: StorageBackend, prefix: str = "", *, name: str, force: bool = False) -> None:
        if not isinstance(name, str) or not name:
            raise ManifestError("a model needs a non-empty name")
        self.storage = storage
        self.prefix = prefix.strip("/")
        self.name = name
        self.force = force
        self.units: list[UnitEntry] = []
        self.files: list[BlobEntry] = []
        self._previous: str | None = None
        self._checked = False
        self._begun = False

    def key(self, rel: str) -> str:
        """The storage key of ``rel`` (``units/x.safetensors``) inside this model's directory."""
        return join_key(self.prefix, rel)

    async def check(self) -> None:
        """Refuse (ModelExistsError, a ChunkingError) a target holding a different model, unless ``force``. Writes nothing."""
        if self._checked:
            return
        try:
            self._previous = await stored_model_name(self.storage, self.prefix)
        except ModelExistsError:
            if not self.force:
                raise
            self._previous = ""  # an unreadable manifest: replaced like any other model's
        if self._previous not in (None, self.name) and not self.force:
            raise ModelExistsError(
                f"{_where(self.storage, self.prefix)} already holds model {self._previous!r}; refusing to replace "
                f"it with {self.name!r} (use --force, or force=True, to replace it, or choose another output)"
            )
        self._checked = True

    async def begin(self) -> None:
        """:meth:`check`, then clear the target for writing (called by the first ``add_*``)."""
        if self._begun:
            return
        await self.check()
        # The old manifest goes first: from here on no manifest points at units this run replaces.
        if self._previous is not None:
            await self.storage.delete(self.key(MANIFEST_FILE))
        if self.force or self._previous not in (None, self.name):
            await self._delete_unlisted(set())
        self._begun = True

    async def add_unit(self, name: str, tensors: Mapping[str, torch.Tensor], *, role: str | None = None,
                       rows: tuple[int, int] | None = None) -> UnitEntry:
        """Encode ``tensors`` as unit ``name`` and save it. ``role`` defaults to :func:`default_role`
        (``"shard"`` when ``rows`` is given)."""
        return await self.add_encoded_unit(name, encode_tensors(tensors), role=role, rows=rows)

    async def add_encoded_unit(self, name: str, data: Buffer, *, role: str | None = None,
                               digests: Digests | None = None, rows: tuple[int, int] | None = None) -> UnitEntry:
        """Save ``data`` (a whole unit file, e.g. filled in place from a planned layout) as unit ``name``.

        ``digests`` (``Digests.of(data)``) may be computed by the caller, e.g. in the worker thread that
        filled ``data``; otherwise they are computed here, on the caller's event loop. ``rows``
        (``(start, stop)``) makes it a row shard (role ``"shard"``) of the one tensor it holds.

        Raises:
            ManifestError: an invalid or repeated unit name, or ``rows`` / ``role`` that do not fit the unit.
            UnitFormatError: ``data`` is not a well-formed safetensors file.
        """
        path = unit_path(name)
        if any(u.name == name for u in self.units):
            raise ManifestError(f"unit {name!r} added twice")
        tensors, _, _ = parse_header(data)
        role = role or ("shard" if rows is not None else default_role(name))
        await self.begin()
        digests = digests or Digests.of(data)
        entry = UnitEntry(name, path, len(data), digests.sha256, digests.blake3, role=role, order=len(self.units),
                          tensors=tensors, rows=rows)  # validated before anything is saved
        await self.storage.save(self.key(path), data)
        self.units.append(entry)
        return entry

    async def add_file(self, name: str, data: Buffer) -> BlobEntry:
        """Save an auxiliary file (tokenizer, generation config) stored next to the manifest."""
        path = file_path(name)
        if any(f.name == name for f in self.files):
            raise ManifestError(f"file {name!r} added twice")
        await self.begin()
        digests = Digests.of(data)
        await self.storage.save(self.key(path), data)
        entry = BlobEntry(name, path, len(data), digests.sha256, digests.blake3)
        self.files.append(entry)
        return entry

    async def finish(self, *, architecture: str, model_type: str, config: dict[str, Any], dtype: str = "float32",
                     tied: Mapping[str, str] | None = None, source: str = "") -> Manifest:
        """Validate and save the manifest (atomically, last), then delete objects it does not list.

        Raises:
            ManifestError: the units do not make a valid model (none, a tensor in two units, shards that do not
                tile their tensor, bad ties...). ``format_version`` is 2 if there are shard units, else 1.
        """
        await self.begin()
        manifest = Manifest(name=self.name, architecture=architecture, model_type=model_type, config=config,
                            dtype=dtype, units=tuple(self.units), files=tuple(self.files), tied=dict(tied or {}),
                            source=source)
        # A signature over the previous manifest would now be stale: trusting clients would refuse the model.
        await self.storage.delete(self.key(SIGNATURE_FILE))
        await self.storage.save(self.key(MANIFEST_FILE), manifest.to_bytes())
        await self._delete_unlisted({b.path for b in (*manifest.units, *manifest.files)})
        return manifest

    async def _delete_unlisted(self, keep: set[str]) -> None:
        """Delete every object under ``units/`` and ``files/`` whose relative path is not in ``keep``."""
        base = self.key("")
        for sub in (UNITS_DIR, FILES_DIR):
            for key in await self.storage.list(self.key(sub + "/")):
                if key[len(base):] not in keep:
                    await self.storage.delete(key)


async def write_model(
    storage: StorageBackend,
    prefix: str = "",
    *,
    name: str,
    units: Mapping[str, Mapping[str, torch.Tensor] | Buffer],
    architecture: str,
    model_type: str,
    config: dict[str, Any],
    dtype: str = "float32",
    files: Mapping[str, Buffer] | None = None,
    roles: Mapping[str, str] | None = None,
    tied: Mapping[str, str] | None = None,
    source: str = "",
    force: bool = False,
    rows: Mapping[str, tuple[int, int]] | None = None,
) -> Manifest:
    """Write a whole model in one call (tests, benchmarks, examples). Returns the saved manifest.

    ``units`` maps unit names, in execution order, to ``{tensor name: tensor}`` or to already-encoded
    unit bytes; ``roles`` overrides :func:`default_role` per unit; ``rows`` makes units row shards
    (``{unit: (start, stop)}``, role ``"shard"``). The rest is :class:`ModelBuilder`'s.
    """
    builder = ModelBuilder(storage, prefix, name=name, force=force)
    for unit, content in units.items():
        role, span = (roles or {}).get(unit), (rows or {}).get(unit)
        if isinstance(content, (bytes, bytearray, memoryview)):
            await builder.add_encoded_unit(unit, content, role=role, rows=span)
        else:
            await builder.add_unit(unit, content, role=role, rows=span)
    for fname, data in (files or {}).items():
        await builder.add_file(fname, data)
    return await builder.finish(architecture=architecture, model_type=model_type, config=config, dtype=dtype,
                                tied=tied, source=source)


__all__ = ["ModelBuilder", "default_role", "stored_model_name", "write_model"]
