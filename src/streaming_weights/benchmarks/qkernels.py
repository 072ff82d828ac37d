"""Part of case ``quant``: ``quantized_in_memory="kernel"`` (linear layers computing on the codes with torch's
weight-only kernels, :mod:`streaming_weights.models.qlinear`) against dequantizing per use.

* :func:`projection`: one ``[out, in]`` projection (the issue's 2048 -> 5632), one torch thread pinned to the
  client core, 1 and 64 rows (a decoded token, a prefill): bfloat16 dense, each kernel on its kernel form
  (``client.qkernel.linear``), and dequantize-per-use (``format.quant.decode_into`` into a reused bfloat16
  buffer, then the dense matmul), rounds interleaved.
* :func:`model_runs`: the streamed model's perplexity with the kernels (bfloat16 compute) beside bfloat16
  with the float32 chunks, and its seconds per generated token against ``quantized_in_memory="codes"``
  (every block kept in the cache either way, so it times compute, not transfer).
"""

from __future__ import annotations

import time
from typing import Any, Callable

from .common import summarize
from .sandbox import pinned_here

SHAPE = (5632, 2048)  # [out, in] of the projection
ROWS = (1, 64)


def _calls(rows: int) -> dict[str, Callable[[], Any]]:
    import torch

    from ..client import qkernel
    from ..format.quant import decode_into, encode, quant_spec

    g = torch.Generator().manual_seed(0)
    w = torch.randn(SHAPE, generator=g) * 0.02
    x = torch.randn(rows, SHAPE[1], generator=g).to(torch.bfloat16)
    dense, buf = w.to(torch.bfloat16), torch.empty(SHAPE, dtype=torch.bfloat16)
    dts = {"U8": torch.uint8, "I8": torch.int8, "BF16": torch.bfloat16}
    calls: dict[str, Callable[[], Any]] = {"bf16_dense": lambda: torch.nn.functional.linear(x, dense)}
    for scheme, key in (("int8-channel", "int8_channel"), ("int4", "int4"), ("int8", "int8")):
        spec = quant_spec(scheme, SHAPE, "F32")
        stored = encode(w, spec)
        if scheme != "int8":  # group-wise int8 has no kernel
            parts = {s: torch.empty(sh, dtype=dts[dt]) for s, (dt, sh) in qkernel.kernel_form(spec).items()}
            qkernel.pack_into(parts, stored, spec)
            calls[f"{key}_kernel"] = lambda parts=parts: qkernel.linear(x, parts, None)
        calls[f"{key}_dequant_per_use"] = lambda st=stored, sp=spec: torch.nn.functional.linear(
            x, decode_into(buf, st, sp))
    return calls


def projection(ctx: Any) -> tuple[dict[str, Any], str]:
    """Milliseconds per call of each way to compute the projection (metrics ``proj_{way}_rows{R}_ms``)."""
    repeats = 5 if ctx.quick else 15
    ctx.say("quant: one projection, kernels vs dequantize-per-use")
    metrics: dict[str, Any] = {}
    with pinned_here(ctx.client_cpus):
        for rows in ROWS:
            calls = _calls(rows)
            times: dict[str, list[float]] = {k: [] for k in calls}
            for fn in calls.values():
                fn()
            for _ in range(repeats):
                for k, fn in calls.items():
                    t = time.perf_counter()
                    fn()
                    times[k].append((time.perf_counter() - t) * 1e3)
            metrics |= {f"proj_{k}_rows{rows}_ms": summarize(v, "ms") for k, v in times.items()}
    what = (f" Projection: one [{SHAPE[1]} -> {SHAPE[0]}] linear layer, bfloat16 activations, one torch thread "
            f"pinned to CPU {ctx.client_cpus[0]}, {', '.join(map(str, ROWS))} rows, {repeats} interleaved rounds "
            "after a warm-up: dense bfloat16; torch's kernels on the kernel form (int8-channel: "
            "_weight_int8pack_mm, int4: _weight_int4pack_mm_for_cpu); dequantize-per-use = decode_into a reused "
            "bfloat16 buffer + the dense matmul.")
    return metrics, what


