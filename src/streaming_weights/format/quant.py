"""Weight-only quantization of unit tensors: the encoding (chunk time) and the vectorized decoding (on arrival).

Three schemes, all group-wise along the last (input) dimension of a 2-D weight ``W[out, in]``:

* ``int8``: symmetric, groups of 64, one float16 scale per group: ``w = q * scale``, ``q`` in [-127, 127]
  (int8, stored ``[out, in]``).
* ``int8-channel``: ``int8`` with one group per row (group size = ``in``): one float16 scale per output
  channel, the layout torch's ``_weight_int8pack_mm`` computes on directly (``quantized_in_memory="kernel"``).
* ``int4``: asymmetric, groups of 32, float16 scale and offset per group (as GGUF's Q4_1 and FlexGen):
  ``w = q * scale + offset``, ``q`` in [0, 15], two per byte (element ``2j`` in the low nibble of byte
  ``j``, ``2j+1`` in the high nibble; stored uint8 ``[out, in / 2]``).

A quantized tensor ``NAME`` is stored as ``NAME`` (the codes), ``NAME.qscale`` (float16 ``[out, in / group]``)
and, for int4, ``NAME.qoffset`` (same shape), plus one entry in the unit header's
``__metadata__["quantization"]`` (JSON), which names the original shape and dtype. The layout is specified
byte by byte in ``docs/format.md``; :func:`read_quant_metadata` validates it strictly (any deviation raises
:class:`QuantizationError`), so a decoder never guesses.

Encoding uses the float16-rounded scales (the ones stored), so decoding reproduces exactly the values the
error bounds were measured on. This module imports torch lazily: a weight server never loads it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from ..exceptions import QuantizationError  # noqa: F401 (re-exported: quant errors are raised from here)
from .chunkfile import TensorSpec, _DTYPE_TABLE, itemsize

if TYPE_CHECKING:
    import torch

#: key in a unit's safetensors ``__metadata__``
METADATA_KEY = "quantization"
FORMAT_NAME = "streaming-weights-quant"
FORMAT_VERSION = 1
SCALE_SUFFIX = ".qscale"
OFFSET_SUFFIX = ".qoffset"
SCHEMES = ("int8", "int4", "int8-channel")
#: group size of each scheme (fixed: the error bounds in docs/format.md are measured with these);
#: ``int8-channel`` has none: its one group is the whole row (:func:`group_size`)
GROUP_SIZE = {"int8": 64, "int4": 32}
_FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")


def group_size(scheme: str, in_features: int) -> int:
    """The group size ``scheme`` uses on rows of ``in_features`` values."""
    return GROUP_SIZE.get(scheme, in_features)


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized: scheme, group size, and the original (decoded) shape and dtype."""

    scheme: str
    group_size: int
    shape: tuple[int, int]
    dtype: str  # safetensors name of the original dtype (the decoded tensor's default dtype)

    @property
    def groups(self) -> int:
        return self.shape[1] // self.group_size

    def stored(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """``{suffix: (dtype, shape)}`` of the stored tensors ("" is the codes tensor itself)."""
        out, inp = self.shape
        side = ("F16", (out, self.groups))
        if self.scheme != "int4":
            return {"": ("I8", (out, inp)), SCALE_SUFFIX: side}
        return {"": ("U8", (out, inp // 2)), SCALE_SUFFIX: side, OFFSET_SUFFIX: side}

    def stored_bytes(self) -> int:
        return sum(math.prod(shape) * itemsize(dt) for dt, shape in self.stored().values())

    def to_json(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "group_size": self.group_size, "shape": list(self.shape), "dtype": self.dtype}


def quant_spec(scheme: str, shape: tuple[int, ...], dtype: str) -> QuantSpec | None:
    """The spec for quantizing a ``dtype`` tensor of ``shape`` with ``scheme``; ``None`` if it cannot be
    (not 2-D, not floating, or the input dimension is not a multiple of the group size: stored as is).

    Raises:
        QuantizationError: an unknown scheme.
    """
    if scheme not in SCHEMES:
        raise QuantizationError(f"unknown quantization {scheme!r}; expected one of {list(SCHEMES)}")
    if len(shape) != 2 or dtype not in _FLOAT_DTYPES or shape[0] == 0 or shape[1] == 0:
        return None
    group = group_size(scheme, int(shape[1]))
    if shape[1] % group:
        return None
    return QuantSpec(scheme, group, (int(shape[0]), int(shape[1])), dtype)


def metadata_entry(specs: Mapping[str, QuantSpec]) -> dict[str, str]:
    """The ``__metadata__`` entries a unit holding ``specs`` carries (empty when nothing is quantized)."""
    if not specs:
        return {}
    doc = {"format": FORMAT_NAME, "version": FORMAT_VERSION,
           "tensors": {name: specs[name].to_json() for name in sorted(specs)}}
    return {METADATA_KEY: json.dumps(doc, separators=(",", ":"), sort_keys=True)}


def _fail(what: str) -> QuantizationError:
    return QuantizationError(f"malformed quantization metadata: {what}")


def _parse_spec(name: str, obj: Any) -> QuantSpec:
    if not isinstance(obj, dict) or set(obj) != {"scheme", "group_size", "shape", "dtype"}:
        raise _fail(f"{name!r} needs exactly scheme, group_size, shape, dtype")
    scheme, group, shape, dtype = obj["scheme"], obj["group_size"], obj["shape"], obj["dtype"]
    if scheme not in SCHEMES:
        raise _fail(f"{name!r}: unknown scheme {scheme!r} (expected one of {list(SCHEMES)})")
    if not (isinstance(shape, list) and len(shape) == 2 and all(type(d) is int and d > 0 for d in shape)):
        raise _fail(f"{name!r}: shape must be [out, in] of positive ints, got {shape!r}")
    if type(group) is not int or group != group_size(scheme, shape[1]):
        raise _fail(f"{name!r}: {scheme} uses groups of {group_size(scheme, shape[1])}, got {group!r}")
    if shape[1] % group:
        raise _fail(f"{name!r}: input dimension {shape[1]} is not a multiple of the group size {group}")
    if dtype not in _FLOAT_DTYPES:
        raise _fail(f"{name!r}: original dtype must be one of {list(_FLOAT_DTYPES)}, got {dtype!r}")
    return QuantSpec(scheme, group, (shape[0], shape[1]), dtype)


def read_quant_metadata(metadata: Mapping[str, str], tensors: Mapping[str, TensorSpec]) -> dict[str, QuantSpec]:
    """Validate a unit's quantization metadata against its tensors; ``{name: QuantSpec}`` (empty: none).

    Every quantized tensor's codes, scales and offsets must exist with exactly the dtype and shape its
    spec implies, and no companion tensor may exist without a spec.

    Raises:
        QuantizationError: anything else.
    """
    raw = metadata.get(METADATA_KEY)
    if raw is None:
        strays = [n for n in tensors if n.endswith((SCALE_SUFFIX, OFFSET_SUFFIX))]
        if strays:
            raise _fail(f"tensor {strays[0]!r} looks like a quantization companion but the unit has no metadata")
        return {}
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise _fail(f"not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME or not isinstance(doc.get("tensors"), dict):
        raise _fail(f"expected {{'format': {FORMAT_NAME!r}, 'version': {FORMAT_VERSION}, 'tensors': {{...}}}}")
    if doc.get("version") != FORMAT_VERSION:
        raise _fail(f"version {doc.get('version')!r} is not supported (this reader knows {FORMAT_VERSION})")
    specs = {name: _parse_spec(name, obj) for name, obj in doc["tensors"].items()}
    companions = set()
    for name, spec in specs.items():
        for suffix, (dtype, shape) in spec.stored().items():
            have = tensors.get(name + suffix)
            if have is None:
                raise _fail(f"{name!r} ({spec.scheme}) lacks its tensor {name + suffix!r}")
            if have.dtype != dtype or have.shape != shape:
                raise _fail(f"{name + suffix!r} is {have.dtype}{list(have.shape)}, {spec.scheme} of "
                            f"{list(spec.shape)} needs {dtype}{list(shape)}")
            if suffix:
                companions.add(name + suffix)
    strays = [n for n in tensors if n.endswith((SCALE_SUFFIX, OFFSET_SUFFIX)) and n not in companions]
    if strays:
        raise _fail(f"tensor {strays[0]!r} has no quantization entry")
    return specs


# ------------------------------------------------------------------------------------------ encoding
def encode(weight: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """Quantize ``weight`` (shape ``spec.shape``) -> ``{suffix: stored tensor}`` (see :meth:`QuantSpec.stored`).

    Computed in float32 from the float16-rounded scales, so the stored codes are the best ones for the
    stored scales. Raises QuantizationError if a group's scale overflows float16 (|w| > ~8e6).
    """
    import torch

    out, inp = spec.shape
    w = weight.detach().to(torch.float32).reshape(out, spec.groups, spec.group_size)
    if spec.scheme != "int4":
        # int8 scales are rounded to bfloat16 precision first (stored as float16, where such values are exact):
        # bfloat16 compute (decode_into casts the scales to the compute dtype) and torch's int8 kernel (bfloat16
        # scales) then use exactly the scale the codes were chosen for. A float16 scale rounded again to
        # bfloat16 at use left each row off by up to 0.4%: SmolLM2's perplexity rose 1.2% over bfloat16
        # instead of 0.8% (same codes, exact scales) - measured with the scales rounded first: -0.5%.
        scale = (w.abs().amax(dim=-1) / 127.0).to(torch.bfloat16).to(torch.float16)
        _check_finite(scale)
        s = scale.to(torch.float32).unsqueeze(-1)
        q = torch.where(s > 0, w / torch.where(s > 0, s, 1.0), 0.0).round_().clamp_(-127, 127)
        return {"": q.to(torch.int8).reshape(out, inp), SCALE_SUFFIX: scale}
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    offset = lo.to(torch.float16)
    scale = ((hi - offset.to(torch.float32)) / 15.0).to(torch.float16)
    _check_finite(scale)
    _check_finite(offset)
    s, o = scale.to(torch.float32).unsqueeze(-1), offset.to(torch.float32).unsqueeze(-1)
    q = torch.where(s > 0, (w - o) / torch.where(s > 0, s, 1.0), 0.0).round_().clamp_(0, 15).to(torch.uint8)
    q = q.reshape(out, inp // 2, 2)
    packed = q[..., 0] | (q[..., 1] << 4)
    return {"": packed.contiguous(), SCALE_SUFFIX: scale, OFFSET_SUFFIX: offset}


def _check_finite(t: torch.Tensor) -> None:
    import torch

    if not bool(torch.isfinite(t).all()):
        raise QuantizationError("weight values overflow float16 quantization scales (|w| too large or not finite)")


# ------------------------------------------------------------------------------------------ decoding
def decode_into(out: torch.Tensor, stored: Mapping[str, torch.Tensor], spec: QuantSpec) -> torch.Tensor:
    """Dequantize ``stored`` (``{suffix: tensor}``) into ``out`` (a floating tensor of ``spec.shape``).

    Vectorized torch ops over whole tensors, all in ``out``'s dtype (the scales are cast first: they are
    tiny): cast the codes into ``out``, then scale (and shift) it in place.
    """
    rows, _ = spec.shape
    o3 = out.view(rows, spec.groups, spec.group_size)
    scale = stored[SCALE_SUFFIX].to(out.dtype).unsqueeze(-1)
    if spec.scheme != "int4":
        # cast, then scale in place: ~5x faster than one mixed-dtype torch.mul(q, scale, out=...), which
        # takes torch's non-vectorized type-promotion path (measured on a 67 MB unit, one thread)
        out.copy_(stored[""])
        o3.mul_(scale)
        return out
    packed = stored[""]
    pairs = out.view(rows, spec.shape[1] // 2, 2)
    pairs[..., 0].copy_(packed & 0x0F)
    pairs[..., 1].copy_(packed >> 4)
    o3.mul_(scale).add_(stored[OFFSET_SUFFIX].to(out.dtype).unsqueeze(-1))
    return out


def dequantize(stored: Mapping[str, torch.Tensor], spec: QuantSpec, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A new tensor of ``spec.shape`` in ``dtype`` (default: the original dtype) from the stored tensors."""
    import torch

    from .chunkfile import DTYPES

    out = torch.empty(spec.shape, dtype=dtype or DTYPES[spec.dtype])
    return decode_into(out, stored, spec)


def max_abs_error(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The per-group error bound of ``spec``'s encoding of ``weight``: half a quantization step
    (``scale / 2``), plus float16 rounding of the offset for int4. Shape ``[out, groups]``."""
    import torch

    enc = encode(weight, spec)
    scale = enc[SCALE_SUFFIX].to(torch.float32)
    bound = scale / 2
    if spec.scheme == "int4":
        # the offset is the group minimum rounded to float16 (relative error 2**-11), and codes are clamped
        # to [0, 15]: the top of the group may sit up to that rounding above 15 steps.
        lo = weight.detach().to(torch.float32).reshape(spec.shape[0], spec.groups, spec.group_size).amin(-1)
        bound = bound + (lo - enc[OFFSET_SUFFIX].to(torch.float32)).abs() + scale * 2.0**-10
    return bound


__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "GROUP_SIZE", "METADATA_KEY", "OFFSET_SUFFIX", "SCALE_SUFFIX", "SCHEMES",
    "QuantSpec", "QuantizationError", "decode_into", "dequantize", "encode", "group_size", "max_abs_error",
    "metadata_entry",
    "quant_spec", "read_quant_metadata",
]
