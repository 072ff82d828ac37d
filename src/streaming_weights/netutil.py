"""Loopback port helpers shared by the benchmark suite, its child programs and the tests.

The one ``free_port`` and the one ``wait_for_port``: everything that starts a server process and has to
know when it listens uses these, rather than its own sleep loop.
"""

from __future__ import annotations

import socket
import subprocess
import time


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago (the caller binds it soon after)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _output_tail(proc: subprocess.Popen) -> str:
    stream = proc.stdout if proc.stdout is not None else proc.stderr
    if stream is None:
        return ""
    data = stream.read()
    text = data.decode(errors="replace") if isinstance(data, bytes) else str(data)
    return text[-2000:]


def wait_for_port(port: int, *, host: str = "127.0.0.1", timeout: float = 60.0,
                  proc: subprocess.Popen | None = None) -> None:
    """Return once a TCP connect to ``host:port`` succeeds.

    A bounded poll of the real condition (a connect), not a sleep: each failed attempt waits at most 50 ms.

    Raises:
        RuntimeError: ``proc`` exited before the port accepted a connection (its output tail is included).
        TimeoutError: nothing listened within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on port {port}: "
                               f"{_output_tail(proc)}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"nothing listened on {host}:{port} within {timeout:.0f} s") from None
            time.sleep(0.05)  # poll interval of the connect loop, not a wait for an event we could observe


__all__ = ["free_port", "wait_for_port"]
