"""``quantized_in_memory="kernel"``: the linear layers of streamed blocks compute on their codes with torch's
weight-only quantized kernels (:mod:`streaming_weights.client.qkernel`) instead of on dequantized weights.

A block's quantized linear weights (``int4``, or ``int8-channel``: group-wise ``int8`` has no kernel) arrive
in the kernel's form (packed once, about the bytes of the codes), so the cache and the plan count codes, as
the compressed tier does, and no use dequantizes anything. Each such ``nn.Linear`` gets its ``forward``
replaced (:func:`~.patching.patch_method`, removed with the model) by one computing
``qkernel.linear(x, kernel form, bias)``: the kernel form of the unit being used is handed to it when the unit
is acquired (:meth:`KernelTier.expand`) and taken back when it is released; the module's ``weight`` stays the
``meta`` placeholder. Every other tensor (norms, biases, unquantized weights, quantized embedding shards)
behaves as with ``quantized_in_memory="codes"``.

Numerics change: the kernels compute with bfloat16 activations, scales and zeros (``qkernel.KERNEL_DTYPE``),
so a layer's output differs from the dequantized weights' by bfloat16 rounding (tests bound it; the benchmark
reports the perplexity). Where the kernels cannot run (a device other than the CPU, a torch without them), the
model falls back to the compressed tier's dequantize-per-use path and says why in
``StreamingEngine.kernel_fallback``.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import torch
from torch import nn

from ..client import qkernel
from ..client.base import FetchedUnit
from ..exceptions import ModelError
from .architecture import linear_weight_names
from .codes import CodesTier
from .patching import Patch, patch_method


def in_memory_form(config: Any, on_host: bool) -> tuple[bool, Callable[[Any], frozenset[str]] | None, str | None]:
    """What ``config.quantized_in_memory`` asks of the unit converter, computing on the host or not: ``(keep codes,
    kernel resolver for ConvertingSource(kernel=...), why "kernel" falls back to dequantizing per use)``."""
    mode = config.quantized_in_memory
    codes = mode in ("codes", "kernel") or (mode == "auto" and config.memory_budget is not None and on_host)
    if mode != "kernel":
        return codes, None, None
    why = None if on_host else "the model computes on a device; torch's weight-only kernels here are CPU ones"
    why = why or qkernel.unavailable()
    return (codes, None, f"{why}: dequantizing per use instead") if why else (codes, linear_weight_names, None)


class KernelTier(CodesTier):
    """The compressed tier whose blocks' linear layers compute on kernel-form codes (see the module docstring).

    Units the converter kept as codes expand per use as in :class:`CodesTier`; units it delivered in kernel form
    hand their kernel tensors to the patched layers for the duration of a use.
    """

    def __init__(self, converter: Any, manifest: Any) -> None:
        super().__init__(converter, manifest)
        # the blocks' linear layers (an lm_head's shards in kernel form compute through edge_linear instead)
        self.names = {u.name: n for u in manifest.streamed if (n := converter.kernel_names(manifest, u.name))}
        self._live: dict[str, dict[str, torch.Tensor]] = {}  # weight name -> its kernel form, while in use
        self._patches: list[Patch] = []
        self.kernel_calls = 0

    @property
    def layers(self) -> int:
        """How many linear layers compute with the kernels."""
        return len(self._patches)

    def bind(self, root: nn.Module) -> None:
        """Patch every kernel-form weight's ``nn.Linear`` in ``root`` (the model being bound)."""
        for names in self.names.values():
            for name in sorted(names):
                module = root.get_submodule(name.rsplit(".", 1)[0])
                if type(module) is not nn.Linear:  # the resolver named it: a model that changed under us
                    raise ModelError(f"{name} is not an nn.Linear weight: cannot compute it with a kernel")
                self._patches.append(patch_method(module, "forward", lambda _orig, n=name, m=module:
                                                  partial(self._forward, n, m)))

    def unbind(self) -> None:
        for patch in self._patches:
            patch.remove()
        self._patches.clear()

    def _forward(self, name: str, module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        parts = self._live.get(name)
        if parts is None:
            raise ModelError(f"{name} computed outside its unit's use (its kernel form is not held)")
        self.kernel_calls += 1
        return qkernel.linear(x, parts, module.bias)

    def expand(self, name: str, unit: FetchedUnit) -> FetchedUnit:
        names = self.names.get(name)
        if not names:
            return super().expand(name, unit)
        tensors = dict(unit.tensors)
        for weight in names:
            self._live[weight] = parts = qkernel.kernel_parts(tensors, weight)
            for suffix in parts:
                del tensors[weight + suffix]
        return FetchedUnit(name, tensors, unit.nbytes)

    def release(self, name: str) -> None:
        for weight in self.names.get(name, ()):
            self._live.pop(weight, None)
        super().release(name)


def edge_linear(tensors: dict[str, torch.Tensor], name: str, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` of a row shard's weight ``name`` (:class:`~.edges.EdgeBinding`'s ``linear``): with the kernel
    on its kernel form when it arrived in one, else on the (converted or per-use expanded) tensor."""
    parts = qkernel.kernel_parts(tensors, name)
    return torch.nn.functional.linear(x, tensors[name], bias) if parts is None else qkernel.linear(x, parts, bias)


def make_tier(converter: Any, manifest: Any) -> CodesTier | None:
    """The tier the engine uses per use: a :class:`KernelTier` when some unit arrives in kernel form, a
    :class:`CodesTier` when some is kept as codes, else ``None``."""
    units = [u.name for u in manifest.units]
    if any(converter.kernel_names(manifest, u) for u in units):
        return KernelTier(converter, manifest)
    if any(converter.codes_kept(manifest, u) for u in units):
        return CodesTier(converter, manifest)
    return None


__all__ = ["CodesTier", "KernelTier", "edge_linear", "in_memory_form", "linear_weight_names", "make_tier"]
