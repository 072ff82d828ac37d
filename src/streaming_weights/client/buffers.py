"""Receive-buffer reuse for unit fetches.

A fresh unit-sized buffer costs a page fault per 4 KiB page the first time bytes land in it
(measured here: ~0.46 ms per MiB, twice the BLAKE3 hash of the same bytes). A new buffer is therefore
populated in one call (``MADV_POPULATE_WRITE``, Linux 5.14+: ~0.33 ms per MiB, and none of it inside the
receive that fills it; 1.1B int8 time to result 2.5 -> 2.2 s), and the pool hands a dropped unit's
buffer to the next fetch of the same size — but only when nothing can still see it: every tensor made
by ``torch.frombuffer`` holds a reference to the buffer object for as long as its storage lives (views,
``nn.Parameter`` s sharing it included), so a buffer whose reference count is back to the pool's own
references has no live tensor view. Anything else is simply not reused.

Unit buffers are anonymous memory maps (:func:`unit_buffer`), not heap ``bytearray`` s: glibc serves a
large ``malloc`` with ``mmap`` only until the first such block is freed, then raises its mmap threshold
(up to 32 MiB) and serves same-sized requests from the heap, where freed units leave holes that the
process keeps (RSS grows with every size mix). A map is returned to the kernel the moment its last
view dies, so the set of live unit buffers is exactly what the RSS holds.
"""

from __future__ import annotations

import mmap
import sys
from collections import defaultdict
from typing import Any, Callable


#: ``madvise`` advice that allocates a range's pages up front (Linux 5.14+; Python's ``mmap`` names it from 3.13)
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23 if sys.platform.startswith("linux") else None)


def unit_buffer(size: int) -> mmap.mmap | bytearray:
    """A writable, zero-filled buffer of ``size`` bytes outside the malloc heap, its pages populated where the
    kernel can (see the module doc)."""
    if not size:
        return bytearray()
    # Private, not mmap's default MAP_SHARED: a shared anonymous map is a fixed-size shmem object, and
    # growing it in place (:meth:`BufferPool.take` resizes idle buffers) would SIGBUS on the new pages.
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    populate(buf)
    return buf


def populate(buf: mmap.mmap) -> None:
    """Allocate every page of ``buf`` now, in one call, rather than one fault per page as bytes land. Where the
    kernel lacks the advice (before 5.14) the pages are faulted in on first write, as before."""
    if MADV_POPULATE_WRITE is None:
        return
    try:
        buf.madvise(MADV_POPULATE_WRITE)
    except OSError:  # EINVAL: an older kernel; the buffer is as usable, only slower to fill
        pass


#: buffers held aside while a view of them still lives (each one is alive anyway until the view dies)
MAX_PENDING = 4


class BufferPool:
    """Reusable unit buffers keyed by exact size, bounded by ``max_bytes``.

    Args:
        max_bytes: most bytes kept idle for reuse.
        allocate: makes a new buffer of a size (default :func:`unit_buffer`; the device path passes pinned
            host memory). Only buffers of the type it returns are taken back.

    Not thread-safe: used from the client's I/O loop only.
    """

    def __init__(self, max_bytes: int, allocate: Callable[[int], Any] = unit_buffer) -> None:
        self.max_bytes = max_bytes
        self.allocate = allocate
        self._kinds: set[type] = {bytearray} if allocate is unit_buffer else set()
        self._free: dict[int, list[Any]] = defaultdict(list)
        self._pending: list[Any] = []  # given back while a view still lived
        #: idle bytes the owner (the unit cache) allows on top of ``max_bytes`` right now: the unit slots of
        #: its bound that no live unit uses, so buffers are reused, never freed and allocated again
        self.slack_bytes = 0
        self.bytes = 0
        self.reused = 0
        self.allocated = 0
        self.refused = 0

    def take(self, size: int) -> Any:
        """A writable buffer of exactly ``size`` bytes (contents unspecified).

        Units differ by a few header bytes (``layers.9`` vs ``layers.10``), so an idle buffer of another
        size is resized in place (``mremap`` for maps: its pages stay, none is faulted in again) rather
        than left idle while a fresh one is allocated. Idle buffers have no view (see :meth:`give`), so
        resizing cannot pull memory from under a tensor.
        """
        self._reclaim()
        buf = self._pop(size)
        if buf is not None:
            self.reused += 1
            return buf
        self.allocated += 1
        buf = self.allocate(size)
        self._kinds.add(type(buf))
        return buf

    def _pop(self, size: int) -> Any:
        exact = self._free.get(size)
        if exact:
            self.bytes -= size
            return exact.pop()
        sizes = [n for n, bufs in self._free.items() if bufs and isinstance(bufs[-1], (mmap.mmap, bytearray))]
        if not sizes:
            return None
        near = min(sizes, key=lambda n: abs(n - size))
        buf = self._free[near].pop()
        self.bytes -= near
        if isinstance(buf, mmap.mmap):
            buf.resize(size)
        elif size < near:
            del buf[size:]
        else:
            buf.extend(bytes(size - near))
        return buf

    def give(self, buf: Any) -> bool:
        """Offer a buffer back; it is kept only if no tensor view or other object references it."""
        if buf is None or type(buf) not in self._kinds | {bytearray}:
            return False
        self._pending = [held for held in self._pending if held is not buf]  # offered again: judge it now
        # References now: the caller's variable, this parameter, getrefcount's argument.
        if sys.getrefcount(buf) > 3:
            # A view still lives (a frame or a worker's finished future that has not let go yet): hold the
            # buffer aside and take it once the view is gone, rather than letting it be freed and
            # allocating a new one. Held-aside buffers count once they are idle (:meth:`_reclaim`).
            self.refused += 1
            if len(self._pending) < MAX_PENDING:
                self._pending.append(buf)
            return False
        return self._keep_idle(buf)

    def _keep_idle(self, buf: Any) -> bool:
        if self.bytes + len(buf) > max(self.max_bytes, self.slack_bytes):
            return False
        self._free[len(buf)].append(buf)
        self.bytes += len(buf)
        return True

    def _reclaim(self) -> None:
        """Move held-aside buffers whose last view has died to the idle set (within its bound)."""
        waiting, self._pending = self._pending, []
        while waiting:
            buf = waiting.pop()
            # References now: ``buf`` and getrefcount's argument.
            if sys.getrefcount(buf) > 2:
                self._pending.append(buf)
            else:
                self._keep_idle(buf)
            del buf

    def limit(self, max_bytes: int) -> None:
        """Bound idle bytes to ``max_bytes`` from now on (the owner sizes its pool once its plan is known)."""
        self.max_bytes = max_bytes
        self._reclaim()

    def clear(self) -> None:
        self._free.clear()
        self._pending.clear()
        self.bytes = 0
