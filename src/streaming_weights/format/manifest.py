"""``manifest.json``: what a chunked model directory holds. Specified byte by byte in docs/format.md.

A manifest may come from a hostile storage or network path, so parsing is bounded (:class:`ManifestLimits`):
the byte size and JSON nesting depth are checked before ``json.loads``; unit/file/tensor counts, tensor
ranks and every declared byte size are checked before anything is built or allocated from them. A breach
raises :class:`~streaming_weights.exceptions.ManifestLimitError` naming the limit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..exceptions import ManifestError, ManifestLimitError, UnitFormatError
from .limits import LIMITS, ManifestLimits, json_depth  # noqa: F401 - re-exported
from .chunkfile import TensorSpec
from .names import RESIDENT_UNIT, check_name, expert_unit_name, file_path, unit_path
from .quant import OFFSET_SUFFIX, SCALE_SUFFIX

#: the newest format version this library reads and writes
FORMAT_VERSION = 3
#: versions this library reads; a manifest gets the lowest version that can describe it (1 without shards)
SUPPORTED_VERSIONS = (1, 2, 3)
SHARD_VERSION = 2  # the version that introduced role "shard"
EXPERT_VERSION = 3  # the version that introduced role "expert"
ROLES = ("expert", "resident", "shard", "streamed")
#: roles whose units hold rows ``[start, stop)`` of their tensors' first dimension (field ``rows``)
ROW_ROLES = ("expert", "shard")
_COMPANIONS = (SCALE_SUFFIX, OFFSET_SUFFIX)
_HEX64 = set("0123456789abcdef")


def _require(obj: dict[str, Any], key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if key not in obj:
        raise ManifestError(f"{where}: missing field {key!r}")
    val = obj[key]
    if not isinstance(val, typ) or (typ is int and isinstance(val, bool)):
        raise ManifestError(f"{where}: field {key!r} must be {getattr(typ, '__name__', typ)}, got {type(val).__name__}")
    return val


def _check_hex(val: str, where: str) -> str:
    if len(val) != 64 or not set(val) <= _HEX64:
        raise ManifestError(f"{where}: expected 64 lowercase hex digits, got {val!r}")
    return val


@dataclass(frozen=True)
class BlobEntry:
    """An object stored next to the manifest: its path, size and hashes."""

    name: str
    path: str
    bytes: int
    sha256: str
    blake3: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "bytes": self.bytes, "sha256": self.sha256, "blake3": self.blake3}

    @staticmethod
    def _common(obj: Any, where: str) -> tuple[str, str, int, str, str]:
        if not isinstance(obj, dict):
            raise ManifestError(f"{where}: must be an object")
        name = _require(obj, "name", str, where)
        path = _require(obj, "path", str, where)
        size = _require(obj, "bytes", int, where)
        if size < 0:
            raise ManifestError(f"{where}: negative byte size")
        sha = _check_hex(_require(obj, "sha256", str, where), f"{where}.sha256")
        b3 = _check_hex(_require(obj, "blake3", str, where), f"{where}.blake3")
        return name, path, size, sha, b3

    @classmethod
    def from_json(cls, obj: Any, where: str, limits: ManifestLimits = LIMITS) -> BlobEntry:
        name, path, size, sha, b3 = cls._common(obj, where)
        limits.check_size(size, limits.max_file_bytes, "a file", where)
        check_name(name, "file name")
        if path != file_path(name):
            raise ManifestError(f"{where}: path {path!r} must be {file_path(name)!r}")
        return cls(name, path, size, sha, b3)


def _tensor(name: str, obj: Any, limits: ManifestLimits, where: str) -> TensorSpec:
    """One tensor entry; its rank is bounded before its shape is multiplied out, and its data must end
    within ``max_unit_bytes`` (and, checked by the caller, within its unit's declared size)."""
    shape = obj.get("shape") if isinstance(obj, dict) else None
    if isinstance(shape, list) and len(shape) > limits.max_ndim:
        raise ManifestLimitError(f"{where}: tensor {name!r} has {len(shape)} dimensions; the limit is {limits.max_ndim}")
    spec = TensorSpec.from_json(name, obj)
    limits.check_size(spec.data_offsets[1], limits.max_unit_bytes, f"tensor {name!r}", where)
    return spec


def _rows(val: Any, where: str) -> tuple[int, int]:
    """A shard's ``rows``: ``[start, stop]``, two ints with ``0 <= start < stop``."""
    if (not isinstance(val, (list, tuple)) or len(val) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in val)):
        raise ManifestError(f"{where}: field 'rows' must be [start, stop] (two ints), got {val!r}")
    if not 0 <= val[0] < val[1]:
        raise ManifestError(f"{where}: field 'rows' must have 0 <= start < stop, got {list(val)}")
    return int(val[0]), int(val[1])


