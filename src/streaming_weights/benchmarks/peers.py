"""Case ``peers``: same model, same weight budget: transformers in memory, accelerate disk offload, AirLLM
(when installed and working), streaming over loopback."""

from __future__ import annotations

import statistics
from typing import Any

from .common import MiB, summarize, unit_bound


def _runs(ctx: Any, notes: list[str]) -> dict[str, list[dict[str, Any]]]:
    runs = {
        "transformers_in_memory": ctx.child_runs("hf_memory"),
        "accelerate_disk_offload": ctx.child_runs("accelerate"),
        "streaming_loopback": ctx.child_runs("stream"),
    }
    notes.append("AirLLM: measured in the capped headline case (generation), not here: minutes per run.")
    return runs


def _ratios(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    med = {name: statistics.median([r["generate_s"] for r in rs]) for name, rs in runs.items()}
    unit = "x (median/median)"
    ratios = {
        "accelerate_generate_s_over_streaming": summarize(
            [med["accelerate_disk_offload"] / med["streaming_loopback"]], unit) | {"goal": ">= 1"},
        "streaming_generate_s_over_in_memory": summarize(
            [med["streaming_loopback"] / med["transformers_in_memory"]], unit),
    }
    if "airllm" in med:
        ratios["airllm_generate_s_over_streaming"] = summarize(
            [med["airllm"] / med["streaming_loopback"]], unit) | {"goal": ">= 20"}
    return ratios


def run(ctx: Any) -> dict[str, Any]:
    notes: list[str] = []
    runs = _runs(ctx, notes)
    metrics: dict[str, Any] = {}
    for name, rs in runs.items():
        metrics[f"{name}_generate_s"] = summarize([r["generate_s"] for r in rs], "s")
        metrics[f"{name}_tokens_per_s"] = summarize([r["tokens_per_s"] for r in rs], "tok/s")
        metrics[f"{name}_peak_over_baseline_MiB"] = summarize([r["peak_over_baseline"] / MiB for r in rs], "MiB")
        metrics[f"{name}_load_s"] = summarize([r["load_s"] for r in rs], "s")
    budget = unit_bound(ctx.manifest, ctx.stream_cache, ctx.stream_prefetch)
    return {
        "title": "Peers: same model, same weight budget, greedy generation",
        "measured": (f"{ctx.model_label}, {ctx.gen_tokens} greedy tokens (min_new_tokens = max_new_tokens) from "
                     f"a {ctx.prompt_len}-token prompt, fp32, each run in a fresh process; generate_s is the "
                     "generate() call only, load_s the model set-up before it. Weight budget "
                     f"{budget / MiB:.0f} MiB = the streaming client's bound (cache {ctx.stream_cache}, prefetch "
                     f"{ctx.stream_prefetch}); accelerate gets it as max_memory={{'cpu': budget}} with "
                     "device_map='auto' and an offload_folder on local disk (page cache warm); AirLLM reads "
                     "its per-layer split from local disk. Streaming fetches from a weight server process on "
                     "loopback. " + " ".join(notes)),
        "metrics": metrics,
        "ratios": _ratios(runs),
        "notes": notes,
    }
