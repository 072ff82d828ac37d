"""Counters and timers for streaming inference, and their Prometheus export.

A :class:`StreamingMonitor` passed as ``monitor=`` to a streaming model collects every inference's
timings and the cache counters across calls; ``get_metrics()`` summarizes them.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class InferenceRecord:
    seconds: float
    kind: str  # "forward" | "generate"
    tokens: int = 0
    fetch_seconds: float = 0.0
    stall_seconds: float = 0.0
    bytes_fetched: int = 0
    hits: int = 0
    misses: int = 0


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
        n = len(recs)
        hits = sum(r.hits for r in recs)
        misses = sum(r.misses for r in recs)
        total_time = sum(r.seconds for r in recs)
        tokens = sum(r.tokens for r in recs)
        return {
            "total_inferences": n,
            "total_time": total_time,
            "avg_inference_time": total_time / n if n else 0.0,
            "cache_hits": hits,
            "cache_misses": misses,
            "cache_hit_rate": hits / (hits + misses) if hits + misses else 0.0,
            "bytes_fetched": sum(r.bytes_fetched for r in recs),
            "fetch_seconds": sum(r.fetch_seconds for r in recs),
            "stall_seconds": sum(r.stall_seconds for r in recs),
            "compute_seconds": max(0.0, total_time - sum(r.stall_seconds for r in recs)),
            "generated_tokens": tokens,
            "tokens_per_second": tokens / total_time if total_time and tokens else 0.0,
            "uptime_seconds": time.time() - self.started,
        }

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