def _per_token(name: str, uri: str, ids: Any, tokens: int, mode: str) -> tuple[float, Any]:
    """(seconds per generated token with every block kept, the engine's tier) for ``quantized_in_memory=mode``."""
    from ..models import StreamingLlamaModel

    model = StreamingLlamaModel(name, uri, memory_budget=None, cache_size=10_000, dtype="bfloat16",
                                quantized_in_memory=mode, speculation="off")
    try:
        model.generate(input_ids=ids, max_new_tokens=2, do_sample=False)  # fetch every block, warm up
        t = time.perf_counter()
        model.generate(input_ids=ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        return (time.perf_counter() - t) / tokens, model.engine
    finally:
        model.close()


def model_runs(ctx: Any, names: dict[str, str], uri: str, ids: Any,
               perplexity: Callable[..., tuple[float, float]]) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(metrics, ratios, what) of the kernel path for each scheme in ``names`` (served at ``uri``)."""
    ctx.say("quant: perplexity bf16 (float32 chunks)")
    bf16 = perplexity(ctx.manifest.name, ctx.uri, ids, dtype="bfloat16")[0]
    metrics: dict[str, Any] = {"bf16_perplexity": summarize([bf16], "ppl")}
    ratios: dict[str, Any] = {}
    prompt, tokens = ids[:, :16], ctx.gen_tokens
    dense = [_per_token(ctx.manifest.name, ctx.uri, prompt, tokens, "dequantized")[0] for _ in range(ctx.repeats)]
    metrics["bf16_dense_s_per_token"] = summarize(dense, "s")
    for scheme, name in names.items():
        key = scheme.replace("-", "_")
        ctx.say(f"quant: {scheme} kernel perplexity and seconds per token")
        ppl = perplexity(name, uri, ids, dtype="bfloat16", quantized_in_memory="kernel")[0]
        times: dict[str, list[float]] = {"codes": [], "kernel": []}
        for _ in range(ctx.repeats):
            for mode in times:
                spt, engine = _per_token(name, uri, prompt, tokens, mode)
                times[mode].append(spt)
                if mode == "kernel":
                    layers = getattr(engine.codes, "layers", 0)
        metrics[f"{key}_kernel_perplexity"] = summarize([ppl], "ppl")
        metrics[f"{key}_kernel_layers"] = summarize([layers], "layers")
        for mode, v in times.items():
            metrics[f"{key}_{mode}_s_per_token"] = summarize(v, "s")
        ratios[f"{key}_kernel_perplexity_over_bf16"] = summarize([ppl / bf16], "x") | (
            {"goal": "<= 1.01"} if scheme.startswith("int8") else {})
        ratios[f"{key}_kernel_speedup_over_dequant_per_use"] = summarize(
            [c / k for c, k in zip(times["codes"], times["kernel"])], "x")
        ratios[f"{key}_kernel_speedup_over_bf16_dense"] = summarize(
            [d / k for d, k in zip(dense, times["kernel"])], "x")
    what = (" Kernel path: perplexity of the same text with quantized_in_memory='kernel' and bfloat16 compute "
            "(bf16 = the float32 chunks computed in bfloat16); seconds per generated token = one generate of "
            f"{tokens} tokens after a {prompt.shape[1]}-token prompt, every block kept in the cache, bfloat16 "
            "compute, quantized_in_memory='kernel' vs 'codes' (dequantize per use), alternated "
            f"{ctx.repeats}x, one torch thread pinned to the client core; bf16 dense = the float32 chunks computed "
            "in bfloat16, every block kept (pinned in its module), timed the same way before them.")
    return metrics, ratios, what


__all__ = ["model_runs", "projection"]
