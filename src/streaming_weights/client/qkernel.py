"""torch's weight-only quantized matmul kernels on the CPU: which stored codes they take, the layout they
want (produced once, when a unit arrives), and the matmul itself.

* ``int4`` codes (asymmetric, groups of 32, ``w = q * scale + offset``) -> ``torch._weight_int4pack_mm_for_cpu``.
  Its weight is the codes re-packed into the platform's layout (what
  ``torch.ops.aten._convert_weight_to_int4pack_for_cpu`` writes: on AVX-512, blocks of 64 rows, byte ``d`` of
  column ``k`` holding rows ``d`` and ``d + 32``), and its ``scales_and_zeros`` ``[in / 32, out, 2]`` follow
  ``w = (q - 8) * scale + zero``, so ``zero = offset + 8 * scale``. The layout is found once per process by
  packing a probe with torch's own converter (:func:`_int4_block`); a shape it does not cover goes through
  that converter itself.
* ``int8-channel`` codes (one scale per output row) -> ``torch._weight_int8pack_mm``: the codes as stored,
  the scales as a vector. Group-wise ``int8`` (groups of 64) has no such kernel (it wants one scale per row).

Both kernels are fast only with bfloat16 activations here (one thread, one 2048x5632 projection, batch 1:
bf16 dense 1.45 ms, int8pack 0.59 ms, int4pack 0.61 ms; with float32 activations 9.5 and 20.8 ms, with float16
11.7 and 21.7 ms), so :data:`KERNEL_DTYPE` is bfloat16 whatever the model computes in: a layer's input is cast
to it and its output back. Kernel-form scales are therefore bfloat16 too, the same bytes as the stored float16
ones: a unit in kernel form is as large as its codes.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..format.quant import OFFSET_SUFFIX, SCALE_SUFFIX, QuantSpec

#: the activations' dtype in the kernels (their only fast path on this CPU, see the module docstring)
KERNEL_DTYPE = torch.bfloat16
#: above this many rows (a prefill), int8-channel dequantizes its codes to a transient bfloat16 weight for the
#: one call and runs the dense matmul: on the issue's projection, one thread, ``_weight_int8pack_mm`` takes
#: ~0.6 ms per row, dequantize + dense 8-16 ms for 8 to 64 rows (crossover ~20 rows). Slightly less exact than
#: the kernel (its weights rounded to bfloat16: SmolLM2 perplexity 25.11 vs 25.05 all-kernel). int4's packed
#: layout is the platform's: it always runs its kernel (33.7 ms vs 48.8 ms dequantizing per use at 64 rows).
INT8_KERNEL_MAX_ROWS = 20
#: the int4 kernel's companion: ``[in / group, out, 2]`` (scale, zero) in :data:`KERNEL_DTYPE`
ZEROS_SUFFIX = ".qzeros"
_OPS = ("_weight_int4pack_mm_for_cpu", "_convert_weight_to_int4pack_for_cpu", "_weight_int8pack_mm")
_INT4_GROUPS = (32, 64, 128, 256)  # what the int4 kernel accepts
_INT4_ROWS = 16  # it packs output rows in multiples of this (another row count: dequantized per use)
#: torch's int8 kernel reads input features 16 at a time: another width computes NaN or crashes (torch 2.13, CPU;
#: measured: 72 and 100 fail, every multiple of 16 from 16 to 576 matches), so such a weight is dequantized per use
_INT8_IN = 16


def unavailable() -> str | None:
    """Why this torch cannot run the kernels (``None``: it can)."""
    missing = [op for op in _OPS if not hasattr(torch.ops.aten, op)]
    return f"torch {torch.__version__} lacks {', '.join(missing)}" if missing else None


def kernel_scheme(tensors: Mapping[str, Any], name: str) -> str | None:
    """``"int4"`` or ``"int8-channel"`` when the stored tensor ``name`` (``tensors``: name -> TensorSpec with
    ``dtype`` and ``shape``) is codes a kernel computes on, else ``None`` (unquantized, or group-wise int8)."""
    scale = tensors.get(name + SCALE_SUFFIX)
    codes = tensors.get(name)
    if scale is None or codes is None or len(codes.shape) != 2:
        return None
    if codes.dtype == "U8" and name + OFFSET_SUFFIX in tensors:
        groups = scale.shape[1]
        fits = (2 * codes.shape[1]) // groups in _INT4_GROUPS and codes.shape[0] % _INT4_ROWS == 0
        return "int4" if fits else None
    if codes.dtype == "I8" and tuple(scale.shape) == (codes.shape[0], 1) and codes.shape[1] % _INT8_IN == 0:
        return "int8-channel"
    return None


def kernel_form(spec: QuantSpec) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{suffix: (safetensors dtype, shape)}`` of a weight in kernel form ("" is the weight itself)."""
    out, inp = spec.shape
    if spec.scheme == "int4":
        return {"": ("U8", (out, inp // 2)), ZEROS_SUFFIX: ("BF16", (spec.groups, out, 2))}
    return {"": ("I8", (out, inp)), SCALE_SUFFIX: ("BF16", (out,))}


def pack_into(dst: Mapping[str, torch.Tensor], stored: Mapping[str, torch.Tensor], spec: QuantSpec) -> None:
    """Write the stored codes (``{suffix: tensor}``, see ``QuantSpec.stored``) into ``dst`` (views of
    :func:`kernel_form`'s shapes)."""
    if spec.scheme != "int4":
        dst[""].copy_(stored[""])
        dst[SCALE_SUFFIX].copy_(stored[SCALE_SUFFIX].view(-1))
        return
    scale, offset = stored[SCALE_SUFFIX].to(torch.float32), stored[OFFSET_SUFFIX].to(torch.float32)
    zeros = dst[ZEROS_SUFFIX]
    zeros[..., 0].copy_(scale.t())
    zeros[..., 1].copy_((offset + 8 * scale).t())
    _repack_int4(dst[""], stored[""])


def _repack_int4(out: torch.Tensor, codes: torch.Tensor) -> None:
    """Our nibbles (row ``n``: byte ``j`` = values ``2j`` low, ``2j + 1`` high) -> torch's packed layout."""
    rows, half = codes.shape
    block = _int4_block()
    if block is None or rows % block:
        unpacked = torch.stack([codes & 0x0F, codes >> 4], dim=-1).view(rows, 2 * half).to(torch.int32)
        out.copy_(torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpacked, 1))
        return
    c = codes.view(rows // block, 2, block // 2, half)  # [block, top/bottom half of its rows, row, byte]
    lo, hi = c[:, 0], c[:, 1]
    o = out.view(rows // block, half, 2, block // 2)  # [block, byte j, value 2j / 2j+1, row]
    o[:, :, 0].copy_(((lo & 0x0F) | ((hi & 0x0F) << 4)).transpose(1, 2))
    o[:, :, 1].copy_(((lo >> 4) | (hi & 0xF0)).transpose(1, 2))


_BLOCK: list[int | None] = []


def _int4_block() -> int | None:
    """The row block of torch's int4 CPU layout on this machine (the layout :func:`_repack_int4` writes),
    found by packing a probe with torch's converter; ``None``: a layout it does not write (use torch's)."""
    if not _BLOCK:
        gen = torch.Generator().manual_seed(0)
        probe = torch.randint(0, 256, (128, 32), dtype=torch.uint8, generator=gen)
        want = torch.empty_like(probe)
        unpacked = torch.stack([probe & 0x0F, probe >> 4], dim=-1).view(128, 64).to(torch.int32)
        want.copy_(torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpacked, 1))
        _BLOCK.append(None)
        for block in (64, 32, 16):
            _BLOCK[0] = block
            got = torch.empty_like(probe)
            _repack_int4(got, probe)
            if torch.equal(got, want):
                break
        else:
            _BLOCK[0] = None
    return _BLOCK[0]


def kernel_parts(tensors: Mapping[str, torch.Tensor], name: str) -> dict[str, torch.Tensor] | None:
    """Weight ``name``'s kernel form among a unit's ``tensors`` (``{"": weight, companion suffix: companion}``, what
    :func:`linear` takes), or ``None`` when it is not in kernel form (no companion beside it)."""
    extra = next((s for s in (ZEROS_SUFFIX, SCALE_SUFFIX) if name + s in tensors), None)
    return None if extra is None else {"": tensors[name], extra: tensors[name + extra]}


def linear(x: torch.Tensor, parts: Mapping[str, torch.Tensor], bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, W, bias)`` computed by the kernel on ``W``'s kernel form ``parts`` (``x``: ``[..., in]``,
    any batch shape and any number of tokens; computed in :data:`KERNEL_DTYPE`, returned in ``x``'s dtype)."""
    weight = parts[""]
    zeros = parts.get(ZEROS_SUFFIX)
    out_features = weight.shape[0]
    in_features = x.shape[-1]
    flat = x.reshape(-1, in_features).to(KERNEL_DTYPE).contiguous()
    if flat.shape[0] == 0:
        y = flat.new_empty((0, out_features))
    elif zeros is not None:
        y = torch._weight_int4pack_mm_for_cpu(flat, weight, in_features // zeros.shape[0], zeros)
    elif flat.shape[0] > INT8_KERNEL_MAX_ROWS:  # what dequantize-per-use computes in bfloat16
        y = torch.nn.functional.linear(flat, weight.to(KERNEL_DTYPE).mul_(parts[SCALE_SUFFIX].unsqueeze(1)))
    else:
        y = torch._weight_int8pack_mm(flat, weight, parts[SCALE_SUFFIX])
    y = y.view(*x.shape[:-1], out_features).to(x.dtype)
    return y if bias is None else y + bias


__all__ = ["INT8_KERNEL_MAX_ROWS", "KERNEL_DTYPE", "ZEROS_SUFFIX", "kernel_form", "kernel_parts", "kernel_scheme", "linear",
           "pack_into", "unavailable"]
