"""Case ``chunker``: chunking throughput and peak RSS (a fresh process per run)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from .common import MiB, run_child, summarize


def _sources(ctx: Any) -> list[tuple[str, Path]]:
    if ctx.quick:
        return [(ctx.model_label, ctx.source_path)]
    from ..demo import packaged_smollm2

    big = ctx.tmp / "big-llama"
    if not (big / "config.json").is_file():
        ctx.say("chunker: building a random-init LLaMA checkpoint (~0.65 GB)")
        r = run_child("build_llama", {"path": str(big), "layers": 8, "hidden": 1024, "intermediate": 2816,
                                      "vocab": 32000}, timeout=600)
        if "error" in r:
            raise RuntimeError(r["error"])
    return [("SmolLM2-135M GGUF (Q4_1, dequantized to fp32)", packaged_smollm2()),
            ("random-init LLaMA (8 x 1024, vocab 32000, fp32 safetensors)", big)]


def _measure(ctx: Any, i: int, src: Path) -> list[dict[str, Any]]:
    if ctx.quick:
        return ctx.child_runs("chunk")
    out = ctx.tmp / f"chunk-out-{i}"
    r = run_child("chunk", {"source": str(src), "out": str(out)}, timeout=900)
    shutil.rmtree(out, ignore_errors=True)
    if "error" in r:
        raise RuntimeError(r["error"])
    return [r]


def run(ctx: Any) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    rows = []
    for i, (label, src) in enumerate(_sources(ctx)):
        ctx.say(f"chunker: {label}")
        res = _measure(ctx, i, src)
        key = f"source{i}"
        metrics[f"{key}_MBps"] = summarize([r["bytes_written"] / r["seconds"] / 1e6 for r in res], "MB/s")
        metrics[f"{key}_seconds"] = summarize([r["seconds"] for r in res], "s")
        metrics[f"{key}_peak_over_baseline_MiB"] = summarize([r["peak_over_baseline"] / MiB for r in res], "MiB")
        rows.append({"key": key, "label": label, "source_bytes": res[0]["source_bytes"],
                     "bytes_written": res[0]["bytes_written"], "largest_unit": res[0]["largest_unit"]})
    described = "; ".join(f"{r['key']} = {r['label']}, {r['source_bytes'] / MiB:.0f} MiB on disk -> "
                          f"{r['bytes_written'] / MiB:.0f} MiB of units, largest {r['largest_unit'] / MiB:.0f} MiB"
                          for r in rows)
    return {
        "title": "Chunker: throughput and peak RSS",
        "measured": ("ModelChunker.chunk_model() in a fresh process per run, writing to local disk; MB/s = bytes "
                     "of units written / wall time; peak RSS over the post-import baseline (file pages the "
                     f"reader maps count as RSS). Sources: {described}. GGUF sources are dequantized by "
                     "transformers as a whole."),
        "metrics": metrics,
        "ratios": {f"{r['key']}_peak_over_written_size": summarize(
            [metrics[f"{r['key']}_peak_over_baseline_MiB"]["median"] * MiB / r["bytes_written"]], "x")
            for r in rows},
        "sources": rows,
    }
