"""Unit cache eviction policies.

A forward pass visits units in a known cyclic order. Plain LRU with fewer slots than layers evicts
each unit just before it is needed again and hits ~0% on the second pass. The default policy,
:class:`ExecutionOrderPolicy`, learns the order in which units are actually used (``next[u]`` = the unit
used after ``u`` last time; initially the manifest order, cyclic) and evicts the cached unit whose next
use is farthest away (Belady's rule on the predicted sequence). With T5 ``generate`` it learns that the
decoder loops over its own blocks and drops encoder blocks first.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Iterable

from ..exceptions import ConfigurationError


class CachePolicy:
    """Decides which unit to evict and which units come next (for prefetching)."""

    name = "base"
    #: whether what a full cache keeps stays kept while the order repeats (``UnitCache.pin_kept`` may then hand
    #: the kept units to their users for good)
    settles = False

    def __init__(self, order: list[str]) -> None:
        self.order = list(order)
        n = len(self.order)
        self.next: dict[str, str] = {u: self.order[(i + 1) % n] for i, u in enumerate(self.order)}
        self.last: str | None = None

    def observe(self, unit: str) -> None:
        """``unit`` is about to be used."""
        if self.last is not None and self.last != unit:
            self.next[self.last] = unit
        self.last = unit

    def predict(self, unit: str, k: int) -> list[str]:
        """The ``k`` units expected after ``unit``, in order (no repeats)."""
        out: list[str] = []
        cur = unit
        for _ in range(len(self.order)):
            if len(out) >= k:
                break
            cur = self.next.get(cur, cur)
            if cur == unit or cur in out:
                break
            out.append(cur)
        return out

    def distance(self, start: str, target: str) -> float:
        """Steps from ``start`` until ``target`` is used again along the predicted sequence (inf: never)."""
        cur = start
        for step in range(1, len(self.order) + 1):
            cur = self.next.get(cur, cur)
            if cur == target:
                return step
        return math.inf

    def victim(self, cached: Iterable[str], current: str | None) -> str:
        raise NotImplementedError


class ExecutionOrderPolicy(CachePolicy):
    """Evict the unit whose next use (along the learned execution order) is farthest away.

    Along a repeating order that is the unit just used: a full cache keeps the same units pass after pass
    (:attr:`settles`)."""

    name = "order"
    settles = True

    def victim(self, cached: Iterable[str], current: str | None) -> str:
        cands = list(cached)
        if current is None:
            return cands[0]
        return max(cands, key=lambda u: self.distance(current, u))


class LRUPolicy(CachePolicy):
    """Evict the least recently used unit (the original project's policy)."""

    name = "lru"

    def __init__(self, order: list[str]) -> None:
        super().__init__(order)
        self.recency: OrderedDict[str, None] = OrderedDict()

    def observe(self, unit: str) -> None:
        super().observe(unit)
        self.recency[unit] = None
        self.recency.move_to_end(unit)

    def victim(self, cached: Iterable[str], current: str | None) -> str:
        cands = list(cached)
        unused = [u for u in cands if u not in self.recency]  # never used: older than anything used
        if unused:
            return unused[0]
        rank = {u: i for i, u in enumerate(self.recency)}
        return min(cands, key=rank.__getitem__)


class PopularityPolicy(CachePolicy):
    """Evict the least popular unit: use frequency with exponential aging (half-life ``half_life`` uses).

    For units used by data-dependent choice rather than in an order — a mixture-of-experts layer's experts,
    whose popularity is skewed and drifts with the text — so nothing is predicted or prefetched along.
    """

    name = "popularity"

    def __init__(self, order: list[str], half_life: int = 1024) -> None:
        super().__init__(order)
        self.half_life = half_life
        self.clock = 0
        self.score: dict[str, tuple[float, int]] = {}  # unit -> (score, clock when last updated)

    def observe(self, unit: str) -> None:
        self.clock += 1
        self.last = unit
        self.score[unit] = (self.popularity(unit) + 1.0, self.clock)

    def popularity(self, unit: str) -> float:
        value, when = self.score.get(unit, (0.0, self.clock))
        return value * 0.5 ** ((self.clock - when) / self.half_life)

    def predict(self, unit: str, k: int) -> list[str]:
        return []

    def victim(self, cached: Iterable[str], current: str | None) -> str:
        return min(cached, key=self.popularity)


POLICIES: dict[str, type[CachePolicy]] = {"order": ExecutionOrderPolicy, "lru": LRUPolicy,
                                          "popularity": PopularityPolicy}


def make_policy(name: str | CachePolicy, order: list[str]) -> CachePolicy:
    if isinstance(name, CachePolicy):
        return name
    try:
        return POLICIES[str(name).lower()](order)
    except KeyError:
        raise ConfigurationError(f"cache_policy must be one of {sorted(POLICIES)}, got {name!r}") from None
