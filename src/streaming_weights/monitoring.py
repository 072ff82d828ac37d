"""Counters and timers for streaming inference, and their Prometheus export.

A :class:`StreamingMonitor` passed as ``monitor=`` to a streaming model collects every inference's
timings and the cache counters across calls; ``get_metrics()`` summarizes them.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass
class Totals:
    """Counters over inferences: one inference's (:class:`InferenceRecord`), a model's or a monitor's.

    The one stats object: a model's ``get_inference_stats()`` and a monitor's ``get_metrics()`` are both
    :meth:`as_stats` of a :class:`Totals`. ``compute + stall == seconds`` by construction.
    """

    inferences: int = 0
    seconds: float = 0.0
    tokens: int = 0
    fetch_seconds: float = 0.0
    stall_seconds: float = 0.0
    bytes_fetched: int = 0
    hits: int = 0
    misses: int = 0

    def add(self, other: Totals) -> None:
        for f in fields(Totals):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_stats(self) -> dict[str, Any]:
        """The documented keys (``total_inferences``, ``total_time``, ``cache_hit_rate``, …)."""
        n, total, looked = self.inferences, self.seconds, self.hits + self.misses
        return {
            "total_inferences": n,
            "total_time": total,
            "avg_inference_time": total / n if n else 0.0,
            "cache_hits": self.hits,
            "cache_misses": self.misses,
            "cache_hit_rate": self.hits / looked if looked else 0.0,
            "bytes_fetched": self.bytes_fetched,
            "fetch_seconds": self.fetch_seconds,
            "stall_seconds": self.stall_seconds,
            "compute_seconds": max(0.0, total - self.stall_seconds),
            "generated_tokens": self.tokens,
            "tokens_per_second": self.tokens / total if total and self.tokens else 0.0,
        }


@dataclass
class InferenceRecord(Totals):
    """One inference (``inferences == 1``) and its kind: ``"forward"`` or ``"generate"``."""

    kind: str = "forward"
    inferences: int = 1


@dataclass
class StreamingMonitor:
    """Collects inference records from one or more streaming models."""

    records: list[InferenceRecord] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, rec: InferenceRecord) -> None:
        with self._lock:
            self.records.append(rec)

    def get_metrics(self) -> dict[str, Any]:
        with self._lock:
            recs = list(self.records)
        total = Totals()
        for r in recs:
            total.add(r)
        return {**total.as_stats(), "uptime_seconds": time.time() - self.started}

    def reset(self) -> None:
        with self._lock:
            self.records.clear()

    def prometheus_registry(self):
        """A prometheus_client registry exposing :meth:`get_metrics` as gauges (needs ``[server]`` extra)."""
        from prometheus_client import CollectorRegistry
        from prometheus_client.core import GaugeMetricFamily

        monitor = self

        class _Collector:
            def collect(self):
                for key, value in monitor.get_metrics().items():
                    yield GaugeMetricFamily(f"surfing_client_{key}", f"streaming client {key}", value=float(value))

        registry = CollectorRegistry()
        registry.register(_Collector())
        return registry
