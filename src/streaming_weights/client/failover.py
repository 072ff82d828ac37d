"""Client-side failover over several weight servers (or any unit sources) serving the same models.

``FailoverSource`` only chooses and orders servers: each call makes one pass over them, healthy ones
first; one that fails with a transient error (see ``retry.is_transient``) is skipped for an
exponentially growing, jittered back-off and the call moves on to the next. It never retries a server
within a call: ``RetryingSource`` around it does that. Every unit is still verified against the
manifest's hash, so results are identical whichever server answered.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Awaitable, Callable, TypeVar

from ..exceptions import ConnectionFailedError
from ..format import Manifest
from .base import FetchedUnit, UnitSource
from .retry import is_transient

log = logging.getLogger(__name__)
T = TypeVar("T")


class FailoverSource(UnitSource):
    """Try ``sources`` in order, skipping ones that recently failed.

    Args:
        sources: unit sources (typically ``WebSocketSource`` s) serving the same chunked models.
        base_backoff, max_backoff: seconds a failed source is skipped for (doubling per failure).
    """

    def __init__(self, sources: list[UnitSource], *, base_backoff: float = 0.5, max_backoff: float = 30.0) -> None:
        if not sources:
            raise ValueError("FailoverSource needs at least one source")
        self.sources = list(sources)
        # The source that answers fills the buffer: every source was built with the same pool.
        self.buffer_pool = self.sources[0].buffer_pool
        self.fingerprints = self.sources[0].fingerprints  # likewise shared (open_unit_source)
        self.location = " | ".join(s.location for s in self.sources)
        self.base_backoff, self.max_backoff = base_backoff, max_backoff
        self._down_until = [0.0] * len(self.sources)
        self._failures = [0] * len(self.sources)
        self.failovers = 0
        self.attempt_span = sum(s.attempt_span for s in self.sources)

    def _order(self) -> list[int]:
        now = time.monotonic()
        healthy = [i for i in range(len(self.sources)) if self._down_until[i] <= now]
        resting = sorted((i for i in range(len(self.sources)) if self._down_until[i] > now),
                         key=lambda i: self._down_until[i])
        return healthy + resting  # if all are resting, still try them (soonest first) rather than fail

    async def _call(self, what: str, fn: Callable[[UnitSource], Awaitable[T]], *, unit: bool = False) -> T:
        errors: list[str] = []
        last: Exception | None = None
        for attempt, i in enumerate(self._order()):
            try:
                result = await fn(self.sources[i])
            except Exception as exc:
                if not is_transient(exc, unit=unit):
                    raise  # "this request is wrong": every server would answer the same
                self._failures[i] += 1
                delay = min(self.max_backoff, self.base_backoff * 2 ** (self._failures[i] - 1))
                self._down_until[i] = time.monotonic() + delay * (0.5 + random.random())
                errors.append(f"{self.sources[i].location}: {exc}")
                last = exc
                log.warning("%s failed on %s (%s); failing over", what, self.sources[i].location, exc)
                if attempt + 1 < len(self.sources):
                    self.failovers += 1
                continue
            self._failures[i] = 0
            self._down_until[i] = 0.0
            return result
        raise ConnectionFailedError(f"{what}: every server failed: " + "; ".join(errors)) from last

    async def list_models(self) -> list[str]:
        return await self._call("list models", lambda s: s.list_models())

    async def get_manifest(self, model_name: str | None) -> Manifest:
        return await self._call("get manifest", lambda s: s.get_manifest(model_name))

    async def fetch_unit(self, manifest: Manifest, unit: str) -> FetchedUnit:
        return await self._call(f"fetch {unit}", lambda s: s.fetch_unit(manifest, unit), unit=True)

    async def fetch_file(self, manifest: Manifest, name: str) -> bytes:
        return await self._call(f"fetch {name}", lambda s: s.fetch_file(manifest, name))

    async def close(self) -> None:
        await asyncio.gather(*(s.close() for s in self.sources), return_exceptions=True)


__all__ = ["FailoverSource"]
