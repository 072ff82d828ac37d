"""server.sending.DirectWriter on a real socket: frames whole and in order with other transport writes,
waiting (not copying) while the socket is full, sendfile frames, and the fallback without a socket."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from typing import AsyncIterator

import pytest

from streaming_weights.server.sending import DirectWriter

SMALL = 64 << 10


@contextlib.asynccontextmanager
async def connected() -> AsyncIterator[tuple[asyncio.WriteTransport, socket.socket, DirectWriter]]:
    """(transport, the peer's socket, a DirectWriter on the transport) over a socket pair with small buffers;
    all three closed afterwards."""
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL)
    transport, _ = await asyncio.get_running_loop().create_connection(asyncio.Protocol, sock=a)
    w = DirectWriter(transport)
    try:
        yield transport, b, w
    finally:
        transport.close()
        w.close()
        b.close()


def read_exact(sock: socket.socket, n: int) -> bytes:
    sock.settimeout(30)
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(min(1 << 20, n - len(out)))
        assert chunk, "peer closed early"
        out += chunk
    return bytes(out)


def fill(transport) -> bytes:
    """Fill the socket's buffers behind the transport's back (its own buffer stays empty); the bytes sent."""
    sock = transport.get_extra_info("socket").dup()
    sock.setblocking(False)
    sent = bytearray()
    try:
        while True:
            try:
                n = sock.send(b"f" * 4096)
            except BlockingIOError:
                return bytes(sent)
            sent += b"f" * n
    finally:
        sock.close()


async def test_frames_stay_whole_and_in_order_with_other_writes():
    async with connected() as (transport, peer, w):
        assert w.direct
        one, two = os.urandom(3 << 20), os.urandom(1 << 20)
        expected = b"H1" + one + b"PONG" + b"H2" + two
        reading = asyncio.ensure_future(asyncio.to_thread(read_exact, peer, len(expected)))
        await w.write((b"H1", memoryview(one)))  # more than the socket holds: its tail goes to the transport
        transport.write(b"PONG")  # what websockets writes meanwhile (a pong, a ping)
        queued, direct = transport.get_write_buffer_size(), w.direct_bytes
        await w.write((b"H2", two))  # bytes are queued ahead: it waits for them instead of overtaking them
        assert await reading == expected
        assert queued and w.copied_bytes > 0
        assert w.direct_bytes > direct  # ... then sends (some of) it itself rather than copying it all


async def test_a_full_socket_is_waited_for_not_copied():
    async with connected() as (transport, peer, w):
        filler = fill(transport)
        body = os.urandom(SMALL // 2)
        task = asyncio.ensure_future(w.write((b"H", body)))
        await asyncio.sleep(0.1)
        assert not task.done() and w.direct_bytes == 0 and w.copied_bytes == 0  # nothing taken, nothing copied
        expected = filler + b"H" + body
        got = await asyncio.gather(asyncio.to_thread(read_exact, peer, len(expected)), task)
        assert got[0] == expected


async def test_a_closing_connection_drops_the_waiting_frame():
    async with connected() as (transport, peer, w):
        filler = fill(transport)
        task = asyncio.ensure_future(w.write((b"H", b"x" * 100), lambda: False))
        await asyncio.sleep(0.05)
        assert await asyncio.gather(asyncio.to_thread(read_exact, peer, len(filler)), task) == [filler, None]
        assert w.direct_bytes == 0 and w.copied_bytes == 0


async def test_sendfile_frames_with_a_slow_reader(tmp_path):
    data = os.urandom(3 << 20)
    (tmp_path / "blob").write_bytes(data)
    async with connected() as (transport, peer, w):
        expected = b"H1" + data[100 : 100 + (2 << 20)] + b"PONG" + b"H2" + data[5:1005]
        reading = asyncio.ensure_future(asyncio.to_thread(read_exact, peer, len(expected)))
        with open(tmp_path / "blob", "rb") as f:
            await w.write_file(b"H1", f.fileno(), 100, 2 << 20)
            transport.write(b"PONG")
            await w.write_file(b"H2", f.fileno(), 5, 1000)  # waits for the queued bytes, then goes direct
        assert await reading == expected
        assert w.direct_bytes > 0 and w.copied_bytes > 0


async def test_a_file_shorter_than_its_frame_aborts_the_connection(tmp_path):
    (tmp_path / "blob").write_bytes(b"y" * 1000)
    async with connected() as (transport, peer, w):
        with open(tmp_path / "blob", "rb") as f, pytest.raises(EOFError):
            await w.write_file(b"H", f.fileno(), 0, 2000)
        assert transport.is_closing()


class _NoSocketTransport(asyncio.WriteTransport):
    """A transport without a plain socket (as a TLS one looks to DirectWriter)."""

    def __init__(self):
        super().__init__()
        self.written = []

    def get_extra_info(self, name, default=None):
        return default

    def write(self, data):
        self.written.append(bytes(data))

    def is_closing(self):
        return False

    def get_write_buffer_size(self):
        return 0


async def test_without_a_socket_everything_goes_through_the_transport(tmp_path):
    (tmp_path / "blob").write_bytes(b"0123456789")
    t = _NoSocketTransport()
    w = DirectWriter(t)
    assert not w.direct
    await w.write((b"H", memoryview(b"body")))
    with open(tmp_path / "blob", "rb") as f:
        await w.write_file(b"F", f.fileno(), 2, 5)
    assert b"".join(t.written) == b"Hbody" + b"F23456"
    assert w.copied_bytes == len(b"Hbody" + b"F23456")
