"""Load (slow; `make test-slow`): 32 connections from 4 processes stream generation from one server for 60 s."""

from __future__ import annotations

import pytest

from streaming_weights.benchmarks.load import reference_outputs, run_load

SECONDS = 60
CACHE_MB = 64
# Server memory beyond its blob cache: the interpreter + torch (imported by the package) at idle is
# measured as the baseline; under load it adds per connection about one 1 MiB chunk per in-flight request
# plus the 256 KiB write buffer and the inbound queue (tiny requests). 32 connections x a few MiB, plus
# allocator slack, stays well under 128 MiB.
OVERHEAD_MB = 128


@pytest.mark.slow
@pytest.mark.timeout(SECONDS + 420)
def test_32_connections_stream_generation_for_60s(tiny_chunks):
    src, chunks = tiny_chunks("llama", layers=6)
    ref = reference_outputs(src)
    r = run_load(chunks, ref, model="llama", seconds=SECONDS, connections=32, processes=4, cache_mb=CACHE_MB)
    print("\nLOAD:", r.summary())
    assert not r.errors, r.errors[:5]
    assert r.mismatches == 0
    assert r.generations >= 32  # every connection produced output
    assert r.server_peak_rss_mb - r.server_idle_rss_mb < CACHE_MB + OVERHEAD_MB, r.summary()
