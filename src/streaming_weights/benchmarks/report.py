"""``REPORT.md`` from a results dict: headline ratios, then one section per case with its table and plots."""

from __future__ import annotations

import math
import os
import re
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
    if 0.9 <= a < 1.1:  # a ratio near 1 against a goal such as "<= 1.01": the third decimal matters
        return f"{x:.4g}"
    if a >= 0.01:
        return f"{x:.3g}"
    return f"{x:.2e}"


def met(goal: str, value: float) -> str:
    """``yes`` / ``NO`` for a goal like ``">= 1.5"`` (``""`` when there is no goal or no value)."""
    m = re.match(r"^\s*(>=|<=)\s*([0-9.]+)\s*$", goal or "")
    if m is None or not isinstance(value, (int, float)) or math.isnan(value):
        return ""
    ok = value >= float(m.group(2)) if m.group(1) == ">=" else value <= float(m.group(2))
    return "yes" if ok else "NO"


def _method(results: dict[str, Any]) -> list[str]:
    st = results.get("setting", {})
    if not st:
        return []
    cap = (f"inside a cgroup memory cap ({st['cap_reason']}; the limit covers RSS and page cache, no swap)"
           if st.get("cap_kind") else f"**uncapped**: {st.get('cap_reason')}")
    return ["## Method", "",
            f"- Each contender runs in a fresh process {cap}.",
            "- Its files (checkpoint, offload folder, AirLLM shards, chunk files) are evicted from the page "
            "cache (`posix_fadvise(POSIX_FADV_DONTNEED)` after a sync) before each run: every run reads cold. "
            "Our weight server keeps the model in its own memory cache across runs (it stands for a remote "
            "host serving many clients), so ours reads nothing from the client's disk.",
            f"- The client is pinned to CPU {st.get('client_cpus')} (`sched_setaffinity`) with one compute "
            f"thread (`torch.set_num_threads(1)`); the weight server (`surfing serve`, standing for another "
            f"host) is pinned to CPU {st.get('server_cpus')}. Bandwidth-limited links use `surfing serve "
            "--max-rate` (a token bucket on the server's outbound bytes).",
            "- Peak memory is VmHWM read inside the child (`/proc/self/status`), reset after imports where "
            "the figure is 'over baseline'. VmHWM also counts shared file pages (libtorch and other libraries "
            "mapped read-only, already cached and charged to the parent cgroup), so a capped child's VmHWM can "
            "exceed its cap; the cap itself is enforced by the kernel (OOM kill).",
            "- Every ratio is measured side by side in one run: contenders interleaved round by round, ratios "
            "paired per round, reported as median with min–max spread and n.",
            f"- The machine is a **shared {os.cpu_count()}-core box**: other jobs ran during the suite, so "
            "absolute times are noisy (and slower than an idle machine); compare the ratios.", ""]


