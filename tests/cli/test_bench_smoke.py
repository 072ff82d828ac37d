"""The benchmark harness runs end to end on a tiny model (``surfing bench --quick``), so it cannot rot.

No timing assertions: the box is shared and noisy. Only that every case ran and wrote finite numbers.
"""

from __future__ import annotations

import json
import math

from streaming_weights.benchmarks import CASES, run_suite
from streaming_weights.cli import main as cli_main


def _finite_numbers(case: dict) -> list[float]:
    vals = []
    for group in ("metrics", "ratios"):
        for m in case.get(group, {}).values():
            vals += [m["median"], m["min"], m["max"]]
    return vals


def test_quick_suite_writes_every_case(tiny_chunks, tmp_path):
    src, chunks = tiny_chunks("llama")
    messages: list[str] = []
    out = tmp_path / "bench"
    results = run_suite(out, quick=True, progress=messages.append, chunks_dir=chunks, source_path=src)

    assert messages, "progress callback never called"
    assert set(results["cases"]) == set(CASES)
    for name, case in results["cases"].items():
        assert "error" not in case, f"{name}: {case.get('error')}"
        nums = _finite_numbers(case)
        assert nums, f"{name} reported no numbers"
        assert all(isinstance(x, float) and math.isfinite(x) for x in nums), f"{name}: {nums}"
        assert case["measured"]

    on_disk = json.loads((out / "results.json").read_text())
    assert set(on_disk["cases"]) == set(CASES)
    report = (out / "REPORT.md").read_text()
    for case in results["cases"].values():
        assert case["title"] in report
    assert "2 CPU cores" in report or "CPU cores" in report
    pngs = sorted(p.name for p in out.glob("*.png"))
    for expected in ("transfer.png", "overlap.png", "overlap_stall.png", "cache_policy.png", "memory.png",
                     "cold_start.png", "peers.png", "chunker.png"):
        assert expected in pngs
        assert (out / expected).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the cache-policy curve: order-aware default fetches (L-k)/L of the model per token; LRU everything
    curve = results["cases"]["cache"]["curve"]
    L, total = curve["L"], curve["streamed_bytes"]
    for k, got in zip(curve["sizes"], curve["order_bytes_per_token"]):
        assert abs(got / total - (L - k) / L) < 0.05


def test_cli_bench_rejects_unknown_case(capsys):
    assert cli_main(["bench", "--quick", "--cases", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown --cases nope" in err and "transfer" in err  # one line naming the valid cases
    assert "Traceback" not in err