@dataclass(frozen=True)
class UnitEntry(BlobEntry):
    """One unit: a streamed block (``model.layers.3``), the resident parts (``resident``), a row shard
    (``model.embed_tokens.weight.rows-0-4096``: rows ``[start, stop)`` of one tensor, role ``shard``), or
    experts ``[start, stop)`` of one experts module (``model.layers.3.mlp.experts.5``, role ``expert``: those
    rows of each of the module's fused tensors)."""

    role: str = "streamed"
    order: int = 0
    tensors: dict[str, TensorSpec] = field(default_factory=dict)
    rows: tuple[int, int] | None = None  # set for (and only for) roles "shard" and "expert"

    def __post_init__(self) -> None:
        where = f"unit {self.name!r}"
        if (self.role in ROW_ROLES) != (self.rows is not None):
            raise ManifestError(f"{where}: field 'rows' is required for role {self.role!r} and allowed for no "
                                f"roles but {list(ROW_ROLES)}" if self.role in ROW_ROLES else
                                f"{where}: field 'rows' is required for role 'shard' and allowed for no other role")
        if self.rows is None:
            return
        start, stop = _rows(self.rows, where)
        object.__setattr__(self, "rows", (start, stop))
        if self.role == "expert":
            self._check_expert(where)
            return
        main = self.shard_tensor
        for t, spec in self.tensors.items():
            if len(spec.shape) < 2 or spec.shape[0] != stop - start:
                raise ManifestError(f"{where}: shard tensor {t!r} has shape {list(spec.shape)}; rows {[start, stop]} "
                                    f"need a tensor of 2 or more dimensions with {stop - start} rows")
            if t != main and t not in {main + c for c in _COMPANIONS}:
                raise ManifestError(f"{where}: a shard holds one tensor and its quantization companions; "
                                    f"{t!r} is neither {main!r} nor one of its companions")

    @property
    def expert_module(self) -> str | None:
        """The experts module an expert unit holds rows of (its tensors' common parent); ``None`` for other roles."""
        if self.role != "expert":
            return None
        parents = {t.rpartition(".")[0] for t in self.tensors}
        if len(parents) != 1 or "" in parents:
            raise ManifestError(f"unit {self.name!r}: an expert unit holds tensors of exactly one experts module, "
                                f"got {sorted(self.tensors)}")
        return parents.pop()

    def _check_expert(self, where: str) -> None:
        start, stop = self.rows
        module = self.expert_module
        if self.name != expert_unit_name(module, start, stop):
            raise ManifestError(f"{where}: an expert unit holding experts [{start}, {stop}) of {module!r} must be named "
                                f"{expert_unit_name(module, start, stop)!r}")
        for t, spec in self.tensors.items():
            if len(spec.shape) < 2 or spec.shape[0] != stop - start:
                raise ManifestError(f"{where}: expert tensor {t!r} has shape {list(spec.shape)}; experts "
                                    f"{[start, stop]} need a tensor of 2 or more dimensions with {stop - start} rows")

    @property
    def shard_tensor(self) -> str | None:
        """The model tensor a shard holds rows of (its tensors less quant companions); ``None`` for other roles."""
        if self.role != "shard":
            return None
        main = [t for t in self.tensors if not t.endswith(_COMPANIONS)]
        if len(main) != 1:
            raise ManifestError(f"unit {self.name!r}: a shard holds exactly one model tensor (plus its quantization "
                                f"companions), got {sorted(main)}")
        return main[0]

    def to_json(self) -> dict[str, Any]:
        out = super().to_json()
        out.update(role=self.role, order=self.order)
        if self.rows is not None:
            out["rows"] = list(self.rows)
        out["tensors"] = {n: s.to_json() for n, s in self.tensors.items()}
        return out

    @classmethod
    def from_json(cls, obj: Any, where: str, limits: ManifestLimits = LIMITS) -> UnitEntry:
        name, path, size, sha, b3 = cls._common(obj, where)
        limits.check_size(size, limits.max_unit_bytes, "a unit", where)
        check_name(name)
        if path != unit_path(name):
            raise ManifestError(f"{where}: path {path!r} must be {unit_path(name)!r}")
        role = _require(obj, "role", str, where)
        if role not in ROLES:
            raise ManifestError(f"{where}: role must be one of {ROLES}, got {role!r}")
        order = _require(obj, "order", int, where)
        rows = _rows(_require(obj, "rows", list, where), where) if role in ROW_ROLES else None
        if rows is None and "rows" in obj:
            raise ManifestError(f"{where}: field 'rows' is only allowed for role 'shard' and 'expert' units")
        raw = _require(obj, "tensors", dict, where)
        limits.check_count(len(raw), limits.max_tensors, "tensors", where)
        try:
            tensors = {n: _tensor(n, s, limits, where) for n, s in raw.items()}
        except UnitFormatError as exc:
            raise ManifestError(f"{where}: {exc}") from exc
        limits.check_size(sum(t.nbytes for t in tensors.values()), limits.max_unit_bytes, "tensors", where)
        for t, spec in tensors.items():  # no shape may claim more memory than the unit's own size
            if spec.data_offsets[1] > size:
                raise ManifestLimitError(f"{where}: tensor {t!r} ends at byte {spec.data_offsets[1]}, beyond the unit's declared {size} bytes")
        try:
            return cls(name, path, size, sha, b3, role=role, order=order, tensors=tensors, rows=rows)
        except ManifestError as exc:
            raise ManifestError(f"{where}: {exc}") from None

    @property
    def data_bytes(self) -> int:
        return sum(s.nbytes for s in self.tensors.values())


