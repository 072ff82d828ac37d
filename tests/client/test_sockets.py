"""The client's socket options: the wake-up threshold (SO_RCVLOWAT) a connection keeps at the bytes certain to come."""

from __future__ import annotations

import select
import socket

import pytest

from streaming_weights.client import sockets
from streaming_weights.client.sockets import WakeThreshold

pytestmark = pytest.mark.skipif(not hasattr(socket, "SO_RCVLOWAT"), reason="this platform has no SO_RCVLOWAT")


class _Transport:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def get_extra_info(self, name: str):
        return self.sock if name == "socket" else None


@pytest.fixture
def pair():
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        peer, _ = server.accept()
        yield client, peer
        client.close()
        peer.close()


def lowat(sock: socket.socket) -> int:
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT)


def readable(sock: socket.socket, wait: float = 0.2) -> bool:
    return bool(select.select([sock], [], [], wait)[0])


def test_the_loop_is_woken_once_the_expected_bytes_are_there(pair):
    client, peer = pair
    wake = WakeThreshold(_Transport(client), secure=False)
    wake.expect(1000)
    assert lowat(client) == wake.bytes == 1000
    peer.sendall(b"x" * 999)
    assert not readable(client) and not wake.idle()  # 999 bytes wait unread below the threshold
    peer.sendall(b"x")
    assert readable(client)
    wake.expect(0)  # nothing certain: back to the kernel's default
    assert lowat(client) == wake.bytes == 1 and wake.idle()


@pytest.mark.parametrize("rcvbuf", [64 << 10, 8 << 20])
def test_the_threshold_is_capped_by_the_receive_buffer_and_left_alone_on_tls(pair, rcvbuf):
    """A threshold the receive buffer cannot hold would close the TCP window first (older kernels never wake)."""
    client, _ = pair
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    held = client.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    wake = WakeThreshold(_Transport(client), secure=False)
    assert wake.most == min(sockets.MAX_WAKE_BYTES, held // sockets.WAKE_BUFFER_SHARE)
    wake.expect(1 << 40)
    assert lowat(client) == wake.bytes == wake.most
    tls = WakeThreshold(_Transport(client), secure=True)
    tls.expect(5000)
    assert tls.bytes == 1 and lowat(client) == wake.most  # untouched


def test_an_idle_socket_is_idle(pair):
    client, _ = pair
    wake = WakeThreshold(_Transport(client), secure=False)
    wake.expect(4096)
    assert wake.idle()
    assert WakeThreshold().idle()  # not connected yet
