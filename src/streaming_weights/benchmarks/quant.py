"""Case ``quant``: int8 / int4 chunks vs float32: perplexity, bytes stored and bytes fetched per token."""

from __future__ import annotations

import asyncio
import math
from typing import Any

from .common import MiB, summarize, weight_server_process
from .fixtures import load_manifest
from .sandbox import pinned_here

SCHEMES = ("int8", "int4")


def _chunk(ctx: Any, scheme: str) -> Any:
    from ..chunker import ModelChunker

    out = ctx.tmp / "quant" / scheme
    asyncio.run(ModelChunker(str(ctx.hf_dir), output_dir=str(out), name=f"{ctx.manifest.name}-{scheme}",
                             quantize=scheme, force=True).chunk_model())
    return load_manifest(out)


def _perplexity(name: str, uri: str, ids: Any) -> tuple[float, float]:
    """(perplexity of ``ids`` under the streamed model, bytes it fetched for the one forward pass)."""
    import torch

    from ..models import StreamingLlamaModel

    model = StreamingLlamaModel(name, uri, memory_budget=None, cache_size=0, prefetch_count=1)
    try:
        before = model.get_inference_stats()["bytes_fetched"]
        with torch.no_grad():
            loss = model.hf_model(input_ids=ids, labels=ids).loss
        return math.exp(float(loss)), float(model.get_inference_stats()["bytes_fetched"] - before)
    finally:
        model.close()


def _text_ids(ctx: Any) -> Any:
    import torch

    ids = ctx.prompt
    return torch.tensor([ids[: 256]])


def run(ctx: Any) -> dict[str, Any]:
    try:
        manifests = {s: _chunk(ctx, s) for s in SCHEMES}
    except Exception as exc:  # noqa: BLE001 - the feature (issue 14) may not be there yet
        return {"title": "Quantization: int8 / int4 perplexity and bytes", "metrics": {}, "ratios": {},
                "unavailable": f"chunking with quantize= failed: {type(exc).__name__}: {exc}",
                "measured": "ModelChunker(quantize='int8'|'int4') is not available in this build."}
    ids = _text_ids(ctx)
    metrics: dict[str, Any] = {}
    ratios: dict[str, Any] = {}
    with pinned_here(ctx.client_cpus), weight_server_process(
            ctx.tmp / "quant", ctx.manifest.total_bytes / MiB + 64, cpus=ctx.server_cpus) as quri:
        ctx.say("quant: perplexity float32")
        ppl = {"fp32": _perplexity(ctx.manifest.name, ctx.uri, ids)}
        for s in SCHEMES:
            ctx.say(f"quant: perplexity {s}")
            ppl[s] = _perplexity(manifests[s].name, quri, ids)
    stored = {"fp32": ctx.manifest.total_bytes} | {s: manifests[s].total_bytes for s in SCHEMES}
    for k, (p, fetched) in ppl.items():
        metrics[f"{k}_perplexity"] = summarize([p], "ppl")
        metrics[f"{k}_stored_MiB"] = summarize([stored[k] / MiB], "MiB")
        metrics[f"{k}_fetched_MiB_per_pass"] = summarize([fetched / MiB], "MiB")
    for s in SCHEMES:
        ratios[f"{s}_perplexity_over_fp32"] = summarize([ppl[s][0] / ppl["fp32"][0]], "x")
        ratios[f"fp32_bytes_over_{s}"] = summarize([stored["fp32"] / stored[s]], "x")
    return {
        "title": "Quantization: int8 / int4 perplexity and bytes",
        "measured": (f"{ctx.model_label} chunked again with ModelChunker(quantize='int8' | 'int4') from the "
                     f"same checkpoint; perplexity of the {ids.shape[1]}-token grounded prompt ({ctx.prompt_kind}) "
                     "in one forward pass of the streamed model (cache 0, every unit fetched once; the client "
                     "dequantizes to float32 compute), deterministic (n = 1). Stored = bytes of the chunked "
                     "model; fetched = wire bytes of that pass."),
        "metrics": metrics,
        "ratios": ratios,
    }