def _check_shard_group(tensor: str, shards: list[UnitEntry], whole: str = "sharded tensor",
                       part: str = "shard") -> None:
    """``tensor``'s shards (manifest order) tile its rows from 0 and agree on names, dtypes, trailing dims
    (``whole`` / ``part`` name them in errors: an experts module's expert units are checked the same way)."""
    first, expected = shards[0], 0
    for s in shards:
        start, stop = s.rows or (0, 0)
        if start > expected:
            raise ManifestError(f"manifest: rows [{expected}, {start}) of {whole} {tensor!r} are in no {part} "
                                f"(a gap before unit {s.name!r}; {part}s must be listed by rows, from 0)")
        if start < expected:
            raise ManifestError(f"manifest: {part} {s.name!r} (rows [{start}, {stop})) overlaps rows before {expected} "
                                f"of {whole} {tensor!r} ({part}s must be listed by rows, without overlap)")
        expected = stop
        if set(s.tensors) != set(first.tensors):
            raise ManifestError(f"manifest: shards {first.name!r} and {s.name!r} of {tensor!r} hold different "
                                f"tensors: {sorted(first.tensors)} vs {sorted(s.tensors)}")
        for t, spec in s.tensors.items():
            ref = first.tensors[t]
            if spec.dtype != ref.dtype or spec.shape[1:] != ref.shape[1:]:
                raise ManifestError(f"manifest: shards of {tensor!r} disagree: {first.name!r} stores {t!r} as "
                                    f"{ref.dtype}[*, {list(ref.shape[1:])}], {s.name!r} as {spec.dtype}[*, "
                                    f"{list(spec.shape[1:])}] (dtype and trailing dimensions must match)")


