"""Case ``cold_start``: time to first token, streaming vs downloading the whole model then loading it."""

from __future__ import annotations

from typing import Any

from .common import summarize


def run(ctx: Any) -> dict[str, Any]:
    stream = ctx.child_runs("stream")
    dl = ctx.child_runs("download")
    n = min(len(stream), len(dl))
    return {
        "title": "Cold start: time to first token, streaming vs download-then-load",
        "measured": (f"{ctx.model_label}, fresh process each, clock starts after imports. streaming = "
                     f"StreamingLlamaModel (cache {ctx.stream_cache}, prefetch {ctx.stream_prefetch}) from the "
                     "loopback server, then generate until the first new token. download = fetch every unit "
                     "of the same model over the same loopback server (WebSocketSource, verified), write it as "
                     "one safetensors file + config, transformers from_pretrained, generate until the first "
                     "new token."),
        "metrics": {
            "streaming_time_to_first_token_s": summarize([r["ttft"] for r in stream], "s"),
            "download_then_load_time_to_first_token_s": summarize([r["ttft"] for r in dl], "s"),
            "download_phase_s": summarize([r["download_s"] for r in dl], "s"),
        },
        "ratios": {"download_ttft_over_streaming_ttft": summarize(
            [b["ttft"] / a["ttft"] for a, b in zip(stream[:n], dl[:n])], "x")},
    }
