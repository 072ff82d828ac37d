"""Unit files: safetensors bytes built in place and decoded without copying.

A unit file is a plain safetensors file (any safetensors reader opens it)::

    [8 bytes little-endian u64 N][N bytes JSON header, space padded to a multiple of 8][data]

Tensors are laid out largest-element-first so every tensor's offset is aligned to its element size;
``decode_unit`` returns ``torch.frombuffer`` views over the caller's buffer (no copy), so the caller must
not reuse that buffer while any returned tensor lives (each view holds a reference to it).
"""

from __future__ import annotations

import functools
import json
import math
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from ..exceptions import UnitFormatError

if TYPE_CHECKING:
    import torch

# safetensors dtype name -> (torch attribute, element size). torch itself is imported only when tensors
# are made, so a weight server (which only moves bytes) never loads it.
_DTYPE_TABLE: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "U16": ("uint16", 2),
    "U32": ("uint32", 4),
    "U64": ("uint64", 8),
}


@functools.cache
def _torch_dtypes() -> tuple[dict[str, torch.dtype], dict[torch.dtype, str]]:
    import torch

    names = {k: getattr(torch, attr) for k, (attr, _) in _DTYPE_TABLE.items()}
    return names, {v: k for k, v in names.items()}


def __getattr__(name: str):  # DTYPES / DTYPE_NAMES, built on first use (PEP 562)
    if name == "DTYPES":
        return _torch_dtypes()[0]
    if name == "DTYPE_NAMES":
        return _torch_dtypes()[1]
    raise AttributeError(name)
MAX_HEADER_BYTES = 100 << 20


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _torch_dtypes()[1][dtype]
    except KeyError:
        raise UnitFormatError(f"dtype {dtype} cannot be stored in safetensors") from None


