"""``memory_budget`` sizes and "auto": cgroup v1/v2 limits of the process and its ancestors, MemAvailable."""

from __future__ import annotations

from pathlib import Path

import pytest

from streaming_weights import memory
from streaming_weights.exceptions import ConfigurationError


def fake_proc(tmp: Path, cgroup: str, mountinfo: list[str], meminfo_kb: int = 8_000_000) -> Path:
    proc = tmp / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text(cgroup)
    (proc / "self" / "mountinfo").write_text("\n".join(mountinfo) + "\n")
    (proc / "meminfo").write_text(f"MemTotal: 16000000 kB\nMemAvailable: {meminfo_kb} kB\n")
    return proc


def write(d: Path, **files: str) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (d / name.replace("_", ".", 1)).write_text(text)


@pytest.mark.parametrize("text, want", [("600MB", 600_000_000), ("2GiB", 2 << 30), (1234, 1234), ("auto", "auto")])
def test_parse_size(text, want):
    assert memory.parse_size(text) == want


@pytest.mark.parametrize("text", ["lots", "-5", "12 parsecs"])
def test_parse_size_rejects_with_the_option_named(text):
    with pytest.raises(ConfigurationError, match="memory_budget"):
        memory.parse_size(text)


def test_v1_limit_of_an_ancestor_is_the_tightest(tmp_path):
    # The container's cap sits on the parent; the process's own cgroup is unlimited.
    root = tmp_path / "sys" / "memory"
    write(root / "box", memory_limit_in_bytes=str(500 << 20), memory_usage_in_bytes=str(100 << 20))
    write(root / "box" / "job", memory_limit_in_bytes="9223372036854771712", memory_usage_in_bytes=str(90 << 20))
    proc = fake_proc(tmp_path, "4:memory:/box/job\n3:cpu:/\n",
                     [f"35 31 0:32 / {root} rw,relatime - cgroup cgroup rw,memory"])
    found = memory.tightest_limit(proc)
    assert found.available == 400 << 20 and found.where.endswith("/box") and "v1" in found.where
    budget, _ = memory.auto_budget(proc)
    assert budget == int((400 << 20) * (1 - memory.AUTO_MARGIN_FRACTION)) - memory.AUTO_MARGIN_BYTES


def test_v2_and_v1_mixed_and_a_mount_rooted_below_the_hierarchy(tmp_path):
    v2 = tmp_path / "unified"
    write(v2 / "svc", memory_max="max", memory_current=str(50 << 20))
    write(v2 / "svc" / "app", memory_max=str(300 << 20), memory_current=str(200 << 20))
    v1 = tmp_path / "mem"  # a container's view: the mount's root is its own cgroup
    write(v1, memory_limit_in_bytes=str(1 << 30), memory_usage_in_bytes=str(10 << 20))
    proc = fake_proc(tmp_path, "4:memory:/docker/abc\n0::/svc/app\n",
                     [f"35 31 0:32 /docker/abc {v1} rw - cgroup cgroup rw,memory",
                      f"41 31 0:38 / {v2} rw - cgroup2 cgroup2 rw"])
    limits = memory.cgroup_limits(proc)
    assert sorted(m.available for m in limits) == [100 << 20, (1 << 30) - (10 << 20)]
    assert memory.tightest_limit(proc).where.endswith("svc/app")


def test_mem_available_wins_without_cgroup_limits(tmp_path):
    proc = fake_proc(tmp_path, "0::/\n", [], meminfo_kb=1000)
    assert memory.tightest_limit(proc) == memory.MemoryLimit("MemAvailable", 1000 * 1024)


def test_no_proc_at_all_says_what_to_do(tmp_path):
    with pytest.raises(ConfigurationError, match="pass a size"):
        memory.tightest_limit(tmp_path / "nothing")


def test_auto_on_this_machine_is_below_mem_available():
    budget, where = memory.resolve_budget("auto")
    assert 0 < budget < memory.mem_available().available and where.startswith("auto (")
