"""``python -m streaming_weights.benchmarks.rawsender FILE PORT``: the raw-TCP ceiling of the transfer case.

Listens on loopback; each byte a client sends asks for the whole file once more, sent in 1 MiB pieces.
"""

from __future__ import annotations

import socket
import sys


def serve(path: str, port: int) -> None:
    with open(path, "rb") as f:
        data = f.read()
    view = memoryview(data)
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(4)
    while True:
        conn, _ = srv.accept()
        with conn:
            while conn.recv(1):  # one byte = send the blob once more
                for off in range(0, len(data), 1 << 20):
                    conn.sendall(view[off : off + (1 << 20)])


def receive_once(port: int, size: int, buf: bytearray | None = None) -> float:
    """Ask the sender for its file once and ``recv_into`` a preallocated buffer (``buf``, or a new one
    made before the clock starts); returns the seconds."""
    import time

    buf = bytearray(size) if buf is None else buf
    view = memoryview(buf)
    with socket.create_connection(("127.0.0.1", port)) as s:
        t = time.perf_counter()
        s.sendall(b"x")
        got = 0
        while got < size:
            n = s.recv_into(view[got:])
            if not n:
                raise RuntimeError("raw TCP sender closed the connection")
            got += n
        return time.perf_counter() - t


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]))
