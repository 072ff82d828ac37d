"""Socket options of the client's connections (the transfer path's kernel-side tuning)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import TypeVar

try:  # (POSIX: FIONREAD of a socket)
    import fcntl
    import termios
except ImportError:  # pragma: no cover - Windows
    fcntl = termios = None  # type: ignore[assignment]

T = TypeVar("T", bound=asyncio.BaseTransport)

#: SO_RCVBUF of client sockets (0: keep the kernel's autotuned default). A unit arrives as one long burst;
#: with the default, one recv_into wake-up took ~125 KB (535 wake-ups for 64 MiB, each ~0.9 ms of event-loop
#: overhead on a loaded core); a wide buffer lets one wake-up take far more. Measured with the weight server
#: pinned to one CPU and the client to the other, one 64 MiB unit, 4 A/B pairs in one session (medians of 4
#: rounds each): end to end / raw TCP 0.39, 0.48, 0.40, 0.45 without; 0.60, 0.87, 0.63, 0.56 with (2 shared,
#: loaded cores: noisy). Linux caps the value at
#: 2 x net.core.rmem_max; the memory is used only while received bytes wait to be read.
RECEIVE_BUFFER_BYTES = 8 << 20


def widen_receive_buffer(transport: T) -> T:
    """Set :data:`RECEIVE_BUFFER_BYTES` on ``transport``'s socket (best effort: a refusal keeps the default);
    returns ``transport``."""
    sock = transport.get_extra_info("socket") if RECEIVE_BUFFER_BYTES else None
    if isinstance(sock, socket.socket) or hasattr(sock, "setsockopt"):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER_BYTES)
    return transport


#: The most bytes one wake-up of the event loop may wait for (``SO_RCVLOWAT``), and at most this share of the
#: socket's receive buffer: a threshold the buffer cannot hold closes the TCP window before it is reached, and
#: kernels before ~5.16 then never wake the reader (Linux caps the threshold at half the buffer; packets take more
#: buffer than their payload).
MAX_WAKE_BYTES = 1 << 20
WAKE_BUFFER_SHARE = 4


class WakeThreshold:
    """``SO_RCVLOWAT`` of a plain TCP socket, kept at the bytes certain to arrive next.

    By default the kernel wakes the event loop as soon as any byte is queued: a busy client (computing
    while a unit arrives) is interrupted for every few segments, each wake-up a thread switch, a GIL
    hand-over and a pass of the event loop. Set to the rest of a frame's payload (which the stream must
    deliver before anything else), the loop is woken once the frame is there. Never more than what is
    certain to come, so it never waits for bytes that will not arrive; 1 otherwise. TLS sockets keep the
    default (their records do not map to the payload's bytes). Measured, SmolLM2 at a 660 MB cap, 8 tokens
    (2.5 GB received): 7.1k receives with the frame reader's read-ahead alone, 5.0k with this too.
    """

    def __init__(self, transport: asyncio.BaseTransport | None = None, secure: bool = False) -> None:
        sock = transport.get_extra_info("socket") if transport is not None else None
        usable = not secure and hasattr(socket, "SO_RCVLOWAT") and hasattr(sock, "setsockopt")
        self._sock = sock if usable else None
        self.bytes = 1
        self.most = MAX_WAKE_BYTES
        if self._sock is not None:
            try:
                rcvbuf = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
                self.most = max(1, min(MAX_WAKE_BYTES, rcvbuf // WAKE_BUFFER_SHARE))
            except OSError:
                self._sock = None

    def expect(self, n: int) -> None:
        """The next ``n`` bytes are certain to arrive (0: nothing is)."""
        want = max(1, min(n, self.most))
        if self._sock is None or want == self.bytes:
            return
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, want)
        except OSError:  # refused: keep the kernel's default from now on
            self._sock = None
            return
        self.bytes = want

    def idle(self) -> bool:
        """Whether no received byte waits unread below the threshold (a silent connection is silent indeed)."""
        if self._sock is None or self.bytes == 1 or fcntl is None:
            return True
        try:
            return fcntl.ioctl(self._sock.fileno(), termios.FIONREAD, bytes(4)) == bytes(4)
        except OSError:
            return True
