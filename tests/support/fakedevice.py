"""A recording stand-in for ``torch.cuda`` (streams, events), so the device path's scheduling runs on the CPU.

``StreamOps(torch.device("cpu"), FakeCuda())`` is the real CUDA code path — one flat copy per unit on the
copy stream, an event per copy, compute waiting on it, host waits before a buffer is recycled — with the
"device" being host memory (copies are real copies) and every stream/event call logged in ``log``.
Host buffers are memoryviews over torch memory, like the pinned buffers of ``CudaOps``.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Any, Iterator

import torch
from torch.overrides import TorchFunctionMode

from streaming_weights.client.device import StreamOps, host_view


class FakeStream:
    _ids = itertools.count()

    def __init__(self, log: list, name: str | None = None) -> None:
        self.log = log
        self.name = name or f"stream{next(self._ids)}"

    def wait_event(self, event: FakeEvent) -> None:
        self.log.append(("wait_event", self.name, event.id))

    def wait_stream(self, other: FakeStream) -> None:
        self.log.append(("wait_stream", self.name, other.name))


class FakeEvent:
    _ids = itertools.count()

    def __init__(self, log: list) -> None:
        self.log = log
        self.id = next(self._ids)

    def record(self, stream: FakeStream) -> None:
        self.log.append(("record", stream.name, self.id))

    def synchronize(self) -> None:
        self.log.append(("host_wait", None, self.id))


class FakeCuda:
    """The subset of ``torch.cuda`` :class:`StreamOps` calls."""

    def __init__(self, free_bytes: int = 1 << 40) -> None:
        self.log: list[tuple[str, Any, Any]] = []
        self.free_bytes = free_bytes
        self.compute = FakeStream(self.log, "compute")
        self.current = self.compute

    def Stream(self, device: torch.device | None = None) -> FakeStream:  # noqa: N802 - torch.cuda's name
        return FakeStream(self.log, "copy")

    def Event(self) -> FakeEvent:  # noqa: N802
        return FakeEvent(self.log)

    def current_stream(self, device: torch.device | None = None) -> FakeStream:
        return self.current

    @contextlib.contextmanager
    def stream(self, s: FakeStream) -> Iterator[None]:
        prev, self.current = self.current, s
        try:
            yield
        finally:
            self.current = prev

    def synchronize(self, device: torch.device | None = None) -> None:
        self.log.append(("synchronize", None, None))

    def mem_get_info(self, device: torch.device | None = None) -> tuple[int, int]:
        return self.free_bytes, self.free_bytes


class CopyLog(TorchFunctionMode):
    """Logs every ``Tensor.copy_`` / ``Tensor.to`` with the fake's current stream and the byte count."""

    def __init__(self, fake: FakeCuda) -> None:
        super().__init__()
        self.fake = fake

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.copy_, torch.Tensor.to):
            self.fake.log.append(("copy", self.fake.current.name, args[0].numel() * args[0].element_size()))
        return func(*args, **kwargs)


class FakeDeviceOps(StreamOps):
    """CUDA's code path on the CPU: recording streams/events, memoryview host buffers (as pinned ones are)."""

    pinned = True

    def __init__(self, free_bytes: int = 1 << 40) -> None:
        self.fake = FakeCuda(free_bytes)
        super().__init__(torch.device("cpu"), self.fake)
        self.host_buffers = 0

    @property
    def log(self) -> list[tuple[str, Any, Any]]:
        return self.fake.log

    def host_buffer(self, nbytes: int) -> Any:
        self.host_buffers += 1
        return host_view(torch.empty(nbytes, dtype=torch.uint8))

    def kinds(self, *names: str) -> list[tuple[str, Any, Any]]:
        return [e for e in self.log if e[0] in names]
