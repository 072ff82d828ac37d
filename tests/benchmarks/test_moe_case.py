"""The ``moe`` benchmark case at a toy size: it runs, reports numbers for every contender, renders its report
section and plot. No timing assertions (the box is shared): only that the figures exist and are finite."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from streaming_weights.benchmarks import CASES, moe
from streaming_weights.benchmarks.plots import write_plots
from streaming_weights.benchmarks.report import _case_section
from streaming_weights.benchmarks.sandbox import usable_cpus


def _ctx(tmp_path: Path) -> SimpleNamespace:
    cpus = usable_cpus()
    return SimpleNamespace(quick=True, tmp=tmp_path, say=lambda msg: None, client_cpus=[cpus[0]],
                           server_cpus=[cpus[-1]], cap_kind=None, cap_reason="test: uncapped")


@pytest.mark.slow  # three fresh processes (prepare, contenders, weight server): ~12 s; make test-slow runs it
def test_moe_case_runs_at_toy_size_and_reports_every_contender(tmp_path):
    assert "moe" in CASES  # `surfing bench --cases moe` runs it
    case = moe.run(_ctx(tmp_path))
    m, r = case["metrics"], case["ratios"]
    for name in ("transformers", *moe.CONTENDERS):
        for key in ("s_per_token", "time_to_result_s", "peak_rss_MiB"):
            assert math.isfinite(m[f"{name}_{key}"]["median"]), (name, key)
    for name in ("expert_units", "whole_layer"):
        assert m[f"{name}_MiB_per_token"]["median"] >= 0
        assert math.isfinite(r[f"{name}_bytes_per_token_over_streamed"]["median"])
    assert r["expert_units_bytes_per_token_over_streamed"]["goal"] == "<= 0.2"
    tokens = case["tokens"]
    assert len(tokens["transformers"]) == 4
    assert m["whole_layer_tokens_identical_to_expert_units"]["median"] in (0.0, 1.0)
    assert "NOT capped" in case["measured"]  # an uncapped run says so

    text = "\n".join(_case_section("moe", case, ["moe.png"]))
    assert "| ours, expert units |" in text and "| accelerate disk offload |" in text
    plots = write_plots({"cases": {"moe": case}}, tmp_path)
    assert plots == {"moe": ["moe.png"]} and (tmp_path / "moe.png").stat().st_size > 0


def test_splice_replaces_only_the_rerun_cases_section_and_ratio_rows():
    from streaming_weights.benchmarks.report import splice_report

    old = "\n".join(["# report", "", "## All ratios", "", "| case | ratio | median | spread (min–max) | n | goal | met |",
                     "|---|---|---|---|---|---|---|", "| gpu | x | 1 | 1–1 | 1 | | |", "| moe | stale | 9 | 9–9 | 1 | | |",
                     "", "## GPU check", "", "kept text", "", "## MoE old", "", "stale section", ""])
    ratio = {"unit": "x", "n": 1, "median": 0.05, "min": 0.05, "max": 0.05, "goal": "<= 0.2"}
    case = {"title": "MoE old", "measured": "fresh numbers", "metrics": {}, "ratios": {"bytes_ratio": ratio},
            "table": ["| a | b |", "|---|---|", "| 1 | 2 |"]}
    text = splice_report(old, {"cases": {"moe": case}, "notes": ["other jobs ran"]})
    assert "kept text" in text and "| gpu | x |" in text  # the other cases stay as they were
    assert "stale" not in text and "| moe | bytes_ratio | 0.05 |" in text and "| yes |" in text
    assert "fresh numbers" in text and "other jobs ran" in text and "| 1 | 2 |" in text
    assert splice_report(text, {"cases": {"moe": case}, "notes": ["other jobs ran"]}) == text  # idempotent


def test_splice_replaces_a_retitled_cases_section_instead_of_adding_a_second_one():
    """A case whose title grew a tail since the report was written (its lead, before the colon, unchanged):
    its old section goes, and a report already holding the case twice keeps one section."""
    from streaming_weights.benchmarks.report import splice_report

    case = {"title": "Transfer: one unit; local disk vs dd", "measured": "fresh", "metrics": {}, "ratios": {}}
    old = "\n".join(["# report", "", "## Transfer: one unit", "", "stale", "", "## Overlap: x", "", "kept", "",
                     "## Transfer: one unit; local disk vs dd", "", "older", ""])
    text = splice_report(old, {"cases": {"transfer": case}})
    assert "stale" not in text and "older" not in text and "kept" in text
    assert text.count("## Transfer") == 1 and text.index("## Transfer") < text.index("## Overlap")
    assert splice_report(text, {"cases": {"transfer": case}}) == text


def test_splice_of_the_generation_case_replaces_the_headline_and_keeps_the_records_line():
    from streaming_weights.benchmarks.report import RECORDS, splice_report

    def case(s_per_token: float, ttr: float) -> dict:
        summary = lambda v, unit, goal="": {"unit": unit, "n": 1, "median": v, "min": v, "max": v, "goal": goal}  # noqa: E731
        return {"title": "Generation", "measured": "m", "caps": ["660MB"],
                "metrics": {"660MB_ours_s_per_token": summary(0.25, "s/token"),
                            "660MB_accelerate_s_per_token": summary(0.5, "s/token")},
                "ratios": {"660MB_accelerate_over_ours": summary(s_per_token, "x", ">= 2.5"),
                           "660MB_accelerate_over_ours_time_to_result": summary(ttr, "x", ">= 1.2")}}

    old = "\n".join(["# report", "", "## Headline: ours vs each peer inside the memory caps", "", "stale table",
                     "", RECORDS, "", "## All ratios", "", "| case | ratio | median | spread (min–max) | n | goal | met |",
                     "|---|---|---|---|---|---|---|", "", "## Generation", "", "old", ""])
    text = splice_report(old, {"cases": {"generation": case(1.97, 1.31)}})
    assert "stale table" not in text and text.count(RECORDS) == 1
    assert "| 660MB | accelerate disk offload | 0.5 | 0.25 | 1.97 (1.97–1.97, n=1) | >= 2.5 | NO |" in text
    assert "| 660MB | accelerate disk offload, time to result | | | 1.31 (1.31–1.31, n=1) | >= 1.2 | yes |" in text
