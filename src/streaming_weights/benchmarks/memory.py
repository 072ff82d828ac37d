"""Case ``memory``: peak RSS of a streaming client vs its bound and vs transformers' full model."""

from __future__ import annotations

from typing import Any

from .common import MiB, summarize, unit_bound


def run(ctx: Any) -> dict[str, Any]:
    stream = ctx.child_runs("stream")
    full = ctx.child_runs("hf_memory")
    bound = unit_bound(ctx.manifest, ctx.stream_cache, ctx.stream_prefetch)
    peaks = [r["peak_over_baseline"] for r in stream]
    full_peaks = [r["peak_over_baseline"] for r in full]
    n = min(len(peaks), len(full_peaks))
    quick_note = (" --quick: these runs share one process, so later peaks are understated (freed memory is "
                  "reused); only the full suite's memory figures mean anything." if ctx.quick else "")
    return {
        "title": "Memory: peak RSS of a streaming client vs its bound and vs the full model (+ generation figures)",
        "measured": (f"{ctx.model_label}: each figure from a fresh process; peak RSS (VmHWM, reset after "
                     f"imports) minus RSS after importing torch/transformers/streaming_weights. Streaming: "
                     f"cache_size {ctx.stream_cache}, prefetch_count {ctx.stream_prefetch}, greedy generate of "
                     f"{ctx.gen_tokens} tokens from the loopback server. Bound = resident "
                     f"({sum(u.bytes for u in ctx.manifest.resident) / MiB:.0f} MiB) + (cache + prefetch + 1) x "
                     f"largest unit ({max(u.bytes for u in ctx.manifest.streamed) / MiB:.1f} MiB) = "
                     f"{bound / MiB:.0f} MiB of weights; activations, KV cache and allocator slack come on top. "
                     "Full model = transformers from_pretrained of the same weights (one safetensors file), "
                     "same generate." + quick_note),
        "metrics": {
            "streaming_peak_over_baseline_MiB": summarize([p / MiB for p in peaks], "MiB"),
            "weight_bound_MiB": summarize([bound / MiB], "MiB"),
            "full_model_peak_over_baseline_MiB": summarize([p / MiB for p in full_peaks], "MiB"),
            "streaming_tokens_per_s": summarize([r["tokens_per_s"] for r in stream], "tok/s"),
            "streaming_MiB_fetched_per_token": summarize([r["bytes_fetched_per_token"] / MiB for r in stream], "MiB"),
            "streaming_stall_s": summarize([r["stall_seconds"] for r in stream], "s"),
            "streaming_peak_live_units": summarize([r["peak_live_units"] for r in stream], "units"),
        },
        "ratios": {
            "streaming_peak_over_bound": summarize([p / bound for p in peaks], "x"),
            "streaming_peak_over_full_model_peak": summarize(
                [a / max(b, 1) for a, b in zip(peaks[:n], full_peaks[:n])], "x"),
        },
    }
