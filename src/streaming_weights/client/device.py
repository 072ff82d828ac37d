"""The few device calls the streaming path makes, behind one small interface (:class:`DeviceOps`).

The streaming engine never calls ``torch.cuda`` itself: it asks a :class:`DeviceOps` for

* a host receive buffer (:meth:`DeviceOps.host_buffer`) — page-locked (pinned) on CUDA, so a copy
  from it to the device is a real asynchronous DMA;
* an asynchronous copy of one unit's tensors to the device on a dedicated copy stream
  (:meth:`DeviceOps.copy_to_device`), which returns the device tensors and an event recorded after
  the copy;
* :meth:`DeviceOps.wait` — the compute stream waits for that event (the host does not block), and
  :meth:`DeviceOps.host_wait` — the host blocks until the event has happened (before a host buffer the
  copy reads from may be reused).

:class:`CpuOps` makes every copy a no-op (the tensors already are where compute runs), so the CPU path
is the same code with nothing to wait for. Tests substitute a recording fake for the CUDA one.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ..exceptions import ConfigurationError

#: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``.
_SPEC = re.compile(r"^(cpu|cuda|mps)(?::(\d+))?$")


class DeviceOps:
    """Device calls of the streaming path. The base class is the CPU: copies are no-ops, events are done.

    Attributes:
        device: where compute runs (resident parts and streamed units live there).
        pinned: whether :meth:`host_buffer` returns page-locked memory.
    """

    pinned = False
    #: compute runs where units are received: no copies, no device tier
    is_host = True

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def memory_bytes(self) -> int | None:
        """Device memory free for this model now (``None``: the host's memory, planned by the host tier)."""
        return None

    def host_buffer(self, nbytes: int) -> Any:
        """A writable host buffer of ``nbytes`` bytes that units are received into."""
        return bytearray(nbytes)

    def copy_to_device(self, tensors: dict[str, torch.Tensor], buffer: Any = None,
                       after: Any = None) -> tuple[dict[str, torch.Tensor], Any]:
        """Start copying ``tensors`` (views into ``buffer``, if given) to :attr:`device`, once the compute
        marked by ``after`` (a :meth:`compute_done` event) has finished; returns the device tensors and an
        event that completes when the copy has. The host memory must stay untouched until :meth:`host_wait`."""
        return tensors, None

    def compute_done(self) -> Any:
        """An event marking the compute queued so far (a later copy may wait for it: :meth:`copy_to_device`)."""
        return None

    def wait(self, event: Any) -> None:
        """Make compute (issued after this call) wait for ``event`` without blocking the host."""

    def host_wait(self, event: Any) -> None:
        """Block the host until ``event`` has happened."""

    def synchronize(self) -> None:
        """Wait for all work queued on the device (benchmarks)."""

    def describe(self) -> dict[str, Any]:
        return {"device": str(self.device), "pinned_host_buffers": self.pinned, "copy_stream": False}


class CpuOps(DeviceOps):
    """Compute on the host: the path of today, unchanged."""

    def __init__(self) -> None:
        super().__init__(torch.device("cpu"))


def flat_copy_plan(tensors: dict[str, torch.Tensor], buffer: Any = None) -> tuple[torch.Tensor, dict[str, int]] | None:
    """If every tensor is a contiguous view into ``buffer`` (a unit's receive buffer) or into one storage,
    the one byte range covering them all and each tensor's byte offset in it (so a unit crosses the bus
    in one copy); else ``None``."""
    items = [t for t in tensors.values() if t.numel()]
    if not items or any(not t.is_contiguous() for t in items):
        return None
    if buffer is not None:
        whole = torch.frombuffer(buffer, dtype=torch.uint8) if len(buffer) else None
    else:
        storage = items[0].untyped_storage()
        same = all(t.untyped_storage().data_ptr() == storage.data_ptr() for t in items)
        whole = torch.empty(0, dtype=torch.uint8).set_(storage) if same else None
    if whole is None:
        return None
    lo, hi = whole.data_ptr(), whole.data_ptr() + whole.numel()
    base = min(t.data_ptr() for t in items)
    end = max(t.data_ptr() + t.numel() * t.element_size() for t in items)
    if base < lo or end > hi:
        return None  # not views of that memory (a converted unit, say)
    offsets = {n: t.data_ptr() - base for n, t in tensors.items() if t.numel()}
    if any(offsets[n] % tensors[n].element_size() for n in offsets):
        return None  # a view at an unaligned offset cannot be re-typed on the device
    return whole[base - lo:end - lo], offsets


def views_of(flat: torch.Tensor, tensors: dict[str, torch.Tensor], offsets: dict[str, int]) -> dict[str, torch.Tensor]:
    """The tensors of :func:`flat_copy_plan` re-made as views of ``flat`` (a copy of its byte range)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if not t.numel():
            out[name] = torch.empty(t.shape, dtype=t.dtype, device=flat.device)
            continue
        nbytes = t.numel() * t.element_size()
        out[name] = flat[offsets[name]:offsets[name] + nbytes].view(t.dtype).view(t.shape)
    return out


class StreamOps(DeviceOps):
    """A device with streams and events (CUDA): one dedicated copy stream, one event per copy."""

    is_host = False

    def __init__(self, device: torch.device, backend: Any) -> None:
        super().__init__(device)
        self.backend = backend  # torch.cuda (or a recording fake in tests)
        self.copy_stream = backend.Stream(device=device)

    def copy_to_device(self, tensors: dict[str, torch.Tensor], buffer: Any = None,
                       after: Any = None) -> tuple[dict[str, torch.Tensor], Any]:
        be = self.backend
        # The copy waits only for ``after`` (the compute that frees the slot it fills), never for all
        # compute queued: it must run while the previous unit computes (that is the overlap).
        if after is not None:
            self.copy_stream.wait_event(after)
        with be.stream(self.copy_stream):
            plan = flat_copy_plan(tensors, buffer)
            if plan is not None:
                src, offsets = plan
                dst = torch.empty(src.numel(), dtype=torch.uint8, device=self.device)
                dst.copy_(src, non_blocking=True)
                out = views_of(dst, tensors, offsets)
            else:
                out = {n: t.to(self.device, non_blocking=True) for n, t in tensors.items()}
            event = be.Event()
            event.record(self.copy_stream)
        return out, (event, out)

    def compute_done(self) -> Any:
        event = self.backend.Event()
        event.record(self.backend.current_stream(self.device))
        return event

    def wait(self, event: Any) -> None:
        if event is None:
            return
        ev, out = event
        current = self.backend.current_stream(self.device)
        current.wait_event(ev)
        # Memory allocated on the copy stream is used on compute: tell the caching allocator, so it is
        # not handed out again before compute is done with it.
        for t in out.values():
            if t.numel() and t.device.type != "cpu":  # host tensors (a fake device) have no allocator stream
                t.record_stream(current)

    def host_wait(self, event: Any) -> None:
        if event is not None:
            event[0].synchronize()

    def synchronize(self) -> None:
        self.backend.synchronize(self.device)

    def memory_bytes(self) -> int | None:
        free, _total = self.backend.mem_get_info(self.device)
        return int(free)

    def describe(self) -> dict[str, Any]:
        return {"device": str(self.device), "pinned_host_buffers": self.pinned, "copy_stream": True}


class CudaOps(StreamOps):
    """CUDA: receive buffers in pinned host memory, copies on a dedicated stream with events."""

    pinned = True

    def __init__(self, device: torch.device) -> None:
        super().__init__(device, torch.cuda)

    def host_buffer(self, nbytes: int) -> Any:
        return host_view(torch.empty(nbytes, dtype=torch.uint8, pin_memory=True))


class MpsOps(DeviceOps):
    """Apple MPS: unified memory (nothing to pin) and no user streams; copies are queued in order."""

    is_host = False

    def copy_to_device(self, tensors: dict[str, torch.Tensor], buffer: Any = None,
                       after: Any = None) -> tuple[dict[str, torch.Tensor], Any]:
        return {n: t.to(self.device) for n, t in tensors.items()}, None

    def host_wait(self, event: Any) -> None:
        torch.mps.synchronize()  # the host buffer may be reused only once queued copies have read it

    def synchronize(self) -> None:
        torch.mps.synchronize()


def host_view(t: torch.Tensor) -> memoryview:
    """A writable byte ``memoryview`` of the uint8 tensor ``t`` that keeps ``t`` alive: it slices, assigns and
    exports a buffer (``torch.frombuffer``, ``readinto``) like the ``bytearray`` receivers expect, and every
    tensor viewing it holds a reference to it (so the buffer pool's reuse rule still holds)."""
    return memoryview(t.numpy())


def parse_device(spec: str | torch.device | None) -> torch.device:
    """``"cpu"`` (default), ``"cuda"``, ``"cuda:N"``, ``"mps"`` -> a :class:`torch.device` (not checked)."""
    text = "cpu" if spec is None else str(spec).strip().lower()
    m = _SPEC.match(text)
    if not m or (m.group(1) != "cuda" and m.group(2) is not None):
        raise ConfigurationError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'mps', got {spec!r}")
    if m.group(1) == "cuda":
        return torch.device("cuda", int(m.group(2) or 0))
    return torch.device(m.group(1))


def resolve_device(spec: str | torch.device | DeviceOps | None) -> DeviceOps:
    """The :class:`DeviceOps` for ``spec``, checked against this machine (a :class:`DeviceOps` is used as is:
    the seam tests plug a recording device into).

    Raises:
        ConfigurationError: a malformed spec, or a device this machine (or this torch build) lacks.
    """
    if isinstance(spec, DeviceOps):
        return spec
    device = parse_device(spec)
    if device.type == "cpu":
        return CpuOps()
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", built without CUDA")
            raise ConfigurationError(f"device={spec!r} was requested but this machine has no CUDA device ({build}); "
                                     "use device='cpu'")
        if device.index >= count:
            raise ConfigurationError(f"device={spec!r} was requested but this machine has {count} CUDA device(s): "
                                     f"use cuda:0..cuda:{count - 1}")
        return CudaOps(device)
    if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigurationError(f"device={spec!r} was requested but MPS is not available on this machine; "
                                 "use device='cpu'")
    return MpsOps(device)


__all__ = ["CpuOps", "CudaOps", "DeviceOps", "MpsOps", "StreamOps", "host_view", "parse_device", "resolve_device"]
