"""The client's unit cache and prefetcher.

State (all touched only on the I/O loop thread):

* ``active``     units whose tensors are in the model right now (the one computing)
* ``cached``     units kept between uses — bounded by ``max_units`` (and optionally ``max_bytes``)
* ``prefetched`` units fetched ahead and not used yet — at most the prefetch window
* ``inflight``   running fetches; a demand miss joins a running prefetch instead of fetching twice

So at most ``max_units + prefetch_count + 1`` units are alive. A unit's tensors are views into its own
receive buffer, which lives exactly as long as any of them (then it may go back to the buffer pool).

The cache makes one fetch per miss and never retries: the source it fetches from does (one retry
policy, in ``retry.RetryingSource``), so a failure here is already final. That holds for prefetches
too: a prefetch that failed is remembered, and the demand miss for that unit raises its error instead
of fetching again (which would spend a second full set of attempts).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from ..exceptions import CacheError
from .buffers import BufferPool
from .policy import CachePolicy
from .base import FetchedUnit

log = logging.getLogger(__name__)

Fetcher = Callable[[str], Awaitable[FetchedUnit]]


@dataclass
class CacheStats:
    hits: int = 0  # served from the cache (kept since an earlier use)
    misses: int = 0  # not in the cache: served by a prefetch or a fetch
    prefetch_hits: int = 0  # misses whose prefetch had already arrived (no stall)
    joined_inflight: int = 0  # misses that waited for a running prefetch instead of fetching again
    evictions: int = 0
    fetches: int = 0
    bytes_fetched: int = 0
    fetch_seconds: float = 0.0
    stall_seconds: float = 0.0
    prefetches_wasted: int = 0
    events: list = field(default_factory=list)  # (t, kind, unit) when tracing

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class UnitCache:
    """Bounded unit cache with an eviction policy and a prefetch window.

    Args:
        fetch: coroutine fetching+verifying one unit by name.
        policy: eviction/prediction policy (see :mod:`.policy`).
        sizes: byte size of every streamed unit (for the byte bound and stats).
        max_units: streamed units kept between uses (``cache_size``).
        max_bytes: optional byte bound for kept units.
        prefetch_count: units fetched ahead of the one computing.
    """

    def __init__(self, fetch: Fetcher, policy: CachePolicy, sizes: dict[str, int], *, max_units: int = 3,
                 max_bytes: int | None = None, prefetch_count: int = 1, trace: bool = False,
                 pool: BufferPool | None = None) -> None:
        if max_units < 0:
            raise CacheError(f"cache_size must be >= 0, got {max_units}")
        self._fetch = fetch
        self.policy = policy
        self.sizes = sizes
        self.max_units = max_units
        self.max_bytes = max_bytes
        self.prefetch_count = prefetch_count
        self.trace = trace
        self.stats = CacheStats()
        self.active: dict[str, tuple[FetchedUnit, int]] = {}
        self.cached: OrderedDict[str, FetchedUnit] = OrderedDict()
        self.prefetched: dict[str, FetchedUnit] = {}
        self.inflight: dict[str, asyncio.Task[FetchedUnit]] = {}
        self._prefetch_tasks: set[str] = set()
        #: prefetches that failed for good (the source already retried): the demand miss raises it
        self.failed: dict[str, BaseException] = {}
        self.peak_live = 0
        self.pool = pool
        #: kept units whose users hold them between uses (:meth:`pin_kept`): counted here, never evicted
        self.pinned: frozenset[str] = frozenset()

    def _drop(self, unit: FetchedUnit) -> None:
        """``unit`` left the cache for good: offer its buffer for reuse (refused while any view lives)."""
        if self.pool is not None:
            # Idle buffers may fill the unit slots no live unit uses: the set of buffers stays fixed.
            free_slots = self.max_units + self.prefetch_count + 1 - self.live_units
            self.pool.slack_bytes = max(0, free_slots) * max(self.sizes.values(), default=0)
        unit.recycle(self.pool)

    # ------------------------------------------------------------------------------------- helpers
    def _event(self, kind: str, unit: str) -> None:
        if self.trace:
            self.stats.events.append((time.perf_counter(), kind, unit))

    @property
    def live_units(self) -> int:
        return len(self.active) + len(self.cached) + len(self.prefetched) + len(self.inflight)

    @property
    def cached_bytes(self) -> int:
        return sum(u.nbytes for u in self.cached.values())

    @property
    def live_bytes(self) -> int:
        held = [u for u, _ in self.active.values()] + list(self.cached.values()) + list(self.prefetched.values())
        return sum(u.nbytes for u in held) + sum(self.sizes.get(n, 0) for n in self.inflight)

    def _note_live(self) -> None:
        self.peak_live = max(self.peak_live, self.live_units)

    async def _fetch_once(self, name: str) -> FetchedUnit:
        t0 = time.perf_counter()
        self._event("fetch_start", name)
        unit = await self._fetch(name)
        self._event("fetch_end", name)
        self.stats.fetches += 1
        self.stats.bytes_fetched += unit.nbytes
        self.stats.fetch_seconds += time.perf_counter() - t0
        return unit

    def _start_fetch(self, name: str, prefetch: bool) -> asyncio.Task[FetchedUnit]:
        task = asyncio.get_running_loop().create_task(self._fetch_once(name), name=f"fetch:{name}")
        self.inflight[name] = task
        if prefetch:
            self._prefetch_tasks.add(name)
            task.add_done_callback(lambda t, n=name: self._prefetch_done(n, t))
        self._note_live()
        return task

    def _prefetch_done(self, name: str, task: asyncio.Task[FetchedUnit]) -> None:
        if self.inflight.get(name) is not task:
            return
        del self.inflight[name]
        unclaimed = name in self._prefetch_tasks  # no demand miss joined it (one that did gets the error)
        self._prefetch_tasks.discard(name)
        if task.cancelled():
            return
        if task.exception() is not None:
            if unclaimed:
                self.failed[name] = task.exception()  # final: the coming demand miss reports it
            return
        self.prefetched[name] = task.result()

    # --------------------------------------------------------------------------------------- API
    async def acquire(self, name: str, *, prefetch: bool = True, observe: bool = True) -> FetchedUnit:
        """Return the unit ``name`` for computing (fetching it if needed) and prefetch the next ones.

        ``observe=False``: a data-dependent use (an embedding shard holding this step's tokens) that is not
        part of the execution order the policy learns and prefetches along.
        """
        if observe:
            self.policy.observe(name)
        self._event("acquire", name)
        if name in self.active:
            unit, refs = self.active[name]
            self.active[name] = (unit, refs + 1)
            self.stats.hits += 1
            return unit
        unit = self.cached.pop(name, None)
        if unit is not None:
            self.stats.hits += 1
        elif name in self.prefetched:
            unit = self.prefetched.pop(name)
            self.stats.misses += 1
            self.stats.prefetch_hits += 1
        else:
            self.stats.misses += 1
            failure = self.failed.pop(name, None)
            if failure is not None:
                raise failure
            task = self.inflight.get(name)
            if task is not None:
                self.stats.joined_inflight += 1
                self._prefetch_tasks.discard(name)
            else:
                task = self._start_fetch(name, prefetch=False)
            t0 = time.perf_counter()
            try:
                unit = await asyncio.shield(task)
            finally:
                self.stats.stall_seconds += time.perf_counter() - t0
                if self.inflight.get(name) is task and task.done():
                    del self.inflight[name]
            if name in self.prefetched:  # the prefetch callback ran first
                unit = self.prefetched.pop(name)
        self.active[name] = (unit, 1)
        self._note_live()
        if prefetch and self.prefetch_count > 0:
            self.schedule_prefetch(name)
        return unit

    def can_pin(self, count: int) -> bool:
        """Whether :meth:`pin_kept` may ever pin among ``count`` units: bounded by units only, and either keeping all
        of them or under a policy whose kept set settles (:attr:`~.policy.CachePolicy.settles`). Reads two bounds
        and the policy: callers on another thread may ask it without a trip to the loop."""
        return self.max_bytes is None and self.max_units > 0 and (self.max_units >= count or self.policy.settles)

    def pin_kept(self, names: list[str]) -> dict[str, FetchedUnit]:
        """The kept units among ``names`` for their users to hold between uses, until :meth:`unpin` (they stay
        counted here and are never evicted; the caller stops acquiring them): every one of ``names`` once all have
        arrived and the bounds keep them all; else (:meth:`can_pin`) the ones a full cache keeps; else none."""
        if not self.can_pin(len(names)):
            return {}
        full = all(n in self.cached for n in names) if self.max_units >= len(names) else len(self.cached) >= self.max_units
        self.pinned = frozenset(n for n in names if n in self.cached) if full else frozenset()
        return {n: self.cached[n] for n in self.pinned}

    def unpin(self) -> None:
        """The pinned units are the cache's again (their users acquire them per use from now on)."""
        self.pinned = frozenset()

    def peek(self, name: str) -> FetchedUnit | None:
        """The unit ``name`` if it has arrived (prefetched or kept), without fetching or counting anything."""
        return self.prefetched.get(name) or self.cached.get(name)

    def release(self, name: str) -> None:
        """``name`` finished computing: keep it in the cache or drop it."""
        self._event("release", name)
        unit, refs = self.active[name]
        if refs > 1:
            self.active[name] = (unit, refs - 1)
            return
        del self.active[name]
        self._keep(name, unit, current=name)

    def _keep(self, name: str, unit: FetchedUnit, current: str | None) -> None:
        """Put ``unit`` in the cache, then evict down to the bounds (possibly ``unit`` itself)."""
        if self.max_units > 0:
            self.cached[name] = unit
            self._evict(current=current)
        else:
            self._drop(unit)

    def _evict(self, current: str | None) -> None:
        def over() -> bool:
            return len(self.cached) > self.max_units or (
                self.max_bytes is not None and self.cached_bytes > self.max_bytes and len(self.cached) > 0)

        while self.cached and over():
            free = [n for n in self.cached if n not in self.pinned]
            if not free:  # (pins are undone before the bounds shrink: cannot happen)
                break
            victim = self.policy.victim(free, current)
            self._drop(self.cached.pop(victim))
            self.stats.evictions += 1
            self._event("evict", victim)

    def schedule_prefetch(self, current: str, count: int | None = None, *, beyond_kept: bool = True) -> list[str]:
        """Start fetching the next ``count`` units predicted after ``current`` that the cache does not keep.

        ``beyond_kept``: units it keeps are skipped (they do not use up the window), so a streamed unit is
        fetched while the kept ones before it compute (with 19 of 22 layers kept and one unit of prefetch, the
        next streamed layer is fetched right after the last one was used, not one layer before its own use);
        ``False``: the window is the next ``count`` units, kept or not (``prefetch_next_layers``)."""
        count = self.prefetch_count if count is None else count
        window: list[str] = []
        for name in self.policy.predict(current, len(self.policy.order) if beyond_kept else count):
            if len(window) >= count:
                break
            if not beyond_kept or (name not in self.cached and name not in self.active):
                window.append(name)
        # Drop prefetches that fell out of the window (mispredicted), so memory stays bounded.
        for stale in [n for n in self.prefetched if n not in window]:
            self._drop(self.prefetched.pop(stale))
            self.stats.prefetches_wasted += 1
        for stale in [n for n in self.failed if n not in window]:
            del self.failed[stale]  # not needed next after all: a later miss fetches it afresh
        for stale in [n for n in self._prefetch_tasks if n not in window]:
            self._prefetch_tasks.discard(stale)
            task = self.inflight.pop(stale, None)
            if task is not None:
                task.cancel()
                self.stats.prefetches_wasted += 1
        started = []
        for name in window:
            if any(name in held for held in (self.active, self.cached, self.prefetched, self.inflight, self.failed)):
                continue
            self._start_fetch(name, prefetch=True)
            self._event("prefetch", name)
            started.append(name)
        return started

    def fetch_ahead(self, names: list[str]) -> list[str]:
        """Start fetching ``names`` (a prediction made outside the policy's order, e.g. a router's) unless
        held or in flight; they wait in ``prefetched`` for their use or for :meth:`settle`. Returns the started."""
        started = []
        for name in names:
            if any(name in held for held in (self.active, self.cached, self.prefetched, self.inflight)):
                continue
            self.failed.pop(name, None)
            self._start_fetch(name, prefetch=True)
            self._event("prefetch", name)
            started.append(name)
        return started

    def settle(self, names: list[str]) -> None:
        """Predicted units among ``names`` that arrived unused join the cache (which evicts by its policy);
        those still in flight are cancelled. Keeps what :meth:`fetch_ahead` started bounded."""
        for name in names:
            if name in self.prefetched:
                self.stats.prefetches_wasted += 1
                self._keep(name, self.prefetched.pop(name), current=None)
            elif name in self._prefetch_tasks:
                self._prefetch_tasks.discard(name)
                task = self.inflight.pop(name, None)
                if task is not None:
                    task.cancel()
                    self.stats.prefetches_wasted += 1

    async def warm(self, names: list[str]) -> None:
        """Fetch ``names`` into the cache now (up to its capacity; later names win)."""
        for name in names:
            if name in self.cached or name in self.active:
                continue
            unit = self.prefetched.pop(name, None)
            if unit is None:
                task = self.inflight.get(name) or self._start_fetch(name, prefetch=False)
                unit = await asyncio.shield(task)
                self.inflight.pop(name, None)
                self._prefetch_tasks.discard(name)
            # No unit is computing: the policy evicts the oldest entries, so later names win.
            self._keep(name, unit, current=None)

    def resize(self, max_units: int, max_bytes: int | None = None) -> None:
        if max_units < 0:
            raise CacheError(f"cache_size must be >= 0, got {max_units}")
        self.max_units = max_units
        self.max_bytes = max_bytes
        self._evict(current=self.policy.last)

    async def clear(self) -> None:
        for task in self.inflight.values():
            task.cancel()
        await asyncio.gather(*self.inflight.values(), return_exceptions=True)
        self.inflight.clear()
        self._prefetch_tasks.clear()
        self.failed.clear()
        while self.cached:
            self._drop(self.cached.popitem()[1])
        while self.prefetched:
            self._drop(self.prefetched.popitem()[1])

    def info(self) -> dict:
        s = self.stats
        return {
            "hits": s.hits,
            "misses": s.misses,
            "hit_rate": s.hit_rate,
            "evictions": s.evictions,
            "prefetch_hits": s.prefetch_hits,
            "joined_inflight": s.joined_inflight,
            "prefetches_wasted": s.prefetches_wasted,
            "fetches": s.fetches,
            "bytes_fetched": s.bytes_fetched,
            "fetch_seconds": s.fetch_seconds,
            "stall_seconds": s.stall_seconds,
            "cached_components": list(self.cached),
            "prefetched_components": list(self.prefetched),
            "inflight_components": list(self.inflight),
            "cache_size": len(self.cached),
            "max_cache_size": self.max_units,
            "max_cache_bytes": self.max_bytes,
            "memory_usage_mb": self.live_bytes / (1 << 20),
            "cached_mb": self.cached_bytes / (1 << 20),
            "peak_live_units": self.peak_live,
            "buffers_reused": self.pool.reused if self.pool else 0,
            "policy": self.policy.name,
        }