def _headline(results: dict[str, Any]) -> list[str]:
    gen = results["cases"].get("generation")
    if not gen or "error" in gen:
        return ["## Headline: ours vs each peer inside the memory caps", "",
                f"Not measured: {gen.get('error') if gen else 'case generation did not run'}.", ""]
    ms, rs = gen["metrics"], gen["ratios"]
    rows = ["| cap | peer | peer s/token | ours s/token | peer / ours (median, spread, n) | goal | met |",
            "|---|---|---|---|---|---|---|"]
    ref = ms.get("uncapped_transformers_s_per_token", {}).get("median", float("nan"))
    for cap in gen.get("caps", []):
        ours = ms.get(f"{cap}_ours_s_per_token", {}).get("median", float("nan"))
        rows.append(f"| {cap} | transformers in memory (uncapped) | {fmt(ref)} | {fmt(ours)} | "
                    f"{fmt(ref / ours) if ours == ours and ours else 'n/a'} (reference, not a goal) | | |")
        for peer, key in (("accelerate disk offload", "accelerate"), ("AirLLM", "airllm")):
            r = rs.get(f"{cap}_{key}_over_ours")
            p = ms.get(f"{cap}_{key}_s_per_token", {}).get("median", float("nan"))
            if r is None:
                continue
            rows.append(f"| {cap} | {peer} | {fmt(p)} | {fmt(ours)} | {fmt(r['median'])} "
                        f"({fmt(r['min'])}–{fmt(r['max'])}, n={r['n']}) | {r.get('goal', '')} | "
                        f"{met(r.get('goal', ''), r['median']) or 'n/a'} |")
            t = rs.get(f"{cap}_{key}_over_ours_time_to_result")
            if t is not None and t["n"]:
                rows.append(f"| {cap} | {peer}, time to result | | | {fmt(t['median'])} ({fmt(t['min'])}–"
                            f"{fmt(t['max'])}, n={t['n']}) | {t.get('goal', '')} | "
                            f"{met(t.get('goal', ''), t['median']) or 'n/a'} |")
        for name, label in (("speculation_over_plain", "ours speculation vs ours plain"),
                            ("batch8_over_batch1_tokens_per_s", "ours batch 8 vs batch 1 (tokens/s)")):
            r = rs.get(f"{cap}_{name}")
            if r is not None:
                rows.append(f"| {cap} | {label} | | | {fmt(r['median'])} ({fmt(r['min'])}–{fmt(r['max'])}, "
                            f"n={r['n']}) | {r.get('goal', '')} | {met(r.get('goal', ''), r['median']) or 'n/a'} |")
    return ["## Headline: ours vs each peer inside the memory caps", "",
            "Greedy generation, SmolLM2 float32 unless the mode says otherwise; 'peer / ours' is the peer's "
            "seconds per token over ours (above 1 = ours faster); 'time to result' is the peer's seconds from "
            "building the model to the last token over ours. Goals from issues 18 and 26, reported whether met "
            "or not. Details and every figure: [Generation](#generation-inside-a-memory-cap-ours-vs-"
            "accelerate-airllm-and-transformers-headline).", "", *rows, "", RECORDS, ""]


#: the headline section's last paragraph
RECORDS = ("Records kept outside this generated report (not re-measured by `surfing bench`): the load test "
           "(32 concurrent clients for 60 s, run by `make test-slow`) in [LOAD.md](LOAD.md); the transfer "
           "profile, the SO_RCVBUF A/B and the perplexity test's numbers in "
           "[TRANSFER_AND_QUANT.md](TRANSFER_AND_QUANT.md); how to run the GPU check in [GPU.md](GPU.md).")


def _load(results: dict[str, Any]) -> str:
    a, b = results.get("load_average_start"), results.get("load_average_end")
    if not a:
        return ""
    end = f", at its end {b[0]:.1f}" if b else ""
    return (f" 1-minute load average at the suite's start {a[0]:.1f}{end} (the suite itself keeps about 1-2 "
            f"cores busy; more means other jobs shared the box).")


def _header(results: dict[str, Any]) -> list[str]:
    mode = "quick (tiny model, one run)" if results["quick"] else "full"
    versions = ", ".join(f"{k} {v}" for k, v in results.get("versions", {}).items())
    merged = (" Some cases were re-run later with `--merge`: each section says when and on which commit it ran."
              if results.get("merged") else "")
    return ["# Surfing Weights benchmark report", "",
            f"Machine: {results['machine']}. Each number is the median of n runs with the min–max spread; "
            "ratios come from measurements taken side by side in the same run. Absolute numbers move with "
            "the background load of this shared box; compare ratios.", "",
            f"Model under test: {results.get('model', '?')}. Mode: {mode}. Run on commit "
            f"`{results.get('commit', '?')}`, started {results.get('started', '?')}. "
            f"Suite wall time {results.get('seconds', 0):.0f} s.{_load(results)} Versions: {versions}.{merged}", "",
            *[f"**Note:** {n}\n" for n in results.get("notes", [])],
            *_method(results), *_headline(results)]


def _case_section(name: str, case: dict[str, Any], plots: list[str]) -> list[str]:
    lines = [f"## {case.get('title', name)}", ""]
    if "error" in case:
        return lines + [f"**Failed:** `{case['error']}`", ""]
    ran = f" Ran {case['ran']} on commit `{case.get('commit', '?')}`." if case.get("ran") else ""
    load = case.get("load_average")
    load_txt = f" Load average {load[0]:.1f} at its start, {load[1]:.1f} at its end." if load else ""
    lines += [f"Machine: shared {os.cpu_count()}-core box (see top).{ran}{load_txt} What was measured: "
              f"{case['measured']}", ""]
    if case.get("unavailable"):
        lines += [f"**Not available:** {case['unavailable']}", ""]
    if case.get("table"):  # a case's own side-by-side table (markdown rows), before the metric list
        lines += [*case["table"], ""]
    if not case.get("metrics") and not case.get("ratios"):
        return lines
    lines += ["| metric | median | spread (min–max) | n | unit |", "|---|---|---|---|---|"]
    for mname, mv in {**case.get("metrics", {}), **case.get("ratios", {})}.items():
        goal = f" (goal {mv['goal']})" if "goal" in mv else ""
        lines.append(f"| {mname} | {fmt(mv['median'])} | {fmt(mv['min'])}–{fmt(mv['max'])} | {mv['n']} | "
                     f"{mv['unit']}{goal} |")
    lines.append("")
    for plot in plots:
        lines += [f"![{name}]({plot})", ""]
    return lines


