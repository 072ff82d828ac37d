"""Case ``cold_start``: time to first token, streaming vs downloading the whole model then loading it, on
loopback and on bandwidth-limited links (``surfing serve --max-rate 10Gbit`` / ``1Gbit``)."""

from __future__ import annotations

from typing import Any

from .common import MiB, run_child, summarize, weight_server_process

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
                     f"({ctx.gen_tokens})."),
        "metrics": metrics,
        "ratios": ratios,
        "links": ["loopback", *links],
    }
