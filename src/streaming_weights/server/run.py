"""``run_server``: the CLI's blocking entry point, with graceful SIGINT/SIGTERM shutdown and SIGHUP reload."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any, Callable

from ..exceptions import ConfigurationError
from .server import WeightServer

logger = logging.getLogger("streaming_weights.server")


async def run_server(server: WeightServer, *, ready: Callable[[Any], None] | None = None) -> None:
    """Run ``server`` until SIGINT/SIGTERM, then close connections gracefully. SIGHUP re-reads its token
    file (:meth:`WeightServer.reload_access`); a bad file is logged and the old tokens stay in force.

    ``ready`` (optional) is called with the server once it listens (the CLI prints the address).

    Raises:
        ConfigurationError: the server cannot start (see :meth:`WeightServer.start`).
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    installed = []
    handlers: dict[int, Callable[[], None]] = {signal.SIGINT: stop.set, signal.SIGTERM: stop.set}
    if hasattr(signal, "SIGHUP"):
        handlers[signal.SIGHUP] = lambda: _reload(server)
    for sig, handler in handlers.items():
        try:
            loop.add_signal_handler(sig, handler)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):  # not the main thread / not supported
            pass
    try:
        await server.start()
        if ready is not None:
            ready(server)
        await stop.wait()
        logger.info("shutting down")
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        await server.stop()


def _reload(server: WeightServer) -> None:
    try:
        server.reload_access()
    except ConfigurationError as exc:
        logger.error("token file not reloaded (the previous tokens stay in force): %s", exc)
