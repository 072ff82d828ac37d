"""Memory fidelity in fresh processes (VmHWM of the child itself, never ru_maxrss): the plan's bound holds,
depth costs no memory, steady state allocates no unit buffers, and "auto" survives a cgroup cap that
kills a client caching every layer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from streaming_weights import memory
from tests.support.models import chunk, llama

ROOT = Path(__file__).resolve().parents[2]


def run_child(chunks: Path, cgroup: Path | None = None, cap: int = 0, **opts) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "tests.models.memchild", str(chunks), json.dumps(opts)]
    if cgroup is not None:
        cmd += [str(cgroup), str(cap)]
    env = {k: v for k, v in os.environ.items() if k != "SURFING_MEMORY_BUDGET"}  # `-m` from ROOT finds tests/
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)


def measure(chunks: Path, **opts) -> dict:
    proc = run_child(chunks, **opts)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def deep_and_shallow(tmp_path_factory):
    root = tmp_path_factory.mktemp("depth")
    out = {}
    for layers in (6, 24):
        src = llama(root / f"src{layers}", layers=layers, hidden=256, intermediate=1024)
        chunk(src, root / f"chunks{layers}", name=f"deep{layers}")
        out[layers] = root / f"chunks{layers}"
    return out


@pytest.mark.slow  # a fresh child process (torch import) plus chunking SmolLM2: minutes on a shared machine
def test_smollm2_peak_within_the_plan_bound(smollm2_chunks):
    got = measure(smollm2_chunks, cache_size=4, prefetch_count=1)
    plan = got["plan"]
    # The bound is the formula: resident + (K + P + 1) x largest unit + headroom + measured overhead.
    assert plan["bound_bytes"] == (plan["resident_bytes"] + 6 * plan["unit_bytes"] + plan["headroom_bytes"]
                                   + plan["overhead_bytes"])
    assert got["peak"] <= 1.1 * got["bound"], got
    assert got["same"] and got["new_buffers_in_steady_state"] == 0, got


@pytest.mark.slow  # two fresh child processes
def test_depth_does_not_cost_memory(deep_and_shallow):
    six = measure(deep_and_shallow[6], cache_size=2, prefetch_count=1)
    deep = measure(deep_and_shallow[24], cache_size=2, prefetch_count=1)
    unit = deep["plan"]["unit_bytes"]
    assert abs(deep["peak"] - six["peak"]) <= unit, (six["peak"], deep["peak"], unit)
    for got in (six, deep):
        assert got["peak"] <= 1.1 * got["bound"] and got["new_buffers_in_steady_state"] == 0, got
        # a fixed set: never more buffers than units alive at once plus the pool's one spare
        assert got["buffers_allocated"] <= got["plan"]["live_units"] + 1, got


def writable_memory_cgroup() -> tuple[Path | None, str]:
    """A v1 memory cgroup directory of this process where a child cgroup can be made, or why not."""
    if not sys.platform.startswith("linux"):
        return None, "cgroups are Linux-only"
    try:
        dirs = [d for version, d, _ in memory._cgroup_dirs(Path("/proc")) if version == "v1"]
    except OSError as exc:
        return None, f"cannot read this process's cgroups: {exc}"
    if not dirs:
        return None, "no cgroup v1 memory controller here (this test drives v1's memory.limit_in_bytes)"
    if os.geteuid() != 0 or not os.access(dirs[0], os.W_OK):
        return None, f"{dirs[0]} is not writable (needs root)"
    return dirs[0], ""


@pytest.fixture(scope="module")
def big_chunks(tmp_path_factory):
    root = tmp_path_factory.mktemp("capped")
    src = llama(root / "src", layers=16, hidden=512, intermediate=2048)  # 16 x 15.7 MB units
    chunk(src, root / "chunks", name="capped")
    return root / "chunks"


@pytest.mark.slow  # three fresh child processes and a 250 MB model
def test_auto_survives_a_cgroup_cap_that_kills_caching_everything(big_chunks):
    parent, why = writable_memory_cgroup()
    if parent is None:
        pytest.skip(f"cannot create a memory cgroup: {why}")
    cap = 150_000_000  # beyond the runtime: a third of the 16-layer model fits
    results = {}
    for name, opts in {"auto": {"memory_budget": "auto"}, "all": {"cache_size": 16}}.items():
        cg = parent / f"surfing-test-{uuid.uuid4().hex[:8]}"
        cg.mkdir()
        try:
            results[name] = run_child(big_chunks, cg, cap, new_tokens=6, **opts)
        finally:
            cg.rmdir()  # the child has exited: the cgroup is empty
    auto, every = results["auto"], results["all"]
    assert auto.returncode == 0, auto.stderr[-3000:]
    assert every.returncode == -9, f"caching all 16 layers was not OOM-killed: rc={every.returncode}"
    got = json.loads(auto.stdout.strip().splitlines()[-1])
    assert 0 < got["plan"]["cache_size"] < 16 and got["plan"]["budget_bytes"] < cap, got["plan"]
    # identical output: the same model without a cap, in a fresh process
    free = measure(big_chunks, cache_size=16, new_tokens=6)
    assert got["tokens"] == free["tokens"]
