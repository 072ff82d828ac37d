"""Case ``budget``: tokens/s and peak memory vs ``memory_budget`` (the planner's bound vs what was used)."""

from __future__ import annotations

from typing import Any

from .common import MiB, summarize

#: Budgets as fractions of the model's bytes (the planner turns each into cache / prefetch / resident choices).
FRACTIONS = (0.35, 1.0, 1.6)
QUICK_FRACTIONS = (0.6, 1.6)
#: Added to each budget: the planner's own minimum covers activations/KV headroom and runtime overhead.
HEADROOM = 48 << 20


def _runs(ctx: Any, budgets: list[int]) -> list[dict[str, Any]]:
    """One fresh process per budget (--quick: all budgets in one process, peaks then understated)."""
    args = [ctx.gen_args("stream") | {"model_kwargs": {"memory_budget": b}, "speculation": "off"} for b in budgets]
    if ctx.quick:
        ctx.say("budget: every budget in one process (--quick)")
        r = ctx.sandboxed("multi", {"runs": [["stream", a] for a in args], "threads": 1}, cap=None,
                          evict_paths=[ctx.chunks_dir])
        return r.get("results") or [r] * len(budgets)
    out = []
    for b, a in zip(budgets, args):
        ctx.say(f"budget: memory_budget {b / MiB:.0f} MiB")
        out.append(ctx.sandboxed("stream", a, cap=None, evict_paths=[ctx.chunks_dir]))
    return out


def run(ctx: Any) -> dict[str, Any]:
    total = ctx.manifest.total_bytes
    fractions = QUICK_FRACTIONS if ctx.quick else FRACTIONS
    metrics: dict[str, Any] = {}
    ratios: dict[str, Any] = {}
    notes: list[str] = []
    points = []
    budgets = [int(total * f) + HEADROOM for f in fractions]
    for budget, r in zip(budgets, _runs(ctx, budgets)):
        key = f"budget_{budget // MiB}MiB"
        if "error" in r:
            notes.append(f"{key}: {r['error']}")
            continue
        plan = r.get("plan") or {}
        bound = plan.get("bound_bytes")
        metrics[f"{key}_tokens_per_s"] = summarize([r["tokens_per_s"]], "tok/s")
        metrics[f"{key}_MiB_per_token"] = summarize([r["bytes_fetched_per_token"] / MiB], "MiB/token")
        metrics[f"{key}_peak_over_baseline_MiB"] = summarize([r["peak_over_baseline"] / MiB], "MiB")
        if bound:
            metrics[f"{key}_plan_bound_MiB"] = summarize([bound / MiB], "MiB")
            ratios[f"{key}_peak_over_plan_bound"] = summarize([r["peak_over_baseline"] / bound], "x") | {
                "goal": "<= 1.1"}
        points.append({"budget": budget, "tokens_per_s": r["tokens_per_s"], "peak": r["peak_over_baseline"],
                       "bound": bound, "cache_size": plan.get("cache_size")})
    if not points:
        return {"title": "Budget: tokens/s and memory vs memory_budget", "unavailable": "; ".join(notes),
                "measured": "memory_budget= (issue 12) did not run: " + "; ".join(notes), "metrics": {},
                "ratios": {}}
    return {
        "title": "Budget: tokens/s and memory vs memory_budget",
        "measured": (f"{ctx.model_label}; StreamingLlamaModel(memory_budget=B, speculation off) for B = "
                     f"{', '.join(f'{f:g}' for f in fractions)} x the model's {total / MiB:.0f} MiB + {HEADROOM // MiB} MiB, one fresh "
                     f"process per budget (n = 1 per point), pinned, uncapped, chunk files evicted first; "
                     f"{ctx.headline_tokens} greedy tokens from the grounded prompt. Peak = VmHWM minus the "
                     "post-import RSS; bound = the planner's bound_bytes (get_cache_info()['plan']). "
                     + " ".join(notes)),
        "metrics": metrics,
        "ratios": ratios,
        "points": points,
    }
