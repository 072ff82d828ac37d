"""Prometheus metrics of one :class:`WeightServer` (a per-server registry, never the global one)."""

from __future__ import annotations

from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST


def storage_chain(storage: Any) -> Iterator[Any]:
    """``storage`` and every backend it wraps (followed through ``.inner``), outermost first."""
    seen: set[int] = set()
    while storage is not None and id(storage) not in seen:
        seen.add(id(storage))
        yield storage
        storage = getattr(storage, "inner", None)


class StorageStatsCollector:
    """Exports the ``stats`` counters of a storage backend chain, read at scrape time.

    Any backend with a ``stats`` dict of monotonically increasing integers is exported, e.g.
    ``S3Backend.stats["get_requests"]`` as ``surfing_storage_get_requests_total{backend="S3Backend",
    location="s3://bucket/prefix"}`` and ``RedisCacheBackend.stats["hits"]`` as
    ``surfing_storage_hits_total{backend="RedisCacheBackend",…}``. Backends without ``stats`` add nothing.
    """

    def __init__(self, storage: Any) -> None:
        self.storage = storage

    def describe(self) -> list:
        return []  # the families depend on the backends' stats: no registration-time collection

    def collect(self) -> Iterator[CounterMetricFamily]:
        families: dict[str, CounterMetricFamily] = {}
        for backend in storage_chain(self.storage):
            stats = getattr(backend, "stats", None)
            if not isinstance(stats, dict):
                continue
            labels = [type(backend).__name__, str(getattr(backend, "location", ""))]
            for stat, value in sorted(dict(stats).items()):  # a copy: S3 threads update it concurrently
                if not isinstance(value, (int, float)):
                    continue
                fam = families.get(stat)
                if fam is None:
                    fam = families[stat] = CounterMetricFamily(
                        f"surfing_storage_{stat}", f"Storage backend counter {stat!r}", labels=["backend", "location"])
                fam.add_metric(labels, value)
        yield from families.values()


class ServerMetrics:
    """Counters and gauges exported at ``/metrics``.

    ``storage_reads`` / ``storage_read_bytes`` are labelled by model and blob (unit or file path), so
    the number of storage GETs behind each unit can be summed from a scrape. With ``storage`` given,
    the backend chain's own counters (S3 requests, Redis cache hits…) are exported too
    (:class:`StorageStatsCollector`).
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None, *, storage: Any = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("surfing_server_requests", "Requests answered, by op and status", ["op", "status"], registry=r)
        self.request_seconds = Histogram(
            "surfing_server_request_seconds", "Time from request to last byte sent, by op", ["op"], registry=r,
            buckets=(0.001, 0.005, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.bytes_sent = Counter("surfing_server_bytes_sent", "Blob bytes sent in DATA messages", registry=r)
        self.storage_reads = Counter("surfing_server_storage_reads", "Storage reads (GET / ranged GET)", ["model", "blob"], registry=r)
        self.storage_read_bytes = Counter("surfing_server_storage_read_bytes", "Bytes read from storage", ["model", "blob"], registry=r)
        self.cache_hits = Counter("surfing_server_cache_hits", "Blob requests served from the server cache", registry=r)
        self.cache_misses = Counter("surfing_server_cache_misses", "Cacheable blob requests that read storage", registry=r)
        self.cache_bytes = Gauge("surfing_server_cache_bytes", "Bytes held in the server cache", registry=r)
        self.active_connections = Gauge("surfing_server_active_connections", "Open WebSocket connections", registry=r)
        self.inflight = Gauge("surfing_server_inflight_requests", "Requests being answered", registry=r)
        self.rejected_handshakes = Counter("surfing_server_rejected_handshakes", "Handshakes refused, by reason", ["reason"], registry=r)
        self.protocol_errors = Counter("surfing_server_protocol_errors", "Malformed messages received", registry=r)
        if storage is not None:
            r.register(StorageStatsCollector(storage))

    def render(self) -> bytes:
        return generate_latest(self.registry)
