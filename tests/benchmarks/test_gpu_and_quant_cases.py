"""The report's GPU section and the quant case's dequantization figures, without running the whole suite.

The GPU case must say it was not run when there is no CUDA device (never a number), and read the
numbers of ``bench/gpu_check.py --json`` when it does run: here the script runs on the CPU with a tiny
model, standing in for the accelerator, so the field names the case reads are the ones the script writes.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from streaming_weights.benchmarks import dequant, gpu
from streaming_weights.benchmarks.report import _case_section


def _ctx(tmp_path: Path) -> SimpleNamespace:
    return SimpleNamespace(quick=True, tmp=tmp_path, say=lambda msg: None)


def test_without_cuda_the_gpu_section_says_not_run_and_links_how(monkeypatch, tmp_path):
    monkeypatch.setattr(gpu, "cuda_device", lambda: None)
    case = gpu.run(_ctx(tmp_path))
    assert not case["metrics"] and not case["ratios"]
    text = "\n".join(_case_section("gpu", case, []))
    assert "not run here" in text and "no CUDA device" in text
    assert "(GPU.md)" in text and "(gpu_check.py)" in text
    assert "| metric |" not in text  # no table of numbers that were not measured


def test_gpu_case_reads_what_gpu_check_writes(monkeypatch, tmp_path):
    """One run of bench/gpu_check.py on the host with a tiny model (on an accelerator it runs the same way with
    --device cuda): the script's own checks (build, serve, parity fp32 + bf16 greedy, timings, the plan's
    device part) and the case reading its --json."""
    if gpu.script_path() is None:
        pytest.skip("bench/gpu_check.py is not in this checkout")
    monkeypatch.setattr(gpu, "cuda_device", lambda: "cpu (stand-in for a GPU)")
    monkeypatch.setattr(gpu, "QUICK_ARGS", ["--device", "cpu", "--layers", "2", "--hidden", "64", "--intermediate",
                                            "128", "--vocab", "300", "--seq", "16", "--repeats", "1"])
    runs: list[subprocess.CompletedProcess] = []
    real_run = subprocess.run

    def recorded(*args, **kw):
        runs.append(real_run(*args, **kw))
        return runs[-1]

    monkeypatch.setattr(gpu.subprocess, "run", recorded)
    case = gpu.run(_ctx(tmp_path))
    (proc,) = runs
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert res["fp32"]["ok"] and res["fp32"]["max_relative_error"] <= 1e-4
    assert res["bf16"]["ok"] and len(res["bf16"]["streamed"]) == 16
    assert res["overlap"]["device_part"]["device"] == "cpu" and res["overlap"]["compute_only_s"] > 0
    assert "fp32 parity" in proc.stdout and "bf16 greedy over 16 tokens: identical" in proc.stdout

    assert "unavailable" not in case
    m = case["metrics"]
    assert m["fp32_max_relative_error"]["median"] <= 1e-4 and m["bf16_greedy_identical"]["median"] == 1.0
    assert "ours_host_to_device_GBps" not in m  # compute on the host: no copies, so no bandwidth figure
    for entry in [*m.values(), *case["ratios"].values()]:
        assert entry["n"] == 1 and math.isfinite(entry["median"])
    assert "exit status 0" in case["measured"]


def test_dequant_throughput_is_measured_per_conversion():
    gbps = dequant.measure((64, 128), repeats=2)
    assert set(gbps) == set(dequant.CONVERSIONS)
    assert all(len(v) == 2 and all(x > 0 and math.isfinite(x) for x in v) for v in gbps.values())
