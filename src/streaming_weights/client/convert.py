"""On-arrival conversion of fetched units to the compute dtype (casting and dequantization).

Units travel in their stored dtype (a bfloat16 checkpoint as bfloat16, a quantized one as int8/int4 codes
plus scales): the bytes on the wire are the stored bytes, and :attr:`FetchedUnit.nbytes` keeps counting
them. :class:`ConvertingSource` wraps any :class:`UnitSource` and converts each verified unit once, right
after it arrives, into a compute-dtype buffer taken from the same :class:`BufferPool` as receive buffers;
the receive buffer goes back to the pool at once, so buffer reuse and the memory bound still hold (one
compute buffer per held unit, plus one receive buffer per fetch in flight). A unit already in the
compute dtype passes through untouched (zero copy).

Which tensors stay float32 (what ``from_pretrained(dtype=...)`` keeps in float32, e.g. T5's ``wo`` under
float16) is the model's business: the ``keep_fp32`` resolver given to :class:`ConvertingSource` at construction
answers it per manifest (``models.architecture.fp32_names_for``).
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch

from ..exceptions import ConfigurationError, UnitFormatError
from ..format import Manifest, UnitEntry
from ..format import chunkfile
from ..format.chunkfile import TensorSpec, dtype_name, itemsize, lay_out, parse_header, tensor_view
from ..format.quant import OFFSET_SUFFIX, SCALE_SUFFIX, QuantSpec, decode_into, group_size, read_quant_metadata
from .base import FetchedUnit, SourceWrapper, UnitSource
from .buffers import unit_buffer
from .qkernel import kernel_form, kernel_scheme, pack_into

if TYPE_CHECKING:
    from .buffers import BufferPool

_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float": torch.float32, "half": torch.float16, "float64": torch.float64}


def parse_compute_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """transformers' spellings of a compute dtype: a floating ``torch.dtype``, its name (``"bfloat16"``,
    ``"torch.float16"``), or ``None`` / ``"auto"`` (compute in the stored dtype).

    Raises:
        ConfigurationError: anything else.
    """
    if dtype is None or (isinstance(dtype, str) and dtype.strip().lower() == "auto"):
        return None
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ConfigurationError(f"dtype must be a floating dtype, got {dtype}")
        return dtype
    key = str(dtype).strip().removeprefix("torch.")
    if key not in _NAMES:
        raise ConfigurationError(f"dtype must be 'auto' or one of {sorted(_NAMES)}, got {dtype!r}")
    return _NAMES[key]


@dataclass(frozen=True)
class _Plan:
    """How one unit converts: its quantized tensors and the compute buffer's layout."""

    quant: dict[str, QuantSpec]
    targets: dict[str, TensorSpec]  # name -> spec in the compute buffer (offsets from 0)
    size: int
    kernel: frozenset[str] = frozenset()  # quantized tensors written in kernel form (client.qkernel)
    in_place: bool = False  # kernel form is the stored bytes: ``targets`` / ``size`` are the scales' own buffer


def _target(dtype: str, want: torch.dtype, keep32: bool) -> str:
    """Stored safetensors dtype -> compute dtype name (only floating tensors convert)."""
    if dtype not in ("F32", "F16", "BF16", "F64"):
        return dtype
    return "F32" if keep32 else dtype_name(want)