def itemsize(dtype: str) -> int:
    return _DTYPE_TABLE[dtype][1]


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a unit: safetensors dtype name, shape and [start, end) offsets in the data section."""

    dtype: str
    shape: tuple[int, ...]
    data_offsets: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return self.data_offsets[1] - self.data_offsets[0]

    def to_json(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape), "data_offsets": list(self.data_offsets)}

    @classmethod
    def from_json(cls, name: str, obj: Any) -> TensorSpec:
        try:
            dtype, shape, offs = obj["dtype"], obj["shape"], obj["data_offsets"]
        except (TypeError, KeyError) as exc:
            raise UnitFormatError(f"tensor {name!r}: entry needs dtype, shape, data_offsets") from exc
        if dtype not in _DTYPE_TABLE:
            raise UnitFormatError(f"tensor {name!r}: unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise UnitFormatError(f"tensor {name!r}: shape must be a list of non-negative ints")
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs)):
            raise UnitFormatError(f"tensor {name!r}: data_offsets must be [start, end]")
        spec = cls(dtype, tuple(shape), (offs[0], offs[1]))
        if offs[0] < 0 or spec.nbytes != math.prod(shape) * itemsize(dtype):
            raise UnitFormatError(f"tensor {name!r}: data_offsets {offs} do not fit {dtype}{shape}")
        return spec


@dataclass(frozen=True)
class UnitLayout:
    """Where everything goes in a unit file; ``header`` already includes the 8-byte length prefix."""

    header: bytes
    tensors: dict[str, TensorSpec]

    @property
    def data_start(self) -> int:
        return len(self.header)

    @property
    def total_bytes(self) -> int:
        return self.data_start + max((s.data_offsets[1] for s in self.tensors.values()), default=0)

    def span(self, name: str) -> tuple[int, int]:
        """Absolute [start, end) of a tensor inside the file."""
        s, e = self.tensors[name].data_offsets
        return self.data_start + s, self.data_start + e


#: a unit file's data section starts at a multiple of this many bytes (its header is padded with spaces, as
#: safetensors allows), and tensors whose size is a multiple of it come first: in a page-aligned receive buffer
#: each of them starts :data:`DATA_ALIGN`-aligned, which torch's int8 kernel needs to compute on it in place
DATA_ALIGN = 64


def lay_out(entries: Mapping[str, tuple[str, tuple[int, ...]]], align: int = 1) -> tuple[dict[str, TensorSpec], int]:
    """``{name: TensorSpec}`` of tensors ``{name: (dtype, shape)}`` placed one after another, each starting at a
    multiple of ``align`` bytes, and the bytes they span in all (``align=1``: contiguous, as a safetensors file
    requires). Order: tensors whose size is a multiple of :data:`DATA_ALIGN` first (so each of them starts at
    such a multiple), then the rest; within each, larger elements first (natural alignment), then by name."""
    def nbytes(name: str) -> int:
        return math.prod(entries[name][1]) * itemsize(entries[name][0])

    specs: dict[str, TensorSpec] = {}
    pos = 0
    for name in sorted(entries, key=lambda n: (nbytes(n) % DATA_ALIGN != 0, -itemsize(entries[n][0]), n)):
        dtype, shape = entries[name]
        n = nbytes(name)
        specs[name] = TensorSpec(dtype, tuple(int(d) for d in shape), (pos, pos + n))
        pos += -(-n // align) * align
    return specs, pos


def plan_unit(
    entries: Mapping[str, tuple[str, tuple[int, ...]]], metadata: Mapping[str, str] | None = None
) -> UnitLayout:
    """Lay out tensors ``{name: (dtype, shape)}`` into a safetensors file."""
    specs, _ = lay_out(entries)
    order = list(specs)
    obj: dict[str, Any] = {}
    if metadata:
        obj["__metadata__"] = dict(metadata)
    obj.update({n: specs[n].to_json() for n in order})
    raw = json.dumps(obj, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % DATA_ALIGN)
    return UnitLayout(struct.pack("<Q", len(raw)) + raw, specs)


def new_unit_buffer(layout: UnitLayout) -> bytearray:
    buf = bytearray(layout.total_bytes)
    buf[: layout.data_start] = layout.header
    return buf


def tensor_view(buf: bytearray | memoryview, layout_or_start: UnitLayout | int, name: str, spec: TensorSpec) -> torch.Tensor:
    start = layout_or_start.data_start if isinstance(layout_or_start, UnitLayout) else layout_or_start
    import torch

    dtype = _torch_dtypes()[0][spec.dtype]
    count = math.prod(spec.shape)
    if count == 0:
        return torch.empty(spec.shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype, count=count, offset=start + spec.data_offsets[0]).view(spec.shape)


def parse_header(
    buf: bytes | bytearray | memoryview, total_size: int | None = None
) -> tuple[dict[str, TensorSpec], dict[str, str], int]:
    """Parse and validate a safetensors header. Returns (tensors, metadata, data_start).

    ``buf`` holds at least the header; ``total_size`` is the whole file's size (default ``len(buf)``).
    """
    size = len(buf) if total_size is None else total_size
    if len(buf) < 8:
        raise UnitFormatError(f"unit is {len(buf)} bytes: too short for a safetensors header")
    (n,) = struct.unpack_from("<Q", buf, 0)
    if n > MAX_HEADER_BYTES or 8 + n > min(size, len(buf)):
        raise UnitFormatError(f"safetensors header length {n} exceeds the {size}-byte unit (truncated?)")
    try:
        obj = json.loads(bytes(buf[8 : 8 + n]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UnitFormatError(f"safetensors header is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise UnitFormatError("safetensors header must be a JSON object")
    metadata = obj.pop("__metadata__", None) or {}
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise UnitFormatError("safetensors __metadata__ must map strings to strings")
    tensors = {name: TensorSpec.from_json(name, spec) for name, spec in obj.items()}
    data_len = size - 8 - n
    # Tensors must tile the data section exactly: no gaps, overlaps or bytes past the end.
    pos = 0
    for name, spec in sorted(tensors.items(), key=lambda kv: kv[1].data_offsets):
        if spec.data_offsets[0] != pos:
            raise UnitFormatError(f"tensor {name!r} starts at {spec.data_offsets[0]}, expected {pos}")
        pos = spec.data_offsets[1]
    if pos != data_len:
        raise UnitFormatError(f"unit data section is {data_len} bytes but tensors cover {pos} (truncated?)")
    return tensors, dict(metadata), 8 + n


def decode_unit(
    buf: bytearray | memoryview, expected: Mapping[str, TensorSpec] | None = None
) -> dict[str, torch.Tensor]:
    """Zero-copy decode of a unit held in a writable buffer.

    Args:
        buf: the whole unit file (writable, so ``torch.frombuffer`` needs no copy).
        expected: the manifest's tensor specs; the file's header must match them exactly.

    Returns:
        ``{name: tensor}`` views into ``buf``.

    Raises:
        UnitFormatError: malformed header, truncated data, or a mismatch with ``expected``.
    """
    tensors, _, start = parse_header(buf)
    if expected is not None and dict(expected) != tensors:
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        raise UnitFormatError(
            f"unit does not match its manifest entry (missing {missing[:5]}, unexpected {extra[:5]}, "
            "or different dtype/shape/offsets): re-chunk the model"
        )
    return {name: tensor_view(buf, start, name, spec) for name, spec in tensors.items()}


def encode_tensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytearray:
    """Serialize tensors to safetensors bytes (small helper for tests and tiny units)."""
    layout = plan_unit({n: (dtype_name(t.dtype), tuple(t.shape)) for n, t in tensors.items()}, metadata)
    buf = new_unit_buffer(layout)
    for name, t in tensors.items():
        if t.numel():
            tensor_view(buf, layout, name, layout.tensors[name]).copy_(t)
    return buf
