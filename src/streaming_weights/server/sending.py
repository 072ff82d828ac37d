"""Zero-copy DATA frames on a plain (``ws://``) connection: ``sendmsg`` straight from the cached blob.

asyncio's selector transport (Python 3.11) copies whatever ``send`` does not take at once into its own
buffer and sends it from there later, so with a reader slower than the server nearly every byte of a
unit was copied once more on the server's core. :class:`DirectWriter` hands the frame header, the
protocol header and a view of the blob to one ``sendmsg`` call instead, and waits for the socket to be
writable (on a duplicate descriptor, so the transport's own registration is untouched) when the kernel
takes nothing. Only the tail of a frame the kernel took in part goes through the transport (copied), so
a frame is never interleaved with anything websockets writes (pongs, pings, the close frame): those
writes go through the transport, and the transport sends its buffer in order, after that tail.

A frame waits while the transport still holds bytes (such a tail, or a pong) rather than being queued
behind them; TLS connections use ``transport.write`` as before.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Sequence
from typing import Any

Buffer = bytes | bytearray | memoryview


class DirectWriter:
    """Per-connection frame writer (see the module docstring); :meth:`close` when the connection ends."""

    def __init__(self, transport: asyncio.WriteTransport) -> None:
        self.transport = transport
        self._sock: socket.socket | None = None
        raw: Any = transport.get_extra_info("socket")
        if raw is not None and transport.get_extra_info("ssl_object") is None and hasattr(raw, "dup"):
            try:
                self._sock = raw.dup()
                self._sock.setblocking(False)
            except OSError:
                self._sock = None
        #: bytes sent straight from the caller's buffers / copied into the transport (diagnostics)
        self.direct_bytes = 0
        self.copied_bytes = 0

    @property
    def direct(self) -> bool:
        return self._sock is not None

    async def write(self, parts: Sequence[Buffer], is_open: Callable[[], bool] = lambda: True) -> None:
        """Write one frame made of ``parts``, in order and whole, ahead of anything written after it.

        Waits (no byte of the frame written yet) while the socket is full; ``is_open()`` is asked after
        each wait, and a False answer drops the frame (the connection is closing: the caller's next send
        finds out).
        """
        sent = await self._start(parts, is_open)
        if sent is not None:
            self._queue(_after(parts, sent))

    async def write_file(self, head: Buffer, fd: int, offset: int, count: int,
                         is_open: Callable[[], bool] = lambda: True) -> None:
        """Write one frame: ``head``, then ``count`` bytes of file ``fd`` from ``offset`` with ``sendfile``
        (the kernel sends page-cache pages; no copy on this side). What the socket does not take is read
        with ``pread`` and queued in the transport. Raises EOFError (after aborting the connection, whose
        frame cannot be completed) when the file is shorter than ``offset + count``."""
        sent = await self._start((head,), is_open)
        if sent is None:
            return
        done = 0
        if sent == len(head):
            done = self._sendfile(fd, offset, count)
        else:
            self._queue(_after((head,), sent))
        if done < count:
            rest = os.pread(fd, count - done, offset + done)
            if len(rest) != count - done:
                self.transport.abort()
                raise EOFError(f"file ended {count - done - len(rest)} bytes before the frame did")
            self._queue((rest,))

    def _sendfile(self, fd: int, offset: int, count: int) -> int:
        assert self._sock is not None
        done = 0
        while done < count:
            try:
                n = os.sendfile(self._sock.fileno(), fd, offset + done, count - done)
            except OSError:  # full (EAGAIN), or failed: the transport writes the rest, or reports the failure
                break
            if not n:
                break
            done += n
        self.direct_bytes += done
        return done

    async def _start(self, parts: Sequence[Buffer], is_open: Callable[[], bool]) -> int | None:
        """``sendmsg`` as much of ``parts`` as the socket takes once it takes anything and nothing is queued
        in the transport ahead of them (waiting for both rather than copying the frame into the transport);
        the byte count (0: everything must go through the transport), or None when ``is_open()`` said no
        after a wait."""
        while self._sock is not None and not self.transport.is_closing():
            try:
                if self.transport.get_write_buffer_size():
                    raise BlockingIOError  # bytes queued ahead: wait until the transport has sent them
                sent = self._sock.sendmsg(parts)
            except (BlockingIOError, InterruptedError):
                await self._writable()
                if not is_open():
                    return None
                continue
            except OSError:
                return 0  # the transport reports the failure on its own write
            self.direct_bytes += sent
            return sent
        return 0

    def _queue(self, parts: Sequence[Buffer]) -> None:
        for part in parts:
            self.copied_bytes += len(part)
            self.transport.write(part)

    async def _writable(self) -> None:
        assert self._sock is not None
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        fd = self._sock.fileno()
        loop.add_writer(fd, lambda: fut.done() or fut.set_result(None))
        try:
            await fut
        finally:
            loop.remove_writer(fd)

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


def _after(parts: Sequence[Buffer], n: int) -> list[memoryview]:
    """What remains of ``parts`` once their first ``n`` bytes are sent."""
    rest: list[memoryview] = []
    for part in parts:
        view = memoryview(part)
        if n >= len(view):
            n -= len(view)
            continue
        rest.append(view[n:])
        n = 0
    return rest


__all__ = ["DirectWriter"]
