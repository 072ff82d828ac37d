"""Prometheus metrics of the API (own registry: several apps in one process never share counters)."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class ApiMetrics:
    """Requests, tokens, batch sizes and weight bytes fetched per generated token."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, queue_depth: Callable[[], float] | None = None,
                 in_flight: Callable[[], float] | None = None) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("surfing_api_requests", "Requests answered, by endpoint and HTTP status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("surfing_api_prompt_tokens", "Prompt tokens of generation requests", registry=r)
        self.generated_tokens = Counter("surfing_api_generated_tokens", "Tokens generated", registry=r)
        self.batches = Histogram("surfing_api_batch_size", "Rows per generate call", buckets=_BATCH_BUCKETS,
                                 registry=r)
        self.batch_seconds = Histogram("surfing_api_batch_seconds", "Wall time of one generate call", registry=r)
        self.bytes_fetched = Counter("surfing_api_weight_bytes_fetched",
                                     "Weight bytes the model fetched while generating", registry=r)
        self.bytes_per_token = Gauge("surfing_api_weight_bytes_per_token",
                                     "Weight bytes fetched per generated token, last batch", registry=r)
        self.cancelled = Counter("surfing_api_cancelled_requests",
                                 "Requests whose client went away before the end", registry=r)
        self.queue = Gauge("surfing_api_queue_depth", "Requests waiting for a batch", registry=r)
        if queue_depth is not None:
            self.queue.set_function(queue_depth)
        self.in_flight = Gauge("surfing_api_requests_in_flight",
                               "Completion, chat and embedding requests being answered", registry=r)
        if in_flight is not None:
            self.in_flight.set_function(in_flight)

    def record_batch(self, rows: int, tokens: int, nbytes: int, seconds: float) -> None:
        """One finished ``generate`` call (called from the worker thread; prometheus_client is thread-safe)."""
        self.batches.observe(rows)
        self.batch_seconds.observe(seconds)
        self.generated_tokens.inc(tokens)
        self.bytes_fetched.inc(max(0, nbytes))
        if tokens:
            self.bytes_per_token.set(nbytes / tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
