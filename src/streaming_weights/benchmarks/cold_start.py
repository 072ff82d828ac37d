"""Case ``cold_start``: time to first token, streaming vs downloading the whole model then loading it, on
loopback and on bandwidth-limited links (``surfing serve --max-rate 10Gbit`` / ``1Gbit``); and from a fresh
Hugging Face checkpoint folder to the first token: chunk-then-serve vs serve-as-is (issue 27)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from .common import MiB, run_child, summarize, weight_server, weight_server_process

FULL_LINKS = ("10Gbit", "1Gbit")
QUICK_LINKS = ("1Gbit",)


def _link_runs(ctx: Any, rate: str, n: int) -> dict[str, list[dict[str, Any]]]:
    """``n`` interleaved rounds of (streaming, download-then-load) against a server paced to ``rate``."""
    runs: dict[str, list[dict[str, Any]]] = {"stream": [], "download": []}
    server_mb = ctx.manifest.total_bytes / MiB * 1.2 + 64
    with weight_server_process(ctx.chunks_dir, server_mb, "--max-rate", rate, cpus=ctx.server_cpus) as uri:
        if ctx.quick:
            ctx.say(f"cold start over {rate}: stream + download in one process (--quick)")
            r = run_child("multi", {"runs": [[k, ctx._child_args(k) | {"uri": uri}] for k in runs], "threads": 1},
                          timeout=600, cpus=ctx.client_cpus)
            if "error" in r:
                raise RuntimeError(f"{rate}: {r['error']}")
            return {k: [res] for k, res in zip(runs, r["results"])}
        for i in range(n):
            for kind in runs:
                ctx.say(f"cold start over {rate}: {kind} ({i + 1}/{n})")
                r = ctx.sandboxed(kind, ctx._child_args(kind) | {"uri": uri}, cap=None, evict_paths=[ctx.chunks_dir])
                if "error" in r:
                    raise RuntimeError(f"{rate} {kind}: {r['error']}")
                runs[kind].append(r)
    return runs


def _figures(label: str, stream: list[dict], dl: list[dict], metrics: dict, ratios: dict) -> None:
    n = min(len(stream), len(dl))
    metrics[f"{label}_streaming_time_to_first_token_s"] = summarize([r["ttft"] for r in stream], "s")
    metrics[f"{label}_download_then_load_time_to_first_token_s"] = summarize([r["ttft"] for r in dl], "s")
    metrics[f"{label}_download_phase_s"] = summarize([r["download_s"] for r in dl], "s")
    metrics[f"{label}_streaming_MiB_per_token"] = summarize([r["bytes_fetched_per_token"] / MiB for r in stream],
                                                            "MiB/token")
    ratios[f"{label}_download_ttft_over_streaming_ttft"] = summarize(
        [b["ttft"] / a["ttft"] for a, b in zip(stream[:n], dl[:n])], "x")


def _first_token(ctx: Any, served: Path, name: str, *extra: str) -> dict[str, float]:
    """Start a weight server over ``served`` (timed until it listens: a checkpoint folder is indexed first), then a
    fresh streaming client until its first new token."""
    cache_mb = ctx.manifest.total_bytes / MiB * 1.2 + 64
    t0 = time.perf_counter()
    with weight_server(served, cache_mb, *extra, cpus=ctx.server_cpus) as (uri, _):
        start = time.perf_counter() - t0
        r = run_child("stream", ctx._child_args("stream") | {"uri": uri, "name": name}, timeout=600,
                      cpus=ctx.client_cpus)
    if "error" in r:
        raise RuntimeError(f"first token from {served}: {r['error']}")
    return {"server_start_s": start, "ttft": r["ttft"]}


def _as_is(ctx: Any, metrics: dict[str, Any], ratios: dict[str, Any]) -> None:
    """A fresh checkpoint folder (the model exported as ``save_pretrained`` would) to the first token: chunk it,
    serve the chunks, stream; or serve the folder as it is (first start: every unit hashed once into a fresh
    index; second start: the index reused), stream."""
    folder = ctx.tmp / "as-is" / ctx.manifest.name
    folder.mkdir(parents=True, exist_ok=True)
    for f in Path(ctx.hf_dir).iterdir():  # hard links: the same files, no second copy
        if f.is_file() and not (folder / f.name).exists():
            os.link(f, folder / f.name)
    t0 = time.perf_counter()
    r = run_child("chunk", {"source": str(folder), "out": str(ctx.tmp / "as-is-chunks")}, timeout=1200,
                  cpus=ctx.client_cpus)
    if "error" in r:
        raise RuntimeError(f"chunking {folder}: {r['error']}")
    chunk_s = time.perf_counter() - t0
    chunked = _first_token(ctx, ctx.tmp / "as-is-chunks", "bench-chunk")  # the name child_chunk gives it
    index = ctx.tmp / f"as-is-index-{time.time_ns()}"
    cold = _first_token(ctx, folder.parent, ctx.manifest.name, "--index-dir", str(index))
    warm = _first_token(ctx, folder.parent, ctx.manifest.name, "--index-dir", str(index))
    totals = {"chunk_then_serve": chunk_s + chunked["server_start_s"] + chunked["ttft"],
              "serve_as_is_first_start": cold["server_start_s"] + cold["ttft"],
              "serve_as_is_indexed": warm["server_start_s"] + warm["ttft"]}
    metrics["checkpoint_chunk_s"] = summarize([chunk_s], "s")
    for label, r in (("chunked", chunked), ("as_is_first_start", cold), ("as_is_indexed", warm)):
        metrics[f"checkpoint_{label}_server_start_s"] = summarize([r["server_start_s"]], "s")
    for label, total in totals.items():
        metrics[f"checkpoint_to_first_token_{label}_s"] = summarize([total], "s")
    ratios["checkpoint_chunk_then_serve_over_serve_as_is_first_start"] = summarize(
        [totals["chunk_then_serve"] / totals["serve_as_is_first_start"]], "x")
    ratios["checkpoint_chunk_then_serve_over_serve_as_is_indexed"] = summarize(
        [totals["chunk_then_serve"] / totals["serve_as_is_indexed"]], "x")


def run(ctx: Any) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    ratios: dict[str, Any] = {}
    stream, dl = ctx.child_runs("stream"), ctx.child_runs("download")
    _figures("loopback", stream, dl, metrics, ratios)
    links = QUICK_LINKS if ctx.quick else FULL_LINKS
    n = 1  # minutes per fresh process on this box: one paired round per limited link
    for rate in links:
        runs = _link_runs(ctx, rate, n)
        _figures(rate, runs["stream"], runs["download"], metrics, ratios)
    ctx.say("cold start from a fresh checkpoint folder: chunk-then-serve vs serve-as-is")
    _as_is(ctx, metrics, ratios)
    return {
        "title": "Cold start: time to first token, streaming vs download-then-load, loopback and limited links",
        "measured": (f"{ctx.model_label}, fresh process each, pinned to the client core with one thread, "
                     f"uncapped (download-then-load holds the whole model twice); clock starts after imports. "
                     f"streaming = StreamingLlamaModel (cache {ctx.stream_cache}, prefetch {ctx.stream_prefetch}) "
                     "from the weight server, then generate until the first new token. download = fetch every "
                     "unit of the same model from the same server (WebSocketSource, verified), write it as one "
                     "safetensors file + config, transformers from_pretrained, generate until the first new "
                     f"token. Links: loopback (n = {len(stream)}), then a server paced by `surfing serve "
                     f"--max-rate` at {', '.join(links)} (n = {n} interleaved rounds each; the server pinned to "
                     "its own core). MiB/token = bytes the streaming client fetched / generated tokens "
                     f"({ctx.gen_tokens}). checkpoint_*: from the model exported as a transformers folder (one "
                     "safetensors file + config) to the first token over loopback, n = 1: `surfing chunk` (fresh "
                     "process) + `surfing serve` on the chunks until it listens + a fresh streaming client's first "
                     "token, vs `surfing serve` on the folder as it is (first start: every unit hashed once into a "
                     "fresh --index-dir; then a second start reusing that index) + the same client."),
        "metrics": metrics,
        "ratios": ratios,
        "links": ["loopback", *links],
    }
