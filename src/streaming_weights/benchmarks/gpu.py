"""Case ``gpu``: the accelerator check (issue 16), ``bench/gpu_check.py``, when this machine has CUDA.

Without a CUDA device the case reports that it was not run here and where to read how to run it; it never
reports a number it did not measure.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from .common import child_env, summarize

TITLE = "GPU check: the accelerator path (issue 16)"
HOW = ("How to run it on an accelerator machine, and what it measures: [GPU.md](GPU.md); the script: "
       "[gpu_check.py](gpu_check.py) (`PYTHONPATH=src python3 bench/gpu_check.py --json out.json`).")
QUICK_ARGS = ["--layers", "2", "--hidden", "256", "--intermediate", "512", "--vocab", "1000", "--repeats", "2"]


def script_path() -> Path | None:
    """``bench/gpu_check.py`` of the repository this package is run from (None when installed without it)."""
    path = Path(__file__).resolve().parents[3] / "bench" / "gpu_check.py"
    return path if path.is_file() else None


def cuda_device() -> str | None:
    """The CUDA device's name, or None when torch sees none."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def not_run(why: str) -> dict[str, Any]:
    return {"title": TITLE, "metrics": {}, "ratios": {}, "unavailable": f"the GPU check was not run here: {why}. "
            "No GPU numbers are reported.", "measured": "nothing on this machine. " + HOW}


def metrics_of(res: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics, ratios) from gpu_check's ``--json`` output."""
    o, bw = res["overlap"], res["overlap"]["bandwidth"]
    metrics = {"fp32_max_relative_error": summarize([res["fp32"]["max_relative_error"]], "rel. error")
               | {"goal": "<= 0.0001"},
               "bf16_greedy_identical": summarize([1.0 if res["bf16"]["ok"] else 0.0], "1 = identical")
               | {"goal": ">= 1"},
               "compute_only_ms": summarize([o["compute_only_s"] * 1e3], "ms"),
               "copy_only_ms": summarize([o["copy_only_s"] * 1e3], "ms"),
               "streamed_ring_ms": summarize([o["streamed_ring_s"] * 1e3], "ms"),
               "streamed_kept_ms": summarize([o["streamed_kept_s"] * 1e3], "ms")}
    if bw.get("ours_gbps") is not None:
        metrics["ours_host_to_device_GBps"] = summarize([bw["ours_gbps"]], "GB/s")
        metrics["plain_pinned_copy_GBps"] = summarize([bw["plain_gbps"]], "GB/s")
        metrics["receive_buffers_pinned"] = summarize([1.0 if bw["receive_buffers_pinned"] else 0.0], "1 = yes")
    ratios = {"ring_forward_over_max_compute_copy": summarize([o["ring_vs_bound"]], "x"),
              "kept_forward_over_compute_only": summarize([o["kept_vs_compute"]], "x")}
    if bw.get("ratio") is not None:
        ratios["ours_copy_over_plain_copy_speed"] = summarize([bw["ratio"]], "x")
    return metrics, ratios


def run(ctx: Any) -> dict[str, Any]:
    device = cuda_device()
    if device is None:
        return not_run("this machine has no CUDA device (torch.cuda.is_available() is False)")
    script = script_path()
    if script is None:
        return not_run("bench/gpu_check.py is not next to this package (installed without the repository)")
    out = ctx.tmp / "gpu_check.json"
    ctx.say(f"gpu: bench/gpu_check.py on {device}")
    cmd = [sys.executable, str(script), "--json", str(out), *(QUICK_ARGS if ctx.quick else [])]
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=1200)
    if not out.is_file():
        tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
        raise RuntimeError(f"gpu_check.py exited with {proc.returncode}: {tail}")
    res = json.loads(out.read_text())
    metrics, ratios = metrics_of(res)
    return {"title": TITLE, "metrics": metrics, "ratios": ratios, "device": device,
            "measured": (f"`{' '.join(['bench/gpu_check.py', *cmd[4:]])}` on {device} ({res['model_mb']:.0f} MB "
                         f"float32 random Llama, {res['layers']} layers); exit status {proc.returncode} (0 = both "
                         "parity checks passed). Each time is the check's own median of its repeats after a "
                         "warm-up (reported here as n = 1). " + HOW)}
