"""Embedding and lm_head weights stored as row shards (format role ``shard``): kept whole or streamed.

A vocabulary of 128k–262k tokens makes the input embedding and the lm_head gigabytes; the chunker stores such
a weight as units holding row ranges (:mod:`streaming_weights.format.manifest`). The planner decides:

* **kept** (:func:`assemble`): the shards are fetched one at a time into one full tensor, assigned like any
  resident tensor (peak: the tensor plus one shard).
* **streamed** (:class:`EdgeBinding`): the weight stays a placeholder and the modules that use it run shard
  by shard. This wraps their ``forward`` — the one place the package computes something itself, kept to
  the two operations below, each tested against transformers running the whole weight:

  - an ``nn.Embedding`` (the input embedding) gathers only the rows its ids need: the distinct ids are
    copied out of the shards that hold them into a compact weight, and the module's *own* forward runs on
    it with the ids renumbered, so a subclass's behaviour (a scaled embedding's multiplier) is kept;
  - an ``nn.Linear`` (the lm_head, tied or not) computes its output features shard by shard into one
    output tensor; its bias (never sharded) stays resident.

The placeholder is a one-element NaN tensor expanded to the weight's shape on the compute device: it costs
no memory, keeps ``model.device`` / ``dtype`` right (transformers reads the first parameter), and anything
that bypassed the wrappers would compute NaN rather than plausible numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F

from ..client.base import FetchedUnit
from ..client.buffers import BufferPool, unit_buffer
from ..exceptions import ModelError
from ..format import Manifest
from .patching import Patch, patch_method

Acquire = Callable[[str, bool], dict[str, torch.Tensor]]  # (unit, ordered) -> tensors


@dataclass(frozen=True)
class ShardedTensor:
    """One model tensor stored as row shards: ``shards`` = ``(unit, start, stop)`` covering ``[0, rows)``."""

    name: str
    shards: tuple[tuple[str, int, int], ...]

    @property
    def rows(self) -> int:
        return self.shards[-1][2]

    @property
    def units(self) -> list[str]:
        return [u for u, _, _ in self.shards]

    def holding(self, sorted_ids: torch.Tensor) -> list[tuple[str, int, int]]:
        """The shards holding at least one of ``sorted_ids`` (ascending, in range)."""
        if not sorted_ids.numel():
            return []
        starts = torch.tensor([a for _, a, _ in self.shards[1:]], dtype=sorted_ids.dtype, device=sorted_ids.device)
        which = torch.unique(torch.bucketize(sorted_ids, starts, right=True)).tolist()
        return [self.shards[i] for i in which]


def sharded_tensors(manifest: Manifest) -> dict[str, ShardedTensor]:
    """``{model tensor name: ShardedTensor}`` for every tensor ``manifest`` stores as row shards."""
    return {name: ShardedTensor(name, tuple((u.name, *u.rows) for u in units))
            for name, units in manifest.shard_groups().items()}


def names_of(manifest: Manifest, tensor: str) -> list[str]:
    """``tensor`` and every tied alias of it (e.g. ``lm_head.weight`` for a tied embedding)."""
    return [tensor, *(a for a, t in manifest.tied.items() if t == tensor)]


def kept_and_streamed(manifest: Manifest, streamed_units: list[str]) -> tuple[list[ShardedTensor], list[ShardedTensor]]:
    """The sharded tensors of ``manifest`` the plan keeps whole, and those it streams (``streamed_units``:
    the plan's streamed unit names)."""
    streamed = set(streamed_units)
    tensors = list(sharded_tensors(manifest).values())
    return ([t for t in tensors if not set(t.units) & streamed], [t for t in tensors if set(t.units) <= streamed])


def assemble(fetch: Callable[[str], FetchedUnit], tensor: ShardedTensor,
             pool: BufferPool | None = None) -> torch.Tensor:
    """The whole tensor, filled shard by shard (``fetch(unit)`` -> that unit, fetched); each shard's receive
    buffer goes back to ``pool`` before the next shard is fetched, which lands in it."""
    full: torch.Tensor | None = None
    for unit, start, stop in tensor.shards:
        fetched = fetch(unit)
        part = fetched.tensors[tensor.name]
        if full is None:
            full = _empty_rows(part, tensor.rows)
        full[start:stop] = part
        del part
        fetched.recycle(pool)
    return full


def _empty_rows(part: torch.Tensor, rows: int) -> torch.Tensor:
    """A tensor of ``rows`` rows shaped like ``part``'s, for the shards to be copied into; on the CPU its pages are
    populated up front (:func:`.unit_buffer`: cheaper than a fault per page while the shards are copied in)."""
    shape = (rows, *part.shape[1:])
    if part.device.type != "cpu":
        return part.new_empty(shape)
    return torch.frombuffer(unit_buffer(math.prod(shape) * part.element_size()), dtype=part.dtype).view(shape)


def users(root: nn.Module, manifest: Manifest, tensor: str) -> list[tuple[str, nn.Module]]:
    """``(parameter name, module)`` of every module whose ``weight`` is ``tensor`` (or a tied alias of it).

    Raises:
        ModelError: the tensor is used otherwise than as an ``nn.Embedding`` / ``nn.Linear`` weight (it
            cannot be streamed: the planner must keep it).
    """
    out = []
    for name in names_of(manifest, tensor):
        path, _, attr = name.rpartition(".")
        module = root.get_submodule(path) if path else root
        if attr != "weight" or not isinstance(module, (nn.Embedding, nn.Linear)):
            raise ModelError(f"{name} is used by a {type(module).__name__}, not an nn.Embedding / nn.Linear "
                             "weight: it cannot be streamed in shards (a larger memory budget keeps it)")
        if isinstance(module, nn.Embedding) and module.max_norm is not None:
            raise ModelError(f"{name}: an nn.Embedding with max_norm renormalizes its weight in place and "
                             "cannot be streamed in shards")
        out.append((name, module))
    return out


class EdgeBinding:
    """Streams one sharded weight through the modules that use it (see the module docstring).

    Args:
        acquire: ``(unit, ordered)`` -> the unit's tensors; ``ordered=False`` for the embedding's
            data-dependent shards (not part of the execution order the cache learns and prefetches along).
        release: the unit finished computing.
        device: where the placeholder lives (the compute device).
        rows: ``(unit, tensor name, row indices)`` -> those rows of the shard in the compute dtype, the unit
            acquired and released by the callee (the engine's, for shards held as codes); ``None``: acquire
            the unit and index its tensor.
        linear: ``(unit's tensors, tensor name, x, bias)`` -> ``x @ weight.T + bias`` (a shard in a kernel's
            form computes with it, :func:`.qlinear.edge_linear`); ``None``: ``F.linear``.
    """

    def __init__(self, root: nn.Module, manifest: Manifest, tensor: ShardedTensor, acquire: Acquire,
                 release: Callable[[str], None], device: torch.device | str = "cpu",
                 rows: Callable[[str, str, torch.Tensor], torch.Tensor] | None = None,
                 linear: Callable[..., torch.Tensor] | None = None) -> None:
        self.tensor = tensor
        self._acquire, self._release = acquire, release
        self._rows = rows or (lambda unit, name, idx: self._with_shard(unit, False, lambda ts: ts[name][idx]))
        self._matmul = linear or (lambda ts, name, x, b: F.linear(x, ts[name], b))
        self.users = users(root, manifest, tensor.name)
        meta = self.users[0][1].weight
        nan = torch.full((), float("nan"), dtype=meta.dtype, device=device)
        self.placeholder = nn.Parameter(nan.expand(meta.shape), requires_grad=False)
        self._originals: dict[int, tuple[nn.Module, nn.Parameter]] = {}
        self._patches: list[Patch] = []
        for _, module in self.users:
            if id(module) in self._originals:  # T5: one shared module reached by several names
                continue
            self._originals[id(module)] = (module, module._parameters["weight"])
            module._parameters["weight"] = self.placeholder  # one object for every alias: ties kept
            make = self._gather if isinstance(module, nn.Embedding) else self._linear
            self._patches.append(patch_method(module, "forward", lambda _own, m=module, make=make: make(m)))

    @property
    def heads(self) -> bool:
        """Whether an ``nn.Linear`` uses the weight (its shards run in order on every forward)."""
        return any(isinstance(m, nn.Linear) for _, m in self.users)

    def _with_shard(self, unit: str, ordered: bool, fn: Callable[[dict[str, torch.Tensor]], torch.Tensor]) -> torch.Tensor:
        """``fn(shard unit's tensors)``; the shard is released once ``fn`` returned, with no view of it left in
        this frame (so its receive buffer can be reused at once)."""
        try:
            return fn(self._acquire(unit, ordered))
        finally:
            self._release(unit)

    def _gather(self, module: nn.Embedding) -> Callable[..., Any]:
        own_forward = type(module).forward  # the class's own forward: a subclass's scaling is kept
        t = self.tensor

        def forward(input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            ids, inverse = torch.unique(input_ids, sorted=True, return_inverse=True)
            if ids.numel() and (int(ids[0]) < 0 or int(ids[-1]) >= t.rows):
                raise IndexError(f"token id out of range for {t.name} with {t.rows} rows: "
                                 f"{int(ids[0]) if int(ids[0]) < 0 else int(ids[-1])}")
            compact = self.placeholder.new_empty((ids.numel(), *self.placeholder.shape[1:]))
            for unit, start, stop in t.holding(ids):
                here = (ids >= start) & (ids < stop)
                compact[here] = self._rows(unit, t.name, ids[here] - start)
            saved = module._parameters["weight"], module.padding_idx
            # padding_idx only shapes gradients; the compact weight's rows are renumbered
            module._parameters["weight"], module.padding_idx = nn.Parameter(compact, requires_grad=False), None
            try:
                return own_forward(module, inverse, *args, **kwargs)
            finally:
                module._parameters["weight"], module.padding_idx = saved

        return forward

    def _linear(self, module: nn.Linear) -> Callable[[torch.Tensor], torch.Tensor]:
        t = self.tensor

        def forward(x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor | None = None
            bias = module.bias
            for unit, start, stop in t.shards:
                b = None if bias is None else bias[start:stop]
                part = self._with_shard(unit, True, lambda ts: self._matmul(ts, t.name, x, b))
                if out is None:
                    out = part.new_empty((*part.shape[:-1], t.rows))
                out[..., start:stop] = part
            return out

        return forward

    def remove(self) -> None:
        """Restore the modules' own forward and their (meta) weight."""
        for patch in self._patches:
            patch.remove()
        for module, weight in self._originals.values():
            module._parameters["weight"] = weight
        self._originals.clear()
        self._patches.clear()


__all__ = ["EdgeBinding", "ShardedTensor", "assemble", "kept_and_streamed", "names_of", "sharded_tensors", "users"]
