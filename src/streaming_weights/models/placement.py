"""Where a model's weights live when compute runs on an accelerator: resident parts on the device, a
device tier for streamed units in front of the host tier (the :class:`~..client.cache.UnitCache`).

Two tiers:

* **host tier** — the unit cache: units received (into pinned buffers on CUDA), verified, kept and
  prefetched in host RAM exactly as on the CPU path.
* **device tier** — this module. With room for every streamed unit (``device_units`` >= their count),
  each unit stays on the device after its first use and later passes touch neither the host tier nor
  the network. Otherwise the device holds a ring: the unit computing and the next one, whose copy (on
  the dedicated copy stream) is started as soon as its host copy is there, so the copy of unit ``i+1``
  overlaps the compute of unit ``i``; the copy waits on the device for the compute of unit ``i-1``
  (whose memory it may reuse), so the ring never holds more than ``RING_UNITS`` units. Holding some but not all streamed units on the device
  is deliberately not done: the host tier would keep prefetching the units held on the device.

A host buffer a copy reads from stays referenced (so the buffer pool refuses to recycle it) until the
copy's event has been waited for on the host: a receive buffer is never reused while a view of it, or
a copy from it, lives.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..client.base import FetchedUnit
from ..client.buffers import BufferPool
from ..client.device import DeviceOps
from ..exceptions import ConfigurationError
from ..format import Manifest
from .patching import FunctionHook, add_hook, patch_method

HostAcquire = Callable[[str], FetchedUnit]


class HostBufferPool(BufferPool):
    """A :class:`BufferPool` whose buffers come from :meth:`DeviceOps.host_buffer` (pinned on CUDA).

    Same reuse rule as the base pool (a buffer is reused only when no tensor views it), for any buffer
    type the device hands out.
    """

    def __init__(self, max_bytes: int, ops: DeviceOps) -> None:
        super().__init__(max_bytes)
        self.ops = ops

    def take(self, size: int) -> Any:
        free = self._free.get(size)
        if free:
            self.bytes -= size
            self.reused += 1
            return free.pop()
        self.allocated += 1
        return self.ops.host_buffer(size)

    def give(self, buf: Any) -> bool:
        if buf is None or type(buf) is bytearray:
            return super().give(buf)
        # References now: the caller's variable, this parameter, getrefcount's argument.
        if sys.getrefcount(buf) > 3:
            self.refused += 1
            return False
        if self.bytes + len(buf) > self.max_bytes:
            return False
        self._free[len(buf)].append(buf)
        self.bytes += len(buf)
        return True


@dataclass
class DeviceUnit:
    """One streamed unit on the device: its tensors, the copy's event, and the host unit the copy reads."""

    tensors: dict[str, torch.Tensor]
    event: Any
    host: FetchedUnit | None  # the host unit copied (identity tells a staged copy is still the right one)
    #: the host tensors the copy reads: referenced until the copy is known done, so the buffer pool
    #: refuses to recycle their buffer even if the host tier drops the unit meanwhile
    reading: dict[str, torch.Tensor] | None
    nbytes: int


@dataclass
class DeviceStats:
    copies: int = 0  # units copied host -> device
    copy_bytes: int = 0
    staged: int = 0  # copies started ahead of use (overlapping the previous unit's compute)
    device_hits: int = 0  # uses served by a unit kept on the device (no host tier, no copy)


