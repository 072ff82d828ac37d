"""Prometheus metrics of one :class:`WeightServer` (a per-server registry, never the global one)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST


class ServerMetrics:
    """Counters and gauges exported at ``/metrics``.

    ``storage_reads`` / ``storage_read_bytes`` are labelled by model and blob (unit or file path), so
    the number of storage GETs behind each unit can be summed from a scrape.
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
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

    def render(self) -> bytes:
        return generate_latest(self.registry)
