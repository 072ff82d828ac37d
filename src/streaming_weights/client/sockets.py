"""Socket options of the client's connections (the transfer path's kernel-side tuning)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import TypeVar

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
