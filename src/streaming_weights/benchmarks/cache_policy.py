"""Case ``cache``: bytes fetched per generated token vs cache size, ``order`` (default) vs ``lru``."""

from __future__ import annotations

from typing import Any

from .common import MiB, prompt_ids, summarize

TOKENS = 2


def _curve(ctx: Any, policy: str, sizes: list[int]) -> dict[int, float]:
    """Bytes fetched per generated token at each cache size (after a warm-up generate that fills the cache)."""
    from ..models import StreamingLlamaModel

    ids = prompt_ids(ctx.vocab, 8)
    curve: dict[int, float] = {}
    model = StreamingLlamaModel(ctx.manifest.name, ctx.uri, 1, prefetch_count=1, cache_policy=policy)
    try:
        for k in sizes:
            ctx.say(f"cache: policy {policy}, cache_size {k}/{len(ctx.manifest.streamed)}")
            model.cache_size = k
            model.clear_cache()
            model.generate(input_ids=ids, max_new_tokens=1, do_sample=False)  # cold pass: fills the cache
            model.generate(input_ids=ids, max_new_tokens=TOKENS, min_new_tokens=TOKENS, do_sample=False)
            # steady state: the window opens and closes alike, each with the next pass's first streamed unit
            # prefetched (fetched past the kept units, during the pass before): counted once, where it landed
            before = _settled_bytes(model)
            model.generate(input_ids=ids, max_new_tokens=TOKENS, min_new_tokens=TOKENS, do_sample=False)
            curve[k] = (_settled_bytes(model) - before) / TOKENS
    finally:
        model.close()
    return curve


def _settled_bytes(model: Any) -> int:
    """Bytes fetched so far, once no prefetch is in flight (one started by the last pass lands first)."""
    import asyncio

    async def settle() -> None:
        while model.engine.cache.inflight:
            await asyncio.wait(list(model.engine.cache.inflight.values()))

    model.engine.run(settle())
    return model.get_cache_info()["bytes_fetched"]


def run(ctx: Any) -> dict[str, Any]:
    import torch

    m = ctx.manifest
    L = len(m.streamed)
    streamed_bytes = sum(u.bytes for u in m.streamed)
    sizes = list(range(1, L + 1)) if ctx.quick else sorted({1, 4, 8, L // 2, (3 * L) // 4, L - 1, L})
    with torch.no_grad():
        curves = {policy: _curve(ctx, policy, sizes) for policy in ("order", "lru")}
    theory = {k: (L - k) / L for k in sizes}
    mid = sizes[len(sizes) // 2]
    frac = lambda p, k: summarize([curves[p][k] / streamed_bytes], "fraction of model")  # noqa: E731
    return {
        "title": "Cache policy: bytes fetched per generated token vs cache size",
        "measured": (f"{ctx.model_label}, L = {L} streamed layers of {streamed_bytes / L / MiB:.1f} MiB each; for each "
                     f"cache size k: clear the cache, one warm-up generate (1 token) and one of {TOKENS} tokens, then "
                     f"greedy generate of {TOKENS} tokens (KV cache on: every token visits all L layers); bytes fetched "
                     f"during it (prefetches in flight settled at both ends) / tokens. prefetch_count 1. Byte counts are deterministic (one run per point). In this "
                     "implementation cache_size counts units kept *between* uses; the unit computing now is "
                     "not counted, so the order-aware default follows (L-k)/L of the model per token rather "
                     "than the issue's (L-k+1)/L, and LRU fetches everything until k = L."),
        "metrics": {f"order_fraction_at_k{k}": frac("order", k) for k in sizes}
        | {f"lru_fraction_at_k{k}": frac("lru", k) for k in sizes},
        "ratios": {
            "order_max_abs_deviation_from_theory": summarize(
                [max(abs(curves["order"][k] / streamed_bytes - theory[k]) for k in sizes)], "fraction"),
            f"lru_over_order_bytes_at_k{mid}": summarize(
                [curves["lru"][mid] / max(1.0, curves["order"][mid])], "x"),
        },
        "curve": {"L": L, "streamed_bytes": streamed_bytes, "sizes": sizes,
                  "order_bytes_per_token": [curves["order"][k] for k in sizes],
                  "lru_bytes_per_token": [curves["lru"][k] for k in sizes],
                  "theory_fraction": [theory[k] for k in sizes]},
    }
