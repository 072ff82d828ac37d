"""``REPORT.md`` from a results dict: headline ratios, then one section per case with its table and plots."""

from __future__ import annotations

import math
import os
from typing import Any


def fmt(x: float) -> str:
    """A number with as many digits as a reader needs (``n/a`` for NaN and non-numbers)."""
    if not isinstance(x, (int, float)) or math.isnan(x):
        return "n/a"
    a = abs(x)
    if a == 0:
        return "0"
    if a >= 100:
        return f"{x:.0f}"
    if a >= 10:
        return f"{x:.1f}"
    if a >= 0.01:
        return f"{x:.3g}"
    return f"{x:.2e}"


def _header(results: dict[str, Any]) -> list[str]:
    mode = "quick (tiny model, one run)" if results["quick"] else "full"
    versions = ", ".join(f"{k} {v}" for k, v in results.get("versions", {}).items())
    return ["# Surfing Weights benchmark report", "",
            f"Machine: {results['machine']}. Each number is the median of n runs with the min–max spread; "
            "ratios come from measurements taken side by side in the same run. Absolute numbers move with "
            "the background load of this shared box; compare ratios.", "",
            f"Model under test: {results.get('model', '?')}. Mode: {mode}. "
            f"Suite wall time {results.get('seconds', 0):.0f} s. Versions: {versions}.", "",
            "The load test (32 concurrent clients for 60 s: requests/s, p50/p99 unit latency, errors, server "
            "memory) runs with `make test-slow`; its last measured numbers are in [LOAD.md](LOAD.md).", ""]


def _case_section(name: str, case: dict[str, Any], plots: list[str]) -> list[str]:
    lines = [f"## {case.get('title', name)}", ""]
    if "error" in case:
        return lines + [f"**Failed:** `{case['error']}`", ""]
    lines += [f"Machine: shared {os.cpu_count()}-core box (see top). What was measured: {case['measured']}", ""]
    lines += ["| metric | median | spread (min–max) | n | unit |", "|---|---|---|---|---|"]
    for mname, mv in {**case.get("metrics", {}), **case.get("ratios", {})}.items():
        goal = f" (goal {mv['goal']})" if "goal" in mv else ""
        lines.append(f"| {mname} | {fmt(mv['median'])} | {fmt(mv['min'])}–{fmt(mv['max'])} | {mv['n']} | "
                     f"{mv['unit']}{goal} |")
    lines.append("")
    for plot in plots:
        lines += [f"![{name}]({plot})", ""]
    return lines


def render_report(results: dict[str, Any]) -> str:
    summary = [f"| {name} | {rname} | {fmt(r['median'])} | {fmt(r['min'])}–{fmt(r['max'])} | {r['n']} | "
               f"{r.get('goal', '')} |"
               for name, case in results["cases"].items() for rname, r in case.get("ratios", {}).items()]
    lines = _header(results) + ["## Headline ratios", "", "| case | ratio | median | spread (min–max) | n | goal |",
                                "|---|---|---|---|---|---|", *summary, ""]
    for name, case in results["cases"].items():
        lines += _case_section(name, case, results.get("plots", {}).get(name, []))
    return "\n".join(lines)
