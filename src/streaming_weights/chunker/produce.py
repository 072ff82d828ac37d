"""A planned unit's bytes, from the checkpoint: the one way a :class:`~.plan.ModelPlan` unit becomes a file.

Used by both uses of a plan (docs/architecture.md, "one plan, two uses"): the chunker writes the bytes it gets
here to storage; a checkpoint served as it is (:mod:`streaming_weights.checkpoint`) produces them on demand.
Both get byte-identical units, so a served-as-is model and a chunked one have the same manifest.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch

from ..exceptions import ChunkingError
from ..format.chunkfile import tensor_view
from ..format.hashing import Digests
from ..format.quant import encode as quant_encode
from .plan import ModelPlan
from .readers import Source, anon_buffer


def unit_group(plan: ModelPlan, unit: str) -> list[str]:
    """The group of :meth:`ModelPlan.groups` that holds ``unit`` (row shards / experts of one tensor come
    together: they are produced from one read of it)."""
    for group in plan.groups():
        if unit in group:
            return group
    raise KeyError(unit)


def produce_group(plan: ModelPlan, source: Source, group: list[str]) -> Iterator[tuple[str, Any, Digests]]:
    """``(unit, buffer, digests)`` for each unit of ``group`` (one of :meth:`ModelPlan.groups`), in order.

    A plain unit reads its tensors one at a time; the units of a row group (shards of one tensor, experts of
    one module) are filled from ONE read of those tensors, held until the last unit of the group is yielded.
    Runs blocking reads: call it from a worker thread.

    Raises:
        ChunkingError: the checkpoint no longer matches the plan (a tensor's shape), or cannot be read.
    """
    if plan.rows_of(group[0]) is None:
        for unit in group:
            keys = plan.units[unit]
            parts = ((name, tensor, plan.quant.get(name)) for name, tensor in model_tensors(keys, source, plan))
            buf, digests = fill(plan.layout(unit), parts)
            yield unit, buf, digests
        return
    keys = plan.units[group[0]]
    reader = model_tensors(keys, source, plan)
    try:
        whole = dict(reader)
    finally:
        reader.close()
    for unit in group:
        start, stop = plan.rows_of(unit)
        quant = plan.unit_quant(unit)
        buf, digests = fill(plan.layout(unit), [(k, whole[k][start:stop], quant.get(k)) for k in keys])
        yield unit, buf, digests
        del buf
    whole.clear()


def model_tensors(keys: list[str], source: Source, plan: ModelPlan) -> Iterator[tuple[str, torch.Tensor]]:
    """``(model tensor name, tensor)`` for ``keys``, one at a time: plain renames in one pass over the
    checkpoint, converted tensors (:mod:`.convert`) each from just the checkpoint tensors it needs."""
    plain = [k for k in keys if k not in plan.recipes]
    back = {plan.mapping[k]: k for k in plain}
    reader = source.read_tensors([plan.mapping[k] for k in plain])
    try:
        for ck, tensor in reader:
            check_shape(ck, tensor, plan, back[ck])
            yield back[ck], tensor
            del tensor  # one source tensor at a time: gone before the next is read
    finally:
        reader.close()
    done: set[str] = set()
    for key in keys:
        if key not in plan.recipes or key in done:
            continue
        out = plan.recipes[key].run(lambda k: _read_one(source, k), None, plan.config)
        for name in [n for n in out if n in keys]:
            check_shape(f"{plan.recipes[key].keys[0]}…", out[name], plan, name)
            done.add(name)
            yield name, out.pop(name)
        del out


def _read_one(source: Source, key: str) -> torch.Tensor:
    reader = source.read_tensors([key])
    try:
        return next(reader)[1]
    finally:
        reader.close()


def check_shape(ck: str, tensor: torch.Tensor, plan: ModelPlan, name: str) -> None:
    """Raise ChunkingError unless ``tensor`` (read as checkpoint tensor ``ck``) has model tensor ``name``'s shape."""
    want = plan.quant[name].shape if name in plan.quant else plan.specs[name][1]
    if tuple(tensor.shape) != want:
        raise ChunkingError(f"checkpoint tensor {ck!r} has shape {tuple(tensor.shape)}, the model expects {want}")


def fill(layout: Any, parts: Iterable[tuple[str, torch.Tensor, Any]]) -> tuple[Any, Digests]:
    """A unit buffer laid out as ``layout`` holding ``parts`` (``(name, tensor, quant spec or None)``), and its
    digests (hashed here too: in the worker thread, BLAKE3 without the GIL)."""
    buf = anon_buffer(layout.total_bytes)  # freed pages return to the OS (see anon_buffer)
    buf[: layout.data_start] = layout.header
    for name, tensor, spec in parts:
        _put(buf, layout, name, tensor, spec)
        del tensor
    return buf, Digests.of(buf)


def _put(buf: Any, layout: Any, name: str, tensor: torch.Tensor, spec: Any) -> None:
    """Store ``tensor`` as ``name`` into ``buf`` (cast to the stored dtype; quantized here if ``spec``)."""
    parts = quant_encode(tensor, spec) if spec is not None else {"": tensor}
    for suffix, part in parts.items():
        if part.numel():
            tensor_view(buf, layout, name + suffix, layout.tensors[name + suffix]).copy_(part)


__all__ = ["check_shape", "fill", "model_tensors", "produce_group", "unit_group"]
