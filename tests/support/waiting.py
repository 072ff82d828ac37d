"""Bounded polls of a real condition, for the few things a test cannot await directly.

Tests never sleep to "give something time": they wait on an event, a task, or — when the thing is only
observable by asking (a TTL expiring, a server noticing a closed socket) — poll it here with a deadline.
Ports are waited for with :func:`streaming_weights.netutil.wait_for_port`.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from typing import Any, Awaitable, Callable, TypeVar

T = TypeVar("T")

INTERVAL = 0.01  # seconds between probes: short, since every probe asks the real thing


def wait_until(probe: Callable[[], T], *, timeout: float = 10.0, what: str = "the condition") -> T:
    """Call ``probe`` until it returns something truthy and return that; ``AssertionError`` naming ``what``
    if it never does within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        time.sleep(INTERVAL)


async def eventually(probe: Callable[[], Any | Awaitable[Any]], *, timeout: float = 10.0,
                     what: str = "the condition") -> Any:
    """Async :func:`wait_until`: ``probe`` may be a plain or an async callable."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        await asyncio.sleep(INTERVAL)


__all__ = ["eventually", "wait_until"]