class DevicePlacement:
    """The device tier of one model.

    Args:
        ops: the device's calls (:func:`~..client.device.resolve_device`).
        device_units: streamed units the device may keep (``None``: all of them). Fewer than the model
            streams means the ring (the unit computing + the next one; see :data:`RING_UNITS`).
    """

    def __init__(self, ops: DeviceOps, device_units: int | None = None) -> None:
        self.ops = ops
        self.device_units = device_units
        self.order: list[str] = []
        self.keep_all = False
        self.units: dict[str, DeviceUnit] = {}  # kept (keep_all) or the ring: computing + staged
        self.stats = DeviceStats()
        self.resident_bytes = 0
        self.largest = 0
        self._peek: Callable[[str], FetchedUnit | None] = lambda name: None
        self._freed: Any = None  # ring: event after the compute of the last unit released (its slot is free)
        self._handles: list[Any] = []

    @property
    def on_host(self) -> bool:
        return self.ops.is_host

    def pool(self, max_bytes: int) -> BufferPool:
        """The receive-buffer pool the source uses (pinned buffers on CUDA; today's pool on the CPU)."""
        return BufferPool(max_bytes) if self.on_host else HostBufferPool(max_bytes, self.ops)

    # --------------------------------------------------------------------------------- binding
    def bind(self, root: nn.Module, manifest: Manifest, peek: Callable[[str], FetchedUnit | None] | None = None,
             headroom_bytes: int = 0) -> None:
        """Move ``root``'s loaded (non-meta) parameters and buffers to the device, ties kept, make ``root``
        move its inputs there, and size the device tier. ``peek(name)`` returns a host unit that has
        already arrived (never fetches); ``headroom_bytes``: activations and KV cache, kept free.

        Raises:
            ConfigurationError: the device cannot hold the resident parts plus the ring.
        """
        self.order = [u.name for u in manifest.streamed]
        self.largest = max((u.bytes for u in manifest.streamed), default=0)
        if peek is not None:
            self._peek = peek
        self.resident_bytes = move_loaded(root, self.ops.device)
        if self.device_units is None:
            self.device_units = device_units_for(self.ops.memory_bytes(), headroom_bytes,
                                                 [u.bytes for u in manifest.streamed], str(self.ops.device))
        self.keep_all = self.device_units is None or self.device_units >= len(self.order)
        if self.on_host:
            return
        to_device = FunctionHook(pre=self._inputs_to_device)
        for module in {id(m): m for m in (root, getattr(root, "base_model", root))}.values():
            self._handles.append(add_hook(module, to_device))
        if callable(getattr(root, "generate", None)):  # generate builds its tensors on its inputs' device
            self._handles.append(patch_method(root, "generate", self._on_device))

    def use_ring(self) -> None:
        """Use the ring whatever fits (benchmarks and tests of the copy path on a large device)."""
        self.clear()
        self.device_units, self.keep_all = 2, False

    def _on_device(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            args, kwargs = self._inputs_to_device(None, args, kwargs)
            return fn(*args, **kwargs)

        return call

    def _inputs_to_device(self, module: nn.Module | None, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        device = self.ops.device

        def move(x: Any) -> Any:
            return x.to(device) if isinstance(x, torch.Tensor) and x.device != device else x

        return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}

    # ------------------------------------------------------------------------------- streaming
    def acquire(self, name: str, host_acquire: HostAcquire) -> dict[str, torch.Tensor]:
        """The device tensors of ``name`` for the compute about to run; starts the next unit's copy."""
        if self.on_host:
            return host_acquire(name).tensors
        unit = self.units.get(name)
        if unit is not None and unit.host is None and self.keep_all:
            self.stats.device_hits += 1
        else:
            host = host_acquire(name)  # the host tier counts the use, prefetches, fetches if needed
            if unit is None or unit.host is not host:
                if unit is not None:  # a stale staged copy (the host tier fetched the unit again)
                    self._finish(unit)
                unit = self._copy(name, host)
        self.ops.wait(unit.event)  # compute waits for the copy; the host does not
        self._stage_next(name)
        return unit.tensors

    def release(self, name: str, host_release: Callable[[str], None]) -> None:
        """``name`` finished computing on the host side: let go of its host copy (after its copy is done)."""
        if self.on_host:
            host_release(name)
            return
        unit = self.units.get(name)
        if unit is not None and unit.host is not None:
            self._finish(unit)
            host_release(name)
        if not self.keep_all or name not in self.order:  # an embedding / lm_head shard is never kept here
            self.units.pop(name, None)  # the ring: the device copy goes with its compute...
            self._freed = self.ops.compute_done()  # ...and the next copy into its slot waits for that compute

    def _finish(self, unit: DeviceUnit) -> None:
        """Wait (host side) until ``unit``'s copy has read its host buffer, then let go of the buffer."""
        if unit.reading is not None:
            self.ops.host_wait(unit.event)
        unit.host = unit.reading = None

    def _copy(self, name: str, host: FetchedUnit) -> DeviceUnit:
        # Ring: the copy waits for the compute of the unit released last (whose memory it may take), so
        # the device holds at most RING_UNITS units however far the host runs ahead.
        after = None if self.keep_all else self._freed
        tensors, event = self.ops.copy_to_device(host.tensors, host.buffer, after=after)
        unit = DeviceUnit(tensors, event, host, host.tensors, host.nbytes)
        self.units[name] = unit
        self.stats.copies += 1
        self.stats.copy_bytes += host.nbytes
        return unit

    def _stage_next(self, current: str) -> None:
        """Start copying the unit after ``current`` if its host copy has arrived (overlaps this compute)."""
        nxt = self._next(current)
        if not self.keep_all:  # a copy staged for a unit that did not come next (T5's decoder loop) goes
            for stale in [n for n in self.units if n not in (current, nxt)]:
                self._finish(self.units.pop(stale))
        if nxt is None or nxt in self.units:
            return
        host = self._peek(nxt)
        if host is not None and host.tensors:
            self._copy(nxt, host)
            self.stats.staged += 1

    def _next(self, current: str) -> str | None:
        if current not in self.order or len(self.order) < 2:
            return None
        return self.order[(self.order.index(current) + 1) % len(self.order)]

    def clear(self) -> None:
        """Drop every device copy (host copies are released by the host tier's own clear)."""
        for unit in self.units.values():
            self._finish(unit)
        self.units.clear()

    def plan_part(self) -> dict[str, Any]:
        """The device part of the memory plan."""
        held = len(self.order) if self.keep_all else min(RING_UNITS, len(self.order))
        return {**self.ops.describe(), "resident_bytes": self.resident_bytes,
                "streamed_units": 0 if self.on_host else held,
                "streamed_bytes": 0 if self.on_host else held * self.largest,
                "bound_bytes": self.resident_bytes + (0 if self.on_host else held * self.largest),
                "mode": "host" if self.on_host else ("keep-all" if self.keep_all else "ring"),
                "copies": self.stats.copies, "copy_bytes": self.stats.copy_bytes, "staged": self.stats.staged,
                "device_hits": self.stats.device_hits}


def move_loaded(root: nn.Module, device: torch.device) -> int:
    """Move every non-meta parameter and buffer of ``root`` to ``device`` in place; a tensor shared by
    several names (tied weights) is moved once and stays shared. Returns the bytes moved."""
    moved: dict[int, torch.Tensor] = {}
    total = 0
    for module in root.modules():
        for store in (module._parameters, module._buffers):
            for key, t in list(store.items()):
                if t is None or t.is_meta:
                    continue
                new = moved.get(id(t))
                if new is None:
                    data = t.data.to(device) if t.device != device else t.data
                    new = nn.Parameter(data, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else data
                    moved[id(t)] = new
                    total += t.numel() * t.element_size()
                store[key] = new
    return total


#: device memory of the ring, in units: the one computing, the next one (copied meanwhile), and the one
#: released last, whose memory the allocator hands out again only once its compute has finished
RING_UNITS = 3

#: share of the device's free memory the device tier plans with (the rest absorbs allocator
#: fragmentation and the compute library's workspaces, which the headroom estimate does not cover)
DEVICE_SHARE = 0.9


def device_units_for(free_bytes: int | None, headroom_bytes: int, unit_bytes: list[int], where: str = "the device") -> int | None:
    """How many streamed units the device keeps, from its free memory once the resident parts are on it:
    all (``None``) when every unit fits beside the headroom, else 2 (the ring). ``free_bytes=None``
    (compute on the host): all — the host tier's plan bounds the memory.

    Raises:
        ConfigurationError: not even the ring (two of the largest units) fits.
    """
    if free_bytes is None:
        return None
    usable = int(free_bytes * DEVICE_SHARE) - headroom_bytes
    if sum(unit_bytes) <= usable:
        return None
    largest = max(unit_bytes, default=0)
    if RING_UNITS * largest > usable:
        need = (RING_UNITS * largest + headroom_bytes) / DEVICE_SHARE
        raise ConfigurationError(
            f"{where} has {free_bytes / 2**20:.0f} MiB free after the resident parts, below the minimum of "
            f"{need / 2**20:.0f} MiB ({RING_UNITS} units of {largest / 2**20:.0f} MiB + "
            f"{headroom_bytes / 2**20:.0f} MiB headroom); use a smaller model or device='cpu'")
    return 2


__all__ = ["DevicePlacement", "DeviceStats", "DeviceUnit", "HostBufferPool", "device_units_for", "move_loaded"]
