"""The compressed tier: quantized units stay as their int8 / int4 codes in the unit cache and are expanded to
the compute dtype only for the forward that uses them, into a few reused buffers.

A budget then holds the codes (about a half or a quarter of the compute-dtype bytes), so 2–4x more layers stay
in memory; the cost is one dequantization per use instead of per fetch. The tensors are the ones the
dequantize-on-arrival path produces (the same conversion), so outputs are identical. Expansion buffers come
from their own :class:`~streaming_weights.client.buffers.BufferPool` (a buffer is reused only once no tensor
views it); a unit's buffer goes back when the unit is released.
"""

from __future__ import annotations

from typing import Any

from ..client.base import FetchedUnit
from ..client.buffers import BufferPool
from .architecture import linear_weight_names
from .edges import names_of


class CodesTier:
    """Expands the units a :class:`~streaming_weights.client.convert.ConvertingSource` kept as codes.

    Args:
        converter: the source that kept them (``keep_codes=True``).
        manifest: the model's manifest.
        spare_units: expansion buffers kept idle for reuse (one unit computes at a time; edges may hold two).
    """

    def __init__(self, converter: Any, manifest: Any, spare_units: int = 2) -> None:
        self.converter, self.manifest = converter, manifest
        expanded = [u for u in manifest.units if converter.codes_kept(manifest, u.name) and _expands(manifest, u)]
        self.unit_bytes = max((converter.memory_bytes(u, manifest) for u in expanded), default=0)
        self.pool = BufferPool(spare_units * self.unit_bytes)
        self._held: dict[str, list[Any]] = {}
        self.expansions = 0

    @property
    def scratch_bytes(self) -> int:
        """What the plan must count besides the codes: the spare expansion buffers."""
        return self.pool.max_bytes

    def bind(self, root: Any) -> None:
        """Nothing to attach to the model ``root`` (a :class:`~.qlinear.KernelTier` patches its linear layers)."""

    def expand(self, name: str, unit: FetchedUnit) -> FetchedUnit:
        """``unit`` itself, or a view of it in the compute dtype (for the forward about to run)."""
        if not self.converter.codes_kept(self.manifest, name):  # (an embedding's shard is gathered, not expanded)
            return unit
        size = self.converter.memory_bytes(self.manifest.unit(name), self.manifest)
        buf = self.pool.take(size)
        tensors = self.converter.expand(self.manifest, unit, buf)
        self._held.setdefault(name, []).append(buf)
        self.expansions += 1
        return FetchedUnit(name, tensors, unit.nbytes)

    def release(self, name: str) -> None:
        """``name`` finished computing: its expansion buffer may be reused once no tensor views it."""
        held = self._held.get(name)
        if held:
            self.pool.give(held.pop())
            if not held:
                del self._held[name]


def _expands(manifest: Any, entry: Any) -> bool:
    """Whether codes unit ``entry`` is ever expanded whole: a block, or a row shard a linear layer computes with
    (an lm_head's, or a tied embedding's); an embedding's shards only give rows (``ConvertingSource.gather``)."""
    if entry.role != "shard":
        return True
    linear = linear_weight_names(manifest)
    return any(n in linear for n in names_of(manifest, entry.shard_tensor))


__all__ = ["CodesTier"]
