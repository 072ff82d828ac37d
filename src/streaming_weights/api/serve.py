"""Running the app: uvicorn in the foreground (the CLI), or in a background thread (tests, notebooks).

Stopping (Ctrl-C / SIGTERM in the foreground, :meth:`ApiServer.stop` in a thread) first drains the app's
requests in flight (:mod:`.lifecycle`: finished within the grace, else answered 503), then lets uvicorn close
its connections. The signal is not re-raised afterwards: the caller gets a :class:`StopReport` instead.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import uvicorn

from ..exceptions import ConfigurationError
from .lifecycle import DrainReport


@dataclass(frozen=True)
class StopReport:
    """How the server stopped: the signal's name (``None``: :meth:`ApiServer.stop`), the drain, and whether a
    second Ctrl-C cut the grace short (``forced``: what was in flight then was cancelled at once)."""

    signal: str | None
    drain: DrainReport
    forced: bool = False


class _DrainingServer(uvicorn.Server):
    """uvicorn that drains the app (``app.state.drain``) before closing connections, and records the stop
    signal instead of re-raising it after shutdown (uvicorn's default turns it into a KeyboardInterrupt)."""

    def __init__(self, config: uvicorn.Config, app: Any) -> None:
        super().__init__(config)
        state = getattr(app, "state", None)
        self._drain = getattr(state, "drain", None)
        self._hurry = getattr(state, "hurry", None)
        self.signals: list[int] = []
        self.drained = DrainReport()
        self.forced = False

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.signals.append(sig)
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: stop waiting
        else:
            self.should_exit = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:  # no new connections while draining
            server.close()
        if self._drain is not None:
            task = asyncio.ensure_future(self._drain())
            while not task.done():
                if self.force_exit and self._hurry is not None:  # a second Ctrl-C: cancel what is in flight now
                    self._hurry()
                await asyncio.wait({task}, timeout=0.1)  # uvicorn's own poll of force_exit, same interval
            self.drained = task.result()
        # The app is idle now: let uvicorn close connections and run the app's shutdown normally (skipping
        # it, as a forced exit does, would leave the lifespan task to be cancelled with a traceback).
        self.forced, self.force_exit = self.force_exit, False
        await super().shutdown(sockets)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigurationError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.listen(2048)
    return sock


class ApiServer:
    """uvicorn serving ``app`` on a socket bound at construction (so ``port=0`` is known right away).

    Args:
        app: the ASGI app (:func:`~.app.create_app`).
        host, port: where to listen (``port=0``: any free port; read :attr:`port`).
        log_level: uvicorn's log level (the CLI sets it; the library default keeps uvicorn quiet).
    """

    def __init__(self, app: Any, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning") -> None:
        self._sock = _bind(host, port)
        self.host, self.port = host, int(self._sock.getsockname()[1])
        self._server = _DrainingServer(uvicorn.Config(app, log_level=log_level, lifespan="on",
                                                      timeout_graceful_shutdown=5), app)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def run(self) -> StopReport:
        """Serve in this thread until Ctrl-C / SIGTERM (in the main thread) or :meth:`stop`."""
        try:
            self._server.run(sockets=[self._sock])
        finally:
            self._sock.close()
        sigs = self._server.signals
        return StopReport(signal.Signals(sigs[0]).name if sigs else None, self._server.drained, self._server.forced)

    def start(self, timeout: float = 60.0) -> ApiServer:
        """Serve in a daemon thread; returns once the app has started (its lifespan ran)."""
        self._thread = threading.Thread(target=self.run, name="surfing-api", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        # uvicorn has no started-callback: poll its `started` flag (bounded; join returns early if it died).
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the API server exited while starting (see its log)")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the API server did not start within {timeout:.0f} s")
            self._thread.join(0.01)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> ApiServer:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def serve_api(model: Any, *, host: str = "127.0.0.1", port: int = 8000, tokens: list[str] | None = None,
              settings: Any = None, log_level: str = "warning", ready: Any = None) -> StopReport:
    """Serve ``model`` in the foreground until Ctrl-C / SIGTERM; drains, then closes the model.

    Args:
        model: a loaded streaming model (see :func:`~.app.create_app`).
        host, port: where to listen.
        tokens: accepted bearer tokens (``None``: no authentication; a warning is logged off loopback).
        settings: :class:`~.app.ApiSettings`.
        log_level: uvicorn's log level.
        ready: called with the :class:`ApiServer` once the socket is bound (the CLI prints the URL).

    Returns:
        How it stopped (the signal, the requests in flight then, and how many were cancelled).

    Raises:
        ConfigurationError: the address cannot be bound.
        ModelError: an embedding model whose sentence-transformers pipeline this server cannot apply.
    """
    from .app import create_app

    if not tokens and host not in ("127.0.0.1", "localhost", "::1"):
        logging.getLogger(__name__).warning(
            "serving on %s without --token-file: anyone who can reach it can use the model", host)
    try:
        server = ApiServer(create_app(model, tokens=tokens, settings=settings), host=host, port=port,
                           log_level=log_level)
        if ready is not None:
            ready(server)
        return server.run()
    finally:
        model.close()
