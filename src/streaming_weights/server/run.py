"""``run_server``: the CLI's blocking entry point, with graceful SIGINT/SIGTERM shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any, Callable

from .server import WeightServer

logger = logging.getLogger("streaming_weights.server")


async def run_server(server: WeightServer, *, ready: Callable[[Any], None] | None = None) -> None:
    """Run ``server`` until SIGINT/SIGTERM, then close connections gracefully.

    ``ready`` (optional) is called with the server once it listens (the CLI prints the address).

    Raises:
        ConfigurationError: the server cannot start (see :meth:`WeightServer.start`).
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
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