class ConvertingSource(SourceWrapper):
    """A :class:`UnitSource` whose units arrive in the compute dtype, dequantized.

    Args:
        source: the source to fetch from (verification happens there, on the stored bytes).
        dtype: the compute dtype (see :func:`parse_compute_dtype`); ``None``: the manifest's dtype, so only
            quantized tensors convert.
        keep_fp32: ``(manifest, compute dtype) -> tensor names`` converted to float32 whatever ``dtype`` is
            (asked once per manifest); ``None``: none.
        keep_codes: the compressed tier: a *streamed* unit holding quantized tensors arrives as it is stored
            (int8 / int4 codes and scales, what the cache then holds) and is converted per use by
            :meth:`expand` into a buffer the caller owns; resident units still convert on arrival.
        kernel: ``manifest -> tensor names`` torch's weight-only kernels compute with (``models.qlinear``: the
            linear weights of streamed blocks; asked once per manifest): such a tensor, stored as codes a kernel
            takes (:func:`~.qkernel.kernel_scheme`), arrives in kernel form (:func:`~.qkernel.pack_into`, about
            the bytes of its codes) and its unit converts on arrival, never per use; ``None``: none.

    Raises:
        ConfigurationError: an invalid ``dtype``.

    Other attributes (``reconnects``, …) are the wrapped source's.
    """

    def __init__(self, source: UnitSource, dtype: str | torch.dtype | None = None,
                 keep_fp32: Callable[[Manifest, torch.dtype], Iterable[str]] | None = None,
                 keep_codes: bool = False, kernel: Callable[[Manifest], Iterable[str]] | None = None) -> None:
        super().__init__(source)
        self.keep_codes = keep_codes
        self._kernel = kernel
        self._kernel_names: dict[tuple[str, str], frozenset[str]] = {}
        self.dtype = parse_compute_dtype(dtype)
        self._keep_fp32 = keep_fp32
        self._fp32: dict[tuple[str, str], frozenset[str]] = {}
        self.converted_units = 0
        self.convert_seconds = 0.0
        self.converted_bytes = 0  # compute-dtype bytes written
        self._plans: dict[tuple[str, str, frozenset[str]], _Plan | None] = {}

    def __getattr__(self, name: str) -> Any:  # only reached for attributes this class lacks
        if name == "source":
            raise AttributeError(name)
        return getattr(self.source, name)

    def compute_dtype(self, manifest: Manifest) -> torch.dtype:
        """The dtype units of ``manifest`` are computed in."""
        stored = getattr(torch, manifest.dtype, None)
        return self.dtype or (stored if isinstance(stored, torch.dtype) else torch.float32)

    def keep_fp32(self, manifest: Manifest) -> frozenset[str]:
        """Tensor names of ``manifest`` kept in float32 (the resolver's answer, asked once per manifest)."""
        key = (manifest.name, str(id(manifest)))
        if key not in self._fp32:
            want = self.compute_dtype(manifest)
            self._fp32[key] = frozenset(self._keep_fp32(manifest, want)) if self._keep_fp32 else frozenset()
        return self._fp32[key]

    def kernel_names(self, manifest: Manifest, unit: str) -> frozenset[str]:
        """The tensors of streamed block or row shard ``unit`` that arrive in kernel form (see ``kernel``): an
        lm_head's shards do; an embedding's (gathered by rows, tied or not) stay codes (:meth:`codes_kept`)."""
        entry = manifest.unit(unit)
        if self._kernel is None or entry.role not in ("streamed", "shard"):
            return frozenset()
        key = (manifest.name, str(id(manifest)))
        if key not in self._kernel_names:
            self._kernel_names[key] = frozenset(self._kernel(manifest)) - self.keep_fp32(manifest)
        wanted = self._kernel_names[key]
        return frozenset(n for n in entry.tensors if n in wanted and kernel_scheme(entry.tensors, n))

    def codes_kept(self, manifest: Manifest, unit: str) -> bool:
        """Whether ``unit`` stays as its stored codes in memory (the compressed tier): streamed blocks, and with
        ``kernel`` the row shards too (an embedding's rows are gathered from the codes, :meth:`gather`; a
        shard a linear layer computes with is expanded per use). Experts, and shards without ``kernel``,
        convert on arrival."""
        if not self.keep_codes or self.kernel_names(manifest, unit):
            return False
        entry = manifest.unit(unit)
        roles = ("streamed", "shard") if self._kernel is not None else ("streamed",)
        return entry.role in roles and any(n.endswith(SCALE_SUFFIX) for n in entry.tensors)

    def held_bytes(self, entry: UnitEntry, manifest: Manifest) -> int:
        """Bytes ``entry`` occupies while cached: its codes in the compressed tier, else converted."""
        return entry.bytes if self.codes_kept(manifest, entry.name) else max(entry.bytes, self.memory_bytes(entry, manifest))

    def expand(self, manifest: Manifest, fetched: FetchedUnit, out: Any) -> dict[str, torch.Tensor]:
        """The compute-dtype tensors of a unit kept as codes, written into ``out`` (at least
        :meth:`memory_bytes` long, owned by the caller); ``fetched`` is left as it is (still codes)."""
        plan = self._plan(manifest, fetched)
        if plan is None:
            return fetched.tensors
        return _convert(dict(fetched.tensors), plan, out)

    def gather(self, manifest: Manifest, unit: str, tensors: dict[str, torch.Tensor], name: str,
               rows: torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` of tensor ``name`` of ``unit`` (its ``tensors`` as held: codes or converted) in the
        compute dtype: a codes tensor's rows are decoded alone, to the values :meth:`expand` gives them."""
        plan = self._plans.get(self._plan_key(manifest, unit))
        spec = plan.quant.get(name) if plan is not None and self.codes_kept(manifest, unit) else None
        if spec is None:  # converted on arrival (or never quantized): the rows as they are
            return tensors[name][rows]
        rows = rows.to(tensors[name].device)
        picked = {s: tensors[name + s][rows] for s in spec.stored()}
        out = torch.empty((rows.numel(), spec.shape[1]), dtype=chunkfile.DTYPES[plan.targets[name].dtype])
        return decode_into(out, picked, replace(spec, shape=(rows.numel(), spec.shape[1])))

    def memory_bytes(self, entry: UnitEntry, manifest: Manifest) -> int:
        """Bytes ``entry``'s tensors occupy once converted (the compute buffer; ``entry.bytes`` if the unit
        passes through unconverted; its bytes and the scales' buffer if its kernel form is in place). For
        memory planning: computed from the manifest alone."""
        want, fp32 = self.compute_dtype(manifest), self.keep_fp32(manifest)
        kernel = self.kernel_names(manifest, entry.name)
        if self._computes_in_place(manifest, entry.name, entry.tensors, _data_start(entry)):
            return entry.bytes + _scales_layout(entry.tensors, kernel)[1]
        total, changed = 0, False
        for name, spec in entry.tensors.items():
            if name.endswith((SCALE_SUFFIX, OFFSET_SUFFIX)):
                changed = True
                continue
            if name in kernel:
                total += _kernel_bytes(entry.tensors, name)
                continue
            shape = list(spec.shape)
            if name + SCALE_SUFFIX in entry.tensors:
                changed = True
                if spec.dtype == "U8":  # int4: two codes per byte
                    shape[-1] *= 2
                dt = "F32" if name in fp32 else dtype_name(want)
            else:
                dt = _target(spec.dtype, want, name in fp32)
            changed |= dt != spec.dtype
            total += _padded(math.prod(shape) * itemsize(dt))
        return total if changed else entry.bytes

    # -------------------------------------------------------------------------------- conversion
    async def fetch_unit(self, manifest: Manifest, unit: str) -> FetchedUnit:
        """Fetch ``unit`` (verified by the wrapped source) and convert it to the compute dtype.

        Raises:
            QuantizationError: malformed quantization metadata or companion tensors (not retried).
            Whatever the wrapped source raises.
        """
        fetched = await self.source.fetch_unit(manifest, unit)
        plan = self._plan(manifest, fetched)
        if plan is None or self.codes_kept(manifest, unit):
            return fetched
        if plan.in_place:  # the codes stay where they landed; only the scales change form (a few KiB)
            fetched.tensors = _scales_in_place(fetched.tensors, plan)
            return fetched
        pool = self.source.buffer_pool
        out = pool.take(plan.size) if pool is not None else unit_buffer(plan.size)  # page-aligned either way
        t0 = time.perf_counter()
        # torch ops release the GIL: converting in a worker thread lets the I/O loop keep receiving.
        # the stored views leave ``fetched`` here, so none outlives the conversion (see _convert)
        stored, fetched.tensors = fetched.tensors, {}
        tensors = await asyncio.to_thread(_convert, stored, plan, out)
        del stored
        self.convert_seconds += time.perf_counter() - t0
        self.converted_units += 1
        self.converted_bytes += plan.size
        raw, fetched.buffer, fetched.tensors = fetched.buffer, out, tensors
        if pool is not None:
            self._give_back(pool, raw)
        return fetched

    def _give_back(self, pool: BufferPool, raw: Any) -> None:
        """Return a receive buffer to the pool. The wrapped source decodes in a worker thread whose finished
        future may keep the stored views alive a moment longer; the pool holds such a buffer aside and
        takes it once they are gone (:meth:`BufferPool.give`)."""
        pool.give(raw)

    def _plan_key(self, manifest: Manifest, unit: str) -> tuple[str, str, frozenset[str]]:
        return manifest.name, manifest.unit(unit).blake3, self.keep_fp32(manifest)

    def _plan(self, manifest: Manifest, fetched: FetchedUnit) -> _Plan | None:
        key = self._plan_key(manifest, fetched.name)
        if key not in self._plans:
            self._plans[key] = self._make_plan(manifest, fetched)
        return self._plans[key]

    def _make_plan(self, manifest: Manifest, fetched: FetchedUnit) -> _Plan | None:
        if fetched.buffer is None:
            raise UnitFormatError(f"unit {fetched.name!r} arrived without its buffer: cannot read its header")
        stored, metadata, start = parse_header(fetched.buffer)
        quant = read_quant_metadata(metadata, stored)
        want, fp32 = self.compute_dtype(manifest), self.keep_fp32(manifest)
        kernel = self.kernel_names(manifest, fetched.name) & set(quant)
        if set(quant) == kernel and self._computes_in_place(manifest, fetched.name, stored, start):
            return _Plan(quant, *_scales_layout(stored, kernel), kernel, in_place=True)
        entries: dict[str, tuple[str, tuple[int, ...]]] = {}
        for name, spec in stored.items():
            if name.endswith((SCALE_SUFFIX, OFFSET_SUFFIX)) and name.rsplit(".", 1)[0] in quant:
                continue
            keep32 = name in fp32
            if name in kernel:
                entries.update({name + s: form for s, form in kernel_form(quant[name]).items()})
            elif name in quant:
                entries[name] = ("F32" if keep32 else dtype_name(want), quant[name].shape)
            else:
                entries[name] = (_target(spec.dtype, want, keep32), spec.shape)
        if not quant and all(entries[n][0] == s.dtype for n, s in stored.items()):
            return None
        targets, size = lay_out(entries, ALIGN)
        return _Plan(quant, targets, size, kernel)

    def spare_bytes(self, manifest: Manifest) -> int:
        """Idle bytes the buffer pool should keep for reuse: one receive buffer plus one compute buffer of the
        largest streamed unit when units convert, else one unit (the pool's owner sizes it with this)."""
        streamed = list(manifest.streamed)
        if not streamed:
            return 0
        converting = [self.memory_bytes(u, manifest) for u in streamed if self._needs_buffer(u, manifest)]
        return max(u.bytes for u in streamed) + max(converting, default=0)

    def _needs_buffer(self, entry: UnitEntry, manifest: Manifest) -> bool:
        """Whether ``entry`` converts into a compute buffer from the pool on arrival."""
        return (self.memory_bytes(entry, manifest) != entry.bytes
                and not self._computes_in_place(manifest, entry.name, entry.tensors, _data_start(entry)))

    def _computes_in_place(self, manifest: Manifest, unit: str, tensors: dict[str, TensorSpec], start: int) -> bool:
        """:func:`_in_place` for ``unit`` (its tensor specs, its data section starting at ``start``)."""
        want, fp32 = self.compute_dtype(manifest), self.keep_fp32(manifest)
        return _in_place(tensors, start, self.kernel_names(manifest, unit), lambda n, t: _target(t.dtype, want, n in fp32))


def _convert(stored: dict[str, torch.Tensor], plan: _Plan, out: Any) -> dict[str, torch.Tensor]:
    """Write every tensor of ``stored`` into ``out`` in its target dtype (dequantizing); views into ``out``.

    On arrival the caller hands over the unit's own dict (emptied from the unit, so no stored view outlives
    this call: the executor keeps its arguments a moment after the result is delivered, and a live view would
    keep the receive buffer from going back to the pool); :meth:`ConvertingSource.expand` passes a copy.
    """
    result: dict[str, torch.Tensor] = {name: tensor_view(out, 0, name, spec) for name, spec in plan.targets.items()}
    companions = {name + s for name in plan.kernel for s in kernel_form(plan.quant[name]) if s}
    for name, dst in result.items():
        q = plan.quant.get(name)
        parts = {s: stored[name + s] for s in q.stored()} if q is not None else {}
        if name in plan.kernel:
            pack_into({s: result[name + s] for s in kernel_form(q)}, parts, q)
        elif q is not None:
            decode_into(dst, parts, q)
        elif name not in companions and dst.numel():  # (companions are written with their weight)
            dst.copy_(stored[name])
    stored.clear()  # the stored views die here, whoever still holds the dict
    return result


#: every tensor of a compute buffer starts at a multiple of this many bytes (the buffer itself is page-aligned):
#: torch's int8 kernel reads its weight with aligned vector loads and crashes on one 8 bytes off a 16-byte boundary
ALIGN = 64


def _in_place(tensors: dict[str, TensorSpec], start: int, kernel: frozenset[str],
              target: Callable[[str, TensorSpec], str]) -> bool:
    """Whether a unit computes on its stored bytes with no compute buffer: every quantized tensor of it is
    int8-channel codes in ``kernel`` (whose kernel form is the codes as stored) starting at a multiple of
    :data:`ALIGN` in the page-aligned receive buffer (``start``: where the data section begins; the chunker lays
    units out so, :data:`~..format.chunkfile.DATA_ALIGN`), and no other tensor changes dtype (``target``:
    ``(name, spec) -> compute dtype``). Only the scales change form, float16 ``[out, 1]`` to bfloat16 ``[out]``."""
    quantized = {n for n in tensors if n + SCALE_SUFFIX in tensors}
    if not kernel or quantized != set(kernel):
        return False
    if any(kernel_scheme(tensors, n) != "int8-channel" or (start + tensors[n].data_offsets[0]) % ALIGN for n in kernel):
        return False
    companions = {n + s for n in quantized for s in (SCALE_SUFFIX, OFFSET_SUFFIX)}
    return all(target(n, t) == t.dtype for n, t in tensors.items() if n not in quantized | companions)


def _data_start(entry: UnitEntry) -> int:
    """Where ``entry``'s data section begins in its file (from the manifest: its size less the data's)."""
    return entry.bytes - max((t.data_offsets[1] for t in entry.tensors.values()), default=0)


def _scales_layout(tensors: dict[str, TensorSpec], kernel: frozenset[str]) -> tuple[dict[str, TensorSpec], int]:
    """The kernel-form scales of an in-place unit (:func:`_in_place`) laid out in a buffer of their own."""
    return lay_out({n + SCALE_SUFFIX: kernel_form(_kernel_spec(tensors, n))[SCALE_SUFFIX] for n in kernel}, ALIGN)


def _kernel_spec(tensors: dict[str, TensorSpec], name: str) -> QuantSpec:
    """The :class:`QuantSpec` of stored weight ``name``, codes a kernel takes (from the tensor specs alone)."""
    scheme = kernel_scheme(tensors, name)
    out, inp = tensors[name].shape[0], tensors[name].shape[1] * (2 if scheme == "int4" else 1)
    return QuantSpec(scheme, group_size(scheme, inp), (out, inp), "F32")


def _scales_in_place(stored: dict[str, torch.Tensor], plan: _Plan) -> dict[str, torch.Tensor]:
    """An in-place unit's tensors: the stored views, with each scale vector in kernel form in a new buffer."""
    buf = unit_buffer(plan.size)  # aligned, as the kernel's operands must be
    out = dict(stored)
    for name, spec in plan.targets.items():
        out[name] = tensor_view(buf, 0, name, spec)
        out[name].copy_(stored[name].view(-1))
    return out


def _kernel_bytes(tensors: dict[str, TensorSpec], name: str) -> int:
    """Bytes of stored weight ``name`` in kernel form (from the manifest's tensor specs alone)."""
    return sum(_padded(math.prod(shape) * itemsize(dt)) for dt, shape in kernel_form(_kernel_spec(tensors, name)).values())


def _padded(nbytes: int) -> int:
    """A tensor's room in a compute buffer (laid out with ``lay_out(entries, ALIGN)``)."""
    return -(-nbytes // ALIGN) * ALIGN


__all__ = ["ConvertingSource", "parse_compute_dtype"]
