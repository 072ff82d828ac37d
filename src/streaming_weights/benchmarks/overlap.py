"""Case ``overlap``: streamed forward with prefetch vs compute only (all cached) vs fetch only; stall per layer."""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

from .common import prompt_ids, summarize
from .sandbox import pinned_here

PREFETCH = 2


def stalls_from_trace(events: list[tuple[float, str, str]]) -> dict[str, float]:
    """Seconds each unit's compute waited for its weights: acquire → compute_start."""
    pending: dict[str, float] = {}
    stall: dict[str, float] = {}
    for t, kind, unit in events:
        if kind == "acquire":
            pending[unit] = t
        elif kind == "compute_start" and unit in pending:
            stall[unit] = stall.get(unit, 0.0) + t - pending.pop(unit)
    return stall


def _fetch_all(src: Any, manifest: Any, names: list[str]):
    """A coroutine fetching ``names`` with as many in flight as the streamed pass keeps (prefetch + 1)."""
    sem = asyncio.Semaphore(PREFETCH + 1)

    async def one(name: str) -> None:
        async with sem:
            unit = await src.fetch_unit(manifest, name)
            del unit

    async def all_units() -> None:
        await asyncio.gather(*(one(n) for n in names))

    return all_units()


def _rounds(ctx: Any, streaming: Any, resident: Any, io: Any, src: Any, repeats: int) -> tuple[dict, list]:
    streamed = [u.name for u in ctx.manifest.streamed]
    ids = prompt_ids(ctx.vocab, ctx.overlap_seq)
    times: dict[str, list[float]] = {"streamed": [], "compute": [], "fetch": []}
    stall_runs: list[dict[str, float]] = []
    manifest = io.run(src.get_manifest(ctx.manifest.name), 60)
    resident.forward(ids)  # fills its cache: afterwards every unit is a hit
    streaming.forward(ids)
    io.run(_fetch_all(src, manifest, streamed), 600)
    for i in range(repeats):
        ctx.say(f"overlap: round {i + 1}/{repeats}")
        streaming.clear_cache()
        n0 = len(streaming.trace_events())
        t = time.perf_counter()
        streaming.forward(ids)
        times["streamed"].append(time.perf_counter() - t)
        stall_runs.append(stalls_from_trace(streaming.trace_events()[n0:]))
        t = time.perf_counter()
        resident.forward(ids)
        times["compute"].append(time.perf_counter() - t)
        t = time.perf_counter()
        io.run(_fetch_all(src, manifest, streamed), 600)
        times["fetch"].append(time.perf_counter() - t)
    assert resident.get_cache_info()["misses"] == len(streamed), "compute-only model fetched after its warm-up"
    return times, stall_runs


def run(ctx: Any) -> dict[str, Any]:
    import torch

    from ..client.bridge import LoopThread
    from ..client.transport import WebSocketSource
    from ..models import StreamingLlamaModel

    repeats = 1 if ctx.quick else 3
    streamed = [u.name for u in ctx.manifest.streamed]
    with torch.no_grad(), pinned_here(ctx.client_cpus):
        streaming = StreamingLlamaModel(ctx.manifest.name, ctx.uri, 0, prefetch_count=PREFETCH, trace=True)
        resident = StreamingLlamaModel(ctx.manifest.name, ctx.uri, len(streamed), prefetch_count=0)
        io = LoopThread("bench-fetch")
        src = WebSocketSource(ctx.uri, timeout_seconds=300)
        try:
            times, stall_runs = _rounds(ctx, streaming, resident, io, src, repeats)
        finally:
            io.run(src.close(), 10)
            io.close()
            streaming.close()
            resident.close()
    per_round = [s / max(c, f) for s, c, f in zip(times["streamed"], times["compute"], times["fetch"])]
    per_layer = {n: statistics.median([r.get(n, 0.0) for r in stall_runs]) for n in streamed}
    return {
        "title": "Overlap: streamed forward with prefetch vs compute only vs fetch only",
        "measured": (f"{ctx.model_label}: one forward pass over {ctx.overlap_seq} tokens, {repeats} interleaved "
                     f"rounds. streamed = cache_size 0 (every one of the {len(streamed)} layers fetched from the "
                     f"loopback server during the pass), prefetch_count {PREFETCH}. compute only = the same "
                     "streaming model class with every layer already cached (hooks still run, nothing fetched). "
                     f"fetch only = WebSocketSource fetching the same {len(streamed)} units with "
                     f"{PREFETCH + 1} in flight, no compute. Pinned: the client (this process, one compute thread, "
                     f"its I/O thread) on CPU {ctx.client_cpus[0]}, the weight server on CPU "
                     f"{ctx.server_cpus[0]}."),
        "metrics": {
            "streamed_forward_s": summarize(times["streamed"], "s"),
            "compute_only_s": summarize(times["compute"], "s"),
            "fetch_only_s": summarize(times["fetch"], "s"),
            "stall_total_s": summarize([sum(r.values()) for r in stall_runs], "s"),
        },
        "ratios": {"streamed_over_max_compute_fetch": summarize(per_round, "x") | {"goal": "<= 1.15"}},
        "stall_per_layer_s": per_layer,
    }
