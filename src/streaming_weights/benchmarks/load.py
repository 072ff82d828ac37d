"""Load test: many concurrent streaming clients generating from one weight-server process on loopback.

``run_load(chunks_dir, reference)`` starts ``python -m streaming_weights.weight_server`` over
``chunks_dir``, then ``processes`` worker processes that each open ``connections // processes``
:class:`StreamingLlamaModel` clients (one persistent WebSocket connection each, on their own threads) and
loop greedy ``generate`` for ``duration`` seconds with a cache smaller than the model, so every token
re-streams units. Every output is compared with ``reference`` (token ids from transformers on the
original checkpoint). Returns requests/s, p50/p99 unit latency, errors, mismatches and the server's
RSS (idle and peak, sampled every 0.25 s).

The machine this was written for has 2 cores: use few processes (torch per process is heavy) and many
connections per process. Run standalone::

    python -m streaming_weights.benchmarks.load CHUNKS_DIR SOURCE_DIR [--seconds 60] [--connections 32] [--processes 4]
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

from .common import weight_server

PROMPTS = [[5, 17, 33, 2, 9, 41, 7], [3, 8, 12, 19], [44, 45, 46], [100, 7, 200, 9, 11]]
NEW_TOKENS = 6


@dataclass
class LoadResult:
    seconds: float
    connections: int
    processes: int
    generations: int = 0
    requests: int = 0  # unit fetches over the wire
    errors: list[str] = field(default_factory=list)
    mismatches: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    requests_per_s: float = 0.0
    server_idle_rss_mb: float = 0.0
    server_peak_rss_mb: float = 0.0
    server_cache_mb: float = 0.0

    def summary(self) -> str:
        return (f"{self.connections} connections / {self.processes} processes, {self.seconds:.0f} s: "
                f"{self.generations} generations, {self.requests} unit requests ({self.requests_per_s:.0f} req/s), "
                f"unit latency p50 {self.p50_ms:.1f} ms p99 {self.p99_ms:.1f} ms, errors {len(self.errors)}, "
                f"mismatches {self.mismatches}, server RSS idle {self.server_idle_rss_mb:.0f} MiB "
                f"peak {self.server_peak_rss_mb:.0f} MiB (cache budget {self.server_cache_mb:.0f} MiB)")


def reference_outputs(source_dir: str | os.PathLike[str]) -> list[list[int]]:
    """Greedy continuations of PROMPTS by transformers on the original checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(source_dir), dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for p in PROMPTS:
            out.append(ref.generate(input_ids=torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False)[0].tolist())
    return out


def _worker(uri: str, model: str, n_conn: int, seconds: float, reference: list[list[int]], queue) -> None:
    import torch

    from ..models import StreamingLlamaModel

    torch.set_num_threads(1)
    lat: list[float] = []
    errors: list[str] = []
    stats = {"gens": 0, "mismatch": 0}
    lock = threading.Lock()
    start_gate = threading.Barrier(n_conn)

    def client(idx: int) -> None:
        try:
            m = StreamingLlamaModel(model, uri, cache_size=1, prefetch_count=1, timeout_seconds=30, max_retries=3)
        except Exception as exc:  # noqa: BLE001 - reported
            with lock:
                errors.append(f"connect: {type(exc).__name__}: {exc}")
            start_gate.abort()
            return
        inner = m.source.fetch_unit

        async def timed(manifest, unit):
            t0 = time.perf_counter()
            r = await inner(manifest, unit)
            dt = time.perf_counter() - t0
            with lock:
                lat.append(dt)
            return r

        m.source.fetch_unit = timed  # type: ignore[method-assign]
        try:
            start_gate.wait(120)
        except threading.BrokenBarrierError:
            pass
        deadline = time.monotonic() + seconds
        i = idx
        with m:
            while time.monotonic() < deadline:
                p = PROMPTS[i % len(PROMPTS)]
                i += 1
                try:
                    got = m.generate(input_ids=torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False)
                    ok = got[0].tolist() == reference[PROMPTS.index(p)]
                    with lock:
                        stats["gens"] += 1
                        stats["mismatch"] += not ok
                except Exception as exc:  # noqa: BLE001 - reported
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n_conn)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    queue.put({"lat": lat, "errors": errors, **stats})


def _sample_rss(pid: int, res: LoadResult, stop: threading.Event) -> None:
    """Track the server's peak RSS every 0.25 s until ``stop``."""
    import psutil

    ps = psutil.Process(pid)
    while not stop.is_set():
        try:
            res.server_peak_rss_mb = max(res.server_peak_rss_mb, ps.memory_info().rss / 2**20)
        except psutil.Error:
            return
        stop.wait(0.25)


def _drive(uri: str, model: str | None, reference: list[list[int]], res: LoadResult) -> None:
    """Start the worker processes, collect their reports into ``res``."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    n, p = res.connections, res.processes
    per = [n // p + (i < n % p) for i in range(p)]
    workers = [ctx.Process(target=_worker, args=(uri, model, k, res.seconds, reference, queue)) for k in per if k]
    t0 = time.monotonic()
    for w in workers:
        w.start()
    results = [queue.get(timeout=res.seconds + 300) for _ in workers]
    for w in workers:
        w.join(60)
    wall = time.monotonic() - t0
    lat = sorted(x for r in results for x in r["lat"])
    res.generations = sum(r["gens"] for r in results)
    res.mismatches = sum(r["mismatch"] for r in results)
    res.errors = [e for r in results for e in r["errors"]]
    res.requests = len(lat)
    res.requests_per_s = len(lat) / min(wall, res.seconds) if lat else 0.0
    if lat:
        res.p50_ms = statistics.median(lat) * 1000
        res.p99_ms = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000


def run_load(chunks_dir: str | os.PathLike[str], reference: list[list[int]], *, model: str | None = None,
             seconds: float = 60.0, connections: int = 32, processes: int = 4, cache_mb: float = 64) -> LoadResult:
    """Run the load test against a fresh weight-server process over ``chunks_dir``; see the module docstring."""
    import psutil

    res = LoadResult(seconds, connections, processes, server_cache_mb=cache_mb)
    with weight_server(chunks_dir, cache_mb, "--max-connections", str(connections + 8)) as (uri, server):
        res.server_idle_rss_mb = res.server_peak_rss_mb = psutil.Process(server.pid).memory_info().rss / 2**20
        stop = threading.Event()
        sampler = threading.Thread(target=_sample_rss, args=(server.pid, res, stop), daemon=True)
        sampler.start()
        try:
            _drive(uri, model, reference, res)
        finally:
            stop.set()
            sampler.join(5)
    return res


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("chunks_dir")
    p.add_argument("source_dir", help="the original HF checkpoint (for reference outputs)")
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--processes", type=int, default=4)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    r = run_load(a.chunks_dir, reference_outputs(a.source_dir), seconds=a.seconds, connections=a.connections,
                 processes=a.processes)
    print(json.dumps({**asdict(r), "errors": r.errors[:10]}, indent=1) if a.json else r.summary())
    return 0 if not r.errors and not r.mismatches else 1


if __name__ == "__main__":
    sys.exit(main())
