"""Case ``api``: the OpenAI-compatible server's tokens/s and bytes fetched per token vs concurrent clients."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from .common import MiB, summarize
from .sandbox import pinned_here

FULL_LEVELS = (1, 4, 8)
QUICK_LEVELS = (1, 2)
TITLE = "API: tokens/s and bytes per token vs concurrent clients (surfing api)"


async def _burst(url: str, model_id: str, prompt: list[int], clients: int, tokens: int) -> tuple[float, int]:
    """``clients`` concurrent /v1/completions requests; (wall seconds, completion tokens served)."""
    import httpx

    body = {"model": model_id, "prompt": prompt, "max_tokens": tokens, "temperature": 0}
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        t = time.perf_counter()
        replies = await asyncio.gather(*(http.post("/v1/completions", json=body) for _ in range(clients)))
        dt = time.perf_counter() - t
    for r in replies:
        if r.status_code != 200:
            raise RuntimeError(f"POST /v1/completions answered {r.status_code}: {r.text[:300]}")
    return dt, sum(int(r.json()["usage"]["completion_tokens"]) for r in replies)


def _levels(ctx: Any, server: Any, model: Any, model_id: str, levels: tuple[int, ...], repeats: int) -> dict:
    out: dict[int, dict[str, list[float]]] = {c: {"tps": [], "bpt": []} for c in levels}
    asyncio.run(_burst(server.url, model_id, ctx.prompt, 1, 1))  # warm-up: resident parts, first fetches
    for i in range(repeats):
        for c in levels:
            ctx.say(f"api: {c} concurrent clients ({i + 1}/{repeats})")
            before = model.get_inference_stats()["bytes_fetched"]
            dt, served = asyncio.run(_burst(server.url, model_id, ctx.prompt, c, ctx.headline_tokens))
            out[c]["tps"].append(served / dt)
            out[c]["bpt"].append((model.get_inference_stats()["bytes_fetched"] - before) / max(1, served))
    return out


def run(ctx: Any) -> dict[str, Any]:
    try:
        from ..api import ApiServer, create_app
        from ..models import StreamingLlamaModel
    except ImportError as exc:  # the api extra (issue 15) is not installed / not in this build
        return {"title": TITLE, "metrics": {}, "ratios": {}, "unavailable": f"streaming_weights.api: {exc}",
                "measured": "the OpenAI-compatible API is not available in this build."}
    levels, repeats = (QUICK_LEVELS, 1) if ctx.quick else (FULL_LEVELS, 2)
    with pinned_here(ctx.client_cpus):
        model = StreamingLlamaModel(ctx.manifest.name, ctx.uri, cache_size=ctx.stream_cache,
                                    prefetch_count=ctx.stream_prefetch)
        try:
            server = ApiServer(create_app(model, model_id="bench"), port=0).start()
            try:
                out = _levels(ctx, server, model, "bench", levels, repeats)
            finally:
                server.stop()
        except Exception as exc:  # noqa: BLE001 - e.g. a model without a tokenizer (tiny test models)
            return {"title": TITLE, "metrics": {}, "ratios": {}, "unavailable": f"{type(exc).__name__}: {exc}",
                    "measured": "the API could not serve this model."}
        finally:
            model.close()
    metrics = {f"clients{c}_tokens_per_s": summarize(v["tps"], "tok/s") for c, v in out.items()}
    metrics |= {f"clients{c}_MiB_per_token": summarize([b / MiB for b in v["bpt"]], "MiB/token")
                for c, v in out.items()}
    top = levels[-1]
    return {
        "title": TITLE,
        "measured": (f"{ctx.model_label} behind create_app() + ApiServer (uvicorn, in this process; the "
                     f"server's micro-batcher joins concurrent requests), StreamingLlamaModel(cache "
                     f"{ctx.stream_cache}, prefetch {ctx.stream_prefetch}) from the weight server. Each level: "
                     f"that many concurrent POST /v1/completions (the grounded prompt as token ids, max_tokens "
                     f"{ctx.headline_tokens}, temperature 0); tokens/s = completion tokens / wall time; bytes "
                     f"per token = weight bytes fetched / completion tokens. {repeats} interleaved rounds, pinned "
                     f"(client CPU {ctx.client_cpus[0]}, one thread)."),
        "metrics": metrics,
        "ratios": {f"clients{top}_over_clients1_tokens_per_s": summarize(
            [a / b for a, b in zip(out[top]["tps"], out[1]["tps"])], "x")},
        "levels": list(levels),
    }
