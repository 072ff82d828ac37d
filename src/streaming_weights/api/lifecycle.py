"""The API's life around its requests: requests in flight, the graceful stop, and readiness.

Stopping (Ctrl-C, SIGTERM, :meth:`ApiServer.stop`): new model requests are refused with a 503 at once; those in
flight get ``grace`` seconds to finish; any still running then are cancelled and answered with OpenAI's error
shape (503 ``server_shutting_down``), never a plain-text 500 or a cut connection.

Readiness (``/healthz``): the weight source answers one cheap call (below the retry layer, bounded).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

#: How long ``/healthz`` waits for the weight source before reporting it unavailable.
PROBE_SECONDS = 5.0
#: After cancelling, how long the cancelled requests get to write their error responses.
FLUSH_SECONDS = 5.0
#: After the drain, how long a batch still computing gets to reach its next token and stop; one stuck on a fetch
#: that never arrives is abandoned then: closing the model cancels its fetches (the rows were answered already).
IDLE_WAIT_SECONDS = 2.0


@dataclass(frozen=True)
class DrainReport:
    """What a stop found: ``in_flight`` model requests when it began, ``cancelled`` of them after the grace."""

    in_flight: int = 0
    cancelled: int = 0

    @property
    def finished(self) -> int:
        return self.in_flight - self.cancelled


class Lifecycle:
    """Counts model requests in flight (event-loop side) and drains them on stop."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.closing = False
        self._idle: asyncio.Event | None = None
        self._hurry: asyncio.Event | None = None

    def _event(self) -> asyncio.Event:
        if self._idle is None:
            self._idle = asyncio.Event()
            if self.in_flight == 0:
                self._idle.set()
        return self._idle

    def entered(self) -> None:
        self.in_flight += 1
        self._event().clear()

    def left(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._event().set()

    @property
    def hurried(self) -> bool:
        return self._hurry is not None and self._hurry.is_set()

    def hurry(self) -> None:
        """End the grace now (a second Ctrl-C): what is still in flight is cancelled at once."""
        if self._hurry is not None:
            self._hurry.set()

    async def _until_idle(self, timeout: float, hurry: asyncio.Event | None = None) -> bool:
        waits = {asyncio.ensure_future(self._event().wait())}
        if hurry is not None:
            waits.add(asyncio.ensure_future(hurry.wait()))
        try:
            await asyncio.wait(waits, timeout=max(0.0, timeout), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        return self.in_flight == 0

    async def drain(self, grace: float, cancel: Callable[[], Awaitable[None]]) -> DrainReport:
        """Refuse new requests, wait up to ``grace`` seconds for those in flight, then ``cancel()`` the rest
        (which answers them) and give their responses :data:`FLUSH_SECONDS` to go out. Idempotent."""
        if self.closing:
            return DrainReport()
        self.closing = True
        self._hurry = asyncio.Event()
        at_start = self.in_flight
        if await self._until_idle(grace, self._hurry):
            return DrainReport(at_start, 0)
        cancelled = self.in_flight
        await cancel()
        await self._until_idle(FLUSH_SECONDS)
        return DrainReport(at_start, cancelled)


async def probe_weights(model: Any, timeout: float = PROBE_SECONDS) -> str | None:
    """``None`` when the model's weight source answers a model listing within ``timeout``, else why not.

    One attempt, below the retry layer: a health check must answer now, not after retries and backoff."""
    source = model.source
    once = getattr(source, "source", source)
    where = getattr(model, "websocket_uri", None) or getattr(source, "location", "") or "the weight source"
    try:
        await asyncio.wait_for(model.engine.wrap(once.list_models()), timeout)
    except asyncio.TimeoutError:
        return f"the weights at {where} did not answer within {timeout:g} s"
    except Exception as exc:  # noqa: BLE001 - any failure is the reason, not an error of the probe
        text = str(exc) or type(exc).__name__
        return text if str(where) in text else f"the weights at {where} are unavailable: {text}"
    return None


__all__ = ["DrainReport", "Lifecycle", "probe_weights"]
