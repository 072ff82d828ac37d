"""Counted inference scopes: what one model spent, in the one stats object (:class:`~..monitoring.Totals`).

An inference is the outermost of nested scopes (``generate`` calling forward, a ``*ForCausalLM`` calling its
base model): it adds its wall time, its tokens and the cache counters that moved while it ran (fetch and
stall seconds, bytes, hits, misses) to the model's totals, and a record to the monitor if there is one.
Scopes are serialized: one inference at a time per model.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, fields
from typing import Any, Callable

from ..monitoring import InferenceRecord, Totals


@dataclass
class _Frame:
    kind: str
    t0: float
    before: Totals | None
    tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class Accounting:
    """One model's counted scopes.

    Args:
        read: the caches' lifetime counters as :class:`Totals` (``None`` when they cannot be read: not bound
            yet, or the I/O loop is gone).
        monitor: a :class:`~..monitoring.StreamingMonitor` receiving one record per inference, or ``None``.
    """

    def __init__(self, read: Callable[[], Totals | None], monitor: Any = None) -> None:
        self._read = read
        self.monitor = monitor
        self.totals = Totals()
        self.lock = threading.RLock()  # one inference at a time; re-entrant for nested scopes
        self._frames: list[_Frame] = []

    @property
    def depth(self) -> int:
        """Open scopes (1 inside the outermost only)."""
        return len(self._frames)

    def enter(self, kind: str) -> None:
        """Open a counted inference scope (nested scopes belong to the outermost one). Never raises:
        it runs as a forward pre-hook, and the matching :meth:`exit` runs even when the forward fails."""
        self.lock.acquire()
        outermost = not self._frames
        self._frames.append(_Frame(kind, time.perf_counter(), self._read() if outermost else None))

    def exit(self, tokens: int = 0) -> None:
        """Close the innermost scope; closing the outermost one adds its time, stall and tokens."""
        try:
            frame = self._frames.pop()
            if self._frames:
                self._frames[0].tokens += tokens
                return
            self._account(frame, time.perf_counter() - frame.t0, tokens + frame.tokens)
        finally:
            self.lock.release()

    def _account(self, frame: _Frame, seconds: float, tokens: int) -> None:
        after = self._read()
        moved = Totals()
        if frame.before is not None and after is not None:
            for f in fields(Totals):
                setattr(moved, f.name, getattr(after, f.name) - getattr(frame.before, f.name))
        # Stall is time this scope waited inside it, so it never exceeds the scope's time.
        record = InferenceRecord(kind=frame.kind, seconds=seconds, tokens=tokens, fetch_seconds=moved.fetch_seconds,
                                 stall_seconds=min(moved.stall_seconds, seconds), bytes_fetched=moved.bytes_fetched,
                                 hits=moved.hits, misses=moved.misses)
        self.totals.add(record)
        if self.monitor is not None:
            self.monitor.record(record)

    def stats(self, lifetime: Totals) -> dict[str, Any]:
        """``get_inference_stats()``: the scopes' totals, with the cache hit rate and bytes over the model's whole
        life (warm-ups and prefetches outside any inference included)."""
        out = self.totals.as_stats()
        out.update(cache_hits=lifetime.hits, cache_misses=lifetime.misses, bytes_fetched=lifetime.bytes_fetched,
                   cache_hit_rate=Totals(hits=lifetime.hits, misses=lifetime.misses).as_stats()["cache_hit_rate"])
        return out


__all__ = ["Accounting"]
