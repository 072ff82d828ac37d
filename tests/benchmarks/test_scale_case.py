"""The ``scale`` benchmark case (issue 26 item 6) at its quick (tiny) size: every contender runs and reports its
figures, the lossless rows decode exactly what transformers decodes, the report section and plot render. No
timing assertions (the box is shared). The logit comparison the case reports is checked on its own, quickly."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from streaming_weights.benchmarks import CASES, scale
from streaming_weights.benchmarks.plots import write_plots
from streaming_weights.benchmarks.report import _case_section
from streaming_weights.benchmarks.sandbox import usable_cpus
from streaming_weights.benchmarks.suite import OWN_MODEL


def test_logit_agreement_compares_only_the_steps_whose_prefix_matches(tmp_path):
    ref_logits = torch.tensor([[0.0, 1.0, float("-inf")], [2.0, 0.0, float("-inf")], [0.0, 3.0, float("-inf")]])
    own = ref_logits.clone()
    own[0, 0] = 0.25  # step 0: same prompt, a small difference
    own[1, 1] = 0.5  # step 1: prefix still the reference's
    own[2, 0] = 100.0  # step 2: after a differing token, so not compared
    save_file({"logits": own}, str(tmp_path / "own"))
    got = scale._agreement({"tokens": [1, 2, 1]}, {"tokens": [1, 0, 1]}, ref_logits, tmp_path / "own")
    assert got["tokens_identical"] is False
    assert got["logits_steps_compared"] == 2  # the prompt's step and the one after the first (equal) token
    assert got["logits_max_abs_diff"] == 0.5  # -inf (the masked EOS) in both is not a difference
    assert got["reference_logit_max_abs"] == 2.0


def test_limit_is_bytes_over_the_bandwidth_of_the_link_used():
    bw = {"pipe": 2e9, "disk": 1e9}
    assert scale._limit("server", {"bytes_per_token": 4e9}, bw) == 2.0
    assert scale._limit("local", {"bytes_per_token": 4e9}, bw) == 4.0
    assert scale._limit("accelerate", {"offloaded_bytes": 3e9}, bw) == 3.0
    assert math.isnan(scale._over(1.0, 0.0))  # nothing fetched: no limit to compare with


@pytest.mark.slow
def test_scale_case_runs_at_quick_size_and_reports_every_contender(tmp_path):
    assert "scale" in CASES and "scale" in OWN_MODEL  # `surfing bench --cases scale` builds its own model
    cpus = usable_cpus()
    ctx = SimpleNamespace(quick=True, tmp=tmp_path, say=lambda msg: None, client_cpus=[cpus[0]],
                          server_cpus=[cpus[-1]], cap_kind=None, cap_reason="test: uncapped")
    case = scale.run(ctx)
    assert not [n for n in case["notes"] if "FAILED" in n]  # every contender finished (its error otherwise)
    m, r = case["metrics"], case["ratios"]
    names = [n for n in scale.LABELS if scale.kernel_supported() or not n.endswith("_kernel")]
    for name in names:
        for key in ("time_to_result_s", "s_per_token", "peak_rss_MiB"):
            assert math.isfinite(m[f"{name}_{key}"]["median"]), (name, key)
    for name in scale.LOSSLESS:  # bf16 end to end: the very tokens and logits transformers computes
        assert m[f"{name}_tokens_identical_to_transformers"]["median"] == 1.0, name
        assert m[f"{name}_logits_max_abs_diff"]["median"] == 0.0, name
    for name in ("int8_codes", "int4_codes"):
        assert 0 <= m[f"{name}_logits_max_abs_diff"]["median"] < math.inf
    assert r["accelerate_over_local_time_to_result"]["goal"] == ">= 1.5"
    assert r["accelerate_over_server_time_to_result"]["goal"] == ">= 1.0"
    assert r["accelerate_over_int8_codes_time_to_result"]["goal"] == ">= 5"
    assert m["pipe_raw_tcp_GBps"]["median"] > 0
    assert len(case["tokens"]["transformers"][0]) == scale.TOKENS
    assert "UNCAPPED" in case["measured"]  # an uncapped run says so
    if not scale.kernel_supported():
        assert "not in this build" in case["measured"]

    text = "\n".join(_case_section("scale", case, ["scale.png"]))
    assert "| ours, local chunk directory (bf16) |" in text and "| accelerate disk offload (bf16) |" in text
    plots = write_plots({"cases": {"scale": case}}, tmp_path)
    assert plots == {"scale": ["scale.png"]} and (tmp_path / "scale.png").stat().st_size > 0


def test_merge_into_a_spliced_report_replaces_only_the_cases_that_ran_now(tmp_path):
    from streaming_weights.benchmarks.suite import _write

    old_case = {"title": "MoE old", "measured": "old numbers. Notes of this run: the moe run's note", "metrics": {},
                "ratios": {}, "ran": "earlier", "commit": "abc"}
    (tmp_path / "REPORT.md").write_text("# report\n\n## MoE old\n\nkept as it was\n")
    prior = {"quick": False, "spliced": True, "cases": {"moe": old_case}, "started": "earlier"}
    new_case = {"title": "Scale now", "measured": "new numbers", "metrics": {}, "ratios": {}}
    results = {"quick": False, "started": "now", "commit": "def", "notes": ["this run's note"],
               "cases": {"scale": new_case}}
    _write(results, tmp_path, prior, splice=True)
    text = (tmp_path / "REPORT.md").read_text()
    assert "kept as it was" in text  # the merged case's section is not re-rendered
    assert text.count("this run's note") == 1 and "new numbers" in text