@dataclass(frozen=True)
class Manifest:
    """A chunked model. ``units`` are sorted by ``order`` (the default execution order)."""

    name: str
    architecture: str
    model_type: str
    config: dict[str, Any]
    dtype: str
    units: tuple[UnitEntry, ...]
    files: tuple[BlobEntry, ...] = ()
    tied: dict[str, str] = field(default_factory=dict)
    source: str = ""
    #: ``None``: the lowest version that describes these units (:data:`SHARD_VERSION` with shards, else 1)
    format_version: int | None = None

    def __post_init__(self) -> None:
        if self.format_version is None:
            version = EXPERT_VERSION if self.experts else SHARD_VERSION if self.shards else 1
            object.__setattr__(self, "format_version", version)
        self.validate()

    # -- lookups -----------------------------------------------------------------------------------
    def unit(self, name: str) -> UnitEntry:
        for u in self.units:
            if u.name == name:
                return u
        raise ManifestError(f"model {self.name!r} has no unit {name!r}")

    def file(self, name: str) -> BlobEntry:
        for f in self.files:
            if f.name == name:
                return f
        raise ManifestError(f"model {self.name!r} has no file {name!r}")

    @property
    def streamed(self) -> list[UnitEntry]:
        return [u for u in self.units if u.role == "streamed"]

    @property
    def resident(self) -> list[UnitEntry]:
        return [u for u in self.units if u.role == "resident"]

    @property
    def shards(self) -> list[UnitEntry]:  # role "shard", in manifest order
        return [u for u in self.units if u.role == "shard"]

    @property
    def experts(self) -> list[UnitEntry]:  # role "expert", in manifest order
        return [u for u in self.units if u.role == "expert"]

    def expert_groups(self) -> dict[str, list[UnitEntry]]:
        """``{experts module path: its expert units, by rows}`` (manifest order, which validation makes row order)."""
        out: dict[str, list[UnitEntry]] = {}
        for u in self.experts:
            out.setdefault(u.expert_module or "", []).append(u)
        return out

    def shard_groups(self) -> dict[str, list[UnitEntry]]:
        """``{model tensor name: its shard units, by rows}`` (in manifest order, which validation makes row order)."""
        out: dict[str, list[UnitEntry]] = {}
        for u in self.shards:
            out.setdefault(u.shard_tensor or "", []).append(u)
        return out

    @property
    def total_bytes(self) -> int:
        return sum(u.bytes for u in self.units)

    def blob(self, path: str) -> BlobEntry:
        """The unit or file stored at relative ``path`` (so a server can validate requests)."""
        for b in (*self.units, *self.files):
            if b.path == path:
                return b
        raise ManifestError(f"model {self.name!r} lists nothing at {path!r}")

    # -- (de)serialization ---------------------------------------------------------------------------
    def validate(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ManifestError("manifest: 'name' must be a non-empty string")
        names = [u.name for u in self.units]
        if len(set(names)) != len(names):
            raise ManifestError("manifest: duplicate unit names")
        orders = [u.order for u in self.units]
        if len(set(orders)) != len(orders):
            raise ManifestError("manifest: duplicate unit 'order' values")
        if list(self.units) != sorted(self.units, key=lambda u: u.order):
            raise ManifestError("manifest: units must be listed in 'order'")
        if not self.units:
            raise ManifestError("manifest: no units")
        self._validate_version()
        seen: set[str] = set()
        for u in self.units:
            for t in u.tensors if u.role not in ROW_ROLES else ():
                if t in seen:
                    raise ManifestError(f"manifest: tensor {t!r} appears in more than one unit")
                seen.add(t)
        for tensor, shards in self.shard_groups().items():
            for t in shards[0].tensors:
                if t in seen:
                    raise ManifestError(f"manifest: tensor {t!r} is sharded (unit {shards[0].name!r}) and also stored "
                                        "in a non-shard unit; a sharded tensor is stored only in its shards")
            _check_shard_group(tensor, shards)
            seen.update(shards[0].tensors)
        for module, experts in self.expert_groups().items():
            for t in experts[0].tensors:
                if t in seen:
                    raise ManifestError(f"manifest: tensor {t!r} is split into expert units ({experts[0].name!r}…) "
                                        "and also stored in another unit")
            _check_shard_group(module, experts, "experts module", "expert unit")
            seen.update(experts[0].tensors)
        for alias, target in self.tied.items():
            if target not in seen or alias in seen:
                raise ManifestError(f"manifest: tied {alias!r} -> {target!r} must point at a stored tensor")
        fnames = [f.name for f in self.files]
        if len(set(fnames)) != len(fnames):
            raise ManifestError("manifest: duplicate file names")

    def _validate_version(self) -> None:
        if self.format_version not in SUPPORTED_VERSIONS:
            raise ManifestError(f"manifest: format_version {self.format_version!r} is not supported "
                                f"(this library reads {list(SUPPORTED_VERSIONS)})")
        if self.format_version < EXPERT_VERSION and self.experts:
            raise ManifestError(f"manifest: role 'expert' needs format_version {EXPERT_VERSION}, "
                                f"the manifest says {self.format_version}")
        if self.format_version < SHARD_VERSION and self.shards:
            raise ManifestError(f"manifest: role 'shard' needs format_version {SHARD_VERSION}, "
                                f"the manifest says {self.format_version}")

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "name": self.name,
            "architecture": self.architecture,
            "model_type": self.model_type,
            "dtype": self.dtype,
            "source": self.source,
            "config": self.config,
            "tied": self.tied,
            "files": [f.to_json() for f in self.files],
            "units": [u.to_json() for u in self.units],
        }

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_json(), indent=1, sort_keys=False).encode() + b"\n"

    @classmethod
    def from_json(cls, obj: Any, limits: ManifestLimits = LIMITS) -> Manifest:
        """A validated manifest from parsed JSON, within ``limits``. Raises ManifestError / ManifestLimitError."""
        if not isinstance(obj, dict):
            raise ManifestError("manifest must be a JSON object")
        version = _require(obj, "format_version", int, "manifest")
        if version not in SUPPORTED_VERSIONS:
            raise ManifestError(
                f"manifest format_version {version} is not supported (this library reads "
                f"{' and '.join(map(str, SUPPORTED_VERSIONS))}); "
                "upgrade streaming_weights or re-chunk the model"
            )
        units = _require(obj, "units", list, "manifest")
        files = obj.get("files", [])
        if not isinstance(files, list):
            raise ManifestError("manifest: 'files' must be a list")
        limits.check_count(len(units), limits.max_units, "units", "manifest")
        limits.check_count(len(files), limits.max_files, "files", "manifest")
        tied = obj.get("tied", {})
        if not isinstance(tied, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tied.items()):
            raise ManifestError("manifest: 'tied' must map tensor names to tensor names")
        unit_entries = tuple(UnitEntry.from_json(u, f"manifest.units[{i}]", limits) for i, u in enumerate(units))
        limits.check_count(sum(len(u.tensors) for u in unit_entries), limits.max_tensors, "tensors", "manifest")
        limits.check_size(sum(u.bytes for u in unit_entries), limits.max_total_bytes, "units", "manifest")
        return cls(
            name=_require(obj, "name", str, "manifest"),
            architecture=_require(obj, "architecture", str, "manifest"),
            model_type=_require(obj, "model_type", str, "manifest"),
            config=_require(obj, "config", dict, "manifest"),
            dtype=_require(obj, "dtype", str, "manifest"),
            source=obj.get("source", "") if isinstance(obj.get("source", ""), str) else "",
            units=unit_entries,
            files=tuple(BlobEntry.from_json(f, f"manifest.files[{i}]", limits) for i, f in enumerate(files)),
            tied=dict(tied),
            format_version=version,
        )

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview, limits: ManifestLimits = LIMITS) -> Manifest:
        """Parse ``manifest.json`` bytes: size and depth checked first, then :meth:`from_json`."""
        data = bytes(data)
        limits.check_bytes(data)
        try:
            obj = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise ManifestError(f"manifest.json is not valid JSON: {exc}") from exc
        return cls.from_json(obj, limits)


__all__ = ["EXPERT_VERSION", "FORMAT_VERSION", "LIMITS", "ROLES", "ROW_ROLES", "SHARD_VERSION", "SUPPORTED_VERSIONS", "BlobEntry", "Manifest", "ManifestLimits", "UnitEntry", "RESIDENT_UNIT",
           "json_depth"]
