"""Receive-buffer reuse for unit fetches.

A fresh unit-sized ``bytearray`` costs a page fault per 4 KiB page the first time bytes land in it
(measured here: ~0.8 ms per MiB, as much as the transfer itself). The pool hands a dropped unit's
buffer to the next fetch of the same size — but only when nothing can still see it: every tensor made
by ``torch.frombuffer`` holds a reference to the buffer object for as long as its storage lives (views,
``nn.Parameter`` s sharing it included), so a buffer whose reference count is back to the pool's own
references has no live tensor view. Anything else is simply not reused.
"""

from __future__ import annotations

import sys
from collections import defaultdict


class BufferPool:
    """Reusable ``bytearray`` s keyed by exact size, bounded by ``max_bytes``.

    Not thread-safe: used from the client's I/O loop only.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._free: dict[int, list[bytearray]] = defaultdict(list)
        self.bytes = 0
        self.reused = 0
        self.allocated = 0
        self.refused = 0

    def take(self, size: int) -> bytearray:
        """A writable buffer of exactly ``size`` bytes (contents unspecified)."""
        free = self._free.get(size)
        if free:
            self.bytes -= size
            self.reused += 1
            return free.pop()
        self.allocated += 1
        return bytearray(size)

    def give(self, buf: bytearray | None) -> bool:
        """Offer a buffer back; it is kept only if no tensor view or other object references it."""
        if buf is None or type(buf) is not bytearray:
            return False
        # References now: the caller's variable, this parameter, getrefcount's argument.
        if sys.getrefcount(buf) > 3:
            self.refused += 1
            return False
        if self.bytes + len(buf) > self.max_bytes:
            return False
        self._free[len(buf)].append(buf)
        self.bytes += len(buf)
        return True

    def clear(self) -> None:
        self._free.clear()
        self.bytes = 0