def _ratio_rows(name: str, case: dict[str, Any]) -> list[str]:
    """The case's rows of the all-ratios table."""
    return [f"| {name} | {rname} | {fmt(r['median'])} | {fmt(r['min'])}–{fmt(r['max'])} | {r['n']} | "
            f"{r.get('goal', '')} | {met(r.get('goal', ''), r['median'])} |" for rname, r in case.get("ratios", {}).items()]


def render_report(results: dict[str, Any]) -> str:
    summary = [row for name, case in results["cases"].items() for row in _ratio_rows(name, case)]
    lines = _header(results) + [RATIOS_HEADING, "", "| case | ratio | median | spread (min–max) | n | goal | met |",
                                "|---|---|---|---|---|---|---|", *summary, ""]
    for name, case in results["cases"].items():
        lines += _case_section(name, case, results.get("plots", {}).get(name, []))
    return "\n".join(lines)


RATIOS_HEADING = "## All ratios"


def _lead(heading: str) -> str:
    """A section heading up to its first colon: a case's title may grow its tail between runs, not its lead."""
    return heading.split(":", 1)[0]


def _replace_section(lines: list[str], section: list[str]) -> list[str]:
    """``lines`` with the section headed ``section[0]`` replaced by ``section`` (appended when absent). A section
    is known by its heading's lead (:func:`_lead`), so a case whose title changed since replaces its old section
    rather than leaving it beside the new one."""
    same = [k for k, line in enumerate(lines) if line.startswith("## ") and _lead(line) == _lead(section[0])]
    for i in reversed(same[1:]):  # a report spliced before this rule may hold the case twice: keep the first
        j = next((k for k in range(i + 1, len(lines)) if lines[k].startswith("## ")), len(lines))
        lines = lines[:i] + lines[j:]
    if not same:
        return lines + ([""] if lines and lines[-1] else []) + section
    i = same[0]
    j = next((k for k in range(i + 1, len(lines)) if lines[k].startswith("## ")), len(lines))
    return lines[:i] + section + lines[j:]


def _replace_ratio_rows(lines: list[str], name: str, rows: list[str]) -> list[str]:
    """``lines`` with case ``name``'s rows of the all-ratios table replaced by ``rows`` (at the table's end)."""
    if RATIOS_HEADING not in lines:
        return lines
    start = lines.index(RATIOS_HEADING) + 1
    first = next((k for k in range(start, len(lines)) if lines[k].startswith("|")), None)
    if first is None:
        return lines
    end = next((k for k in range(first, len(lines)) if not lines[k].startswith("|")), len(lines))
    kept = [row for row in lines[first:end] if not row.startswith(f"| {name} | ")]
    return lines[:first] + kept + rows + lines[end:]


def splice_report(text: str, results: dict[str, Any]) -> str:
    """An earlier REPORT.md ``text`` with the sections and ratio rows of ``results``' cases replaced (or
    appended): re-running a few cases into a report whose other cases' results.json is not at hand. Each
    spliced section says when and on which commit it ran, and carries the run's notes."""
    lines = text.rstrip("\n").split("\n")
    notes = " ".join(results.get("notes", []))
    for name, case in results["cases"].items():
        shown = case | ({"measured": f"{case.get('measured', '')} Notes of this run: {notes}"}
                        if notes and "error" not in case else {})
        lines = _replace_section(lines, _case_section(name, shown, results.get("plots", {}).get(name, [])))
        lines = _replace_ratio_rows(lines, name, _ratio_rows(name, case))
    if "generation" in results["cases"]:  # the headline is the generation case's
        lines = _replace_section(lines, _headline({"cases": {"generation": results["cases"]["generation"]}}))
    return "\n".join(lines).rstrip("\n") + "\n"
