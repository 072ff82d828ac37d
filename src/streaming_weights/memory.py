"""How much memory the client may use: sizes from text, and ``"auto"`` from cgroups and ``/proc/meminfo``.

``"auto"`` is what this process may still allocate before the kernel reclaims or kills it: the tightest
limit of the memory cgroup it runs in *and every ancestor* (a container's cap usually sits on a parent),
less what that cgroup already uses, or the system's ``MemAvailable``, whichever is smaller. cgroup v1
(``memory.limit_in_bytes`` / ``memory.usage_in_bytes``) and v2 (``memory.max`` / ``memory.current``)
are both read, found through ``/proc/self/cgroup`` and the mount table; hosts can mix the two.
Page cache is charged to the cgroup too, which is why usage, not the process's RSS, is subtracted.

The budget is measured once the model's code is imported and its skeleton exists (the skeleton's cost is then
known and counted in the plan's ``overhead_bytes``; imported code is the process's, not the model's; a tokenizer
is counted when text first needs it). A safety margin (:data:`AUTO_MARGIN_BYTES` plus
:data:`AUTO_MARGIN_FRACTION`) is kept back for what no estimate sees: allocator slack, thread stacks
and per-thread arenas of the I/O and verification threads, the estimates of activations being
estimates — so a budget of "all that is left" does not end in the OOM killer.

The allocator side (glibc): :func:`pin_mmap_threshold` keeps MiB-sized blocks off the heap, where their holes
would stay in the process; :func:`release_free_heap` gives freed heap pages back. Models and the chunker use both.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import parse_memory
from .exceptions import ConfigurationError

#: bytes kept back from "auto" for what no estimate sees (allocator slack, thread arenas). It was twice the ~13 MiB
#: a SmolLM2 client's peak once exceeded its steady RSS; the plan has counted those first-forward buffers itself
#: since (``planner.RUNTIME_BYTES``). Measured at a 660 MB cap with 32 MiB: steady 564 MiB, peak 565, cap 629.
AUTO_MARGIN_BYTES = 16 << 20
#: plus this share of what is left (the planner's estimates of activations are estimates).
AUTO_MARGIN_FRACTION = 0.05
#: a limit at or above this is "no limit" (v1 reports 2**63 rounded down to a page)
_UNLIMITED = 1 << 60


@dataclass(frozen=True)
class MemoryLimit:
    """One bound on what the process may still allocate."""

    where: str  # e.g. "cgroup v1 /sys/fs/cgroup/memory/x" or "MemAvailable"
    available: int  # bytes that may still be allocated under this bound
    limit: int | None = None  # the cgroup's cap (None for MemAvailable)


def parse_size(value: int | str, what: str = "memory_budget") -> int | str:
    """``1234``, ``"600MB"`` (decimal), ``"2GiB"`` (binary) -> bytes; ``"auto"`` stays ``"auto"``.

    Raises:
        ConfigurationError: not a size (the message names ``what``), or a negative number.
    """
    try:
        out = parse_memory(value if isinstance(value, (int, str)) else str(value))
    except ValueError as exc:
        raise ConfigurationError(f"{what}={value!r} is not a size: {exc}") from None
    if isinstance(out, int) and out < 0:
        raise ConfigurationError(f"{what} must be >= 0 bytes, got {value!r}")
    return out


def _mounts(mountinfo: Path) -> list[tuple[str, str, str, str]]:
    """``(fstype, root, mount point, super options)`` of every cgroup mount."""
    out = []
    for line in mountinfo.read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) >= 5 and len(tail) >= 3 and tail[0] in ("cgroup", "cgroup2"):
            out.append((tail[0], fields[3], fields[4], tail[2]))
    return out


def _cgroup_dirs(proc: Path) -> list[tuple[str, Path, Path]]:
    """``(version, cgroup dir, mount point)`` of this process's memory cgroups (v1 and/or v2)."""
    mounts = _mounts(proc / "self" / "mountinfo")
    dirs = []
    for line in (proc / "self" / "cgroup").read_text().splitlines():
        hier, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        version = "v2" if hier == "0" and controllers == "" else "v1"
        if version == "v1" and "memory" not in controllers.split(","):
            continue
        for fstype, root, point, opts in mounts:
            if (version == "v2") != (fstype == "cgroup2") or (version == "v1" and "memory" not in opts.split(",")):
                continue
            rel = os.path.relpath(path, root) if path.startswith(root) else None
            if rel is not None and not rel.startswith(".."):
                dirs.append((version, Path(point) / ("" if rel == "." else rel), Path(point)))
    return dirs


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return None if text == "max" else int(text)


def cgroup_limits(proc: str | os.PathLike[str] = "/proc") -> list[MemoryLimit]:
    """Every finite memory limit on this process: its cgroups and their ancestors, v1 and v2."""
    names = {"v1": ("memory.limit_in_bytes", "memory.usage_in_bytes"), "v2": ("memory.max", "memory.current")}
    out = []
    try:
        dirs = _cgroup_dirs(Path(proc))
    except OSError:
        return out
    for version, leaf, top in dirs:
        d = leaf
        while True:
            limit = _read_int(d / names[version][0])
            usage = _read_int(d / names[version][1])
            if limit is not None and limit < _UNLIMITED and usage is not None:
                out.append(MemoryLimit(f"cgroup {version} {d}", max(0, limit - usage), limit))
            if d == top or d.parent == d:
                break
            d = d.parent
    return out


def mem_available(proc: str | os.PathLike[str] = "/proc") -> MemoryLimit | None:
    """The kernel's estimate of memory available without swapping (``MemAvailable``)."""
    try:
        for line in Path(proc, "meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return MemoryLimit("MemAvailable", int(line.split()[1]) * 1024)
    except OSError:
        pass
    return None


def tightest_limit(proc: str | os.PathLike[str] = "/proc") -> MemoryLimit:
    """The bound that leaves the least memory (cgroups, ancestors, MemAvailable).

    Raises:
        ConfigurationError: nothing could be read (not Linux?): pass a size instead of "auto".
    """
    found = cgroup_limits(proc)
    avail = mem_available(proc)
    if avail is not None:
        found.append(avail)
    if not found:
        raise ConfigurationError('memory_budget="auto" cannot read /proc/meminfo or any cgroup; pass a size '
                                 'such as "2GiB" instead')
    return min(found, key=lambda m: m.available)


def auto_budget(proc: str | os.PathLike[str] = "/proc") -> tuple[int, MemoryLimit]:
    """``"auto"``: what the process may still allocate, less the safety margin; and the bound it came from."""
    limit = tightest_limit(proc)
    left = limit.available
    return max(0, int(left * (1 - AUTO_MARGIN_FRACTION)) - AUTO_MARGIN_BYTES), limit


def status_bytes(key: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``…) in bytes; ``None`` where unreadable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def current_rss() -> int:
    """This process's resident set size now (bytes; 0 where ``/proc/self/status`` is unreadable)."""
    return status_bytes("VmRSS") or 0


def current_anon() -> int:
    """Anonymous memory this process holds now (``RssAnon``: heap, maps, tensors), without the file-backed
    pages of imported libraries (shared and reclaimable); ``VmRSS`` where the kernel does not report it."""
    return status_bytes("RssAnon") or current_rss()


def resolve_budget(value: int | str | None) -> tuple[int | None, str]:
    """The budget in bytes (``None``: none given) and where it came from (for the plan)."""
    if value is None:
        return None, "none"
    parsed = parse_size(value)
    if parsed == "auto":
        budget, limit = auto_budget()
        return budget, f"auto ({limit.where}: {limit.available} bytes left)"
    return int(parsed), "given"


def _libc() -> Any:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def release_free_heap() -> None:
    """Give the malloc heap's free pages back to the kernel (glibc ``malloc_trim``; a no-op elsewhere)."""
    try:
        _libc().malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim this way
        pass


#: glibc ``mallopt`` parameter number of ``M_MMAP_THRESHOLD``
_M_MMAP_THRESHOLD = -3
#: allocations from this size on get their own memory map (freed straight back to the kernel)
MMAP_THRESHOLD = 1 << 20
_threshold_pinned = False


def pin_mmap_threshold() -> None:
    """Serve every allocation of :data:`MMAP_THRESHOLD` or more with its own memory map (glibc; a no-op elsewhere).

    glibc starts at 128 KiB but raises the threshold (up to 32 MiB) each time such a map is freed, so after
    the first forward the activations of a batch (MiB-sized) come from the heap, where freed blocks leave
    holes the process keeps: measured with SmolLM2 and a batch of 8 under a 300 MB budget, peak memory
    varied by 130 MiB between identical runs and exceeded the budget; with the threshold pinned it stayed
    within 7 MiB run to run and below the budget. The chunker pins it too: transformers' conversion stacks each
    layer's experts into fresh multi-MiB tensors, and on the heap their holes grew chunking a 102 MiB MoE
    checkpoint by ~100 MiB (27 MiB with the threshold pinned). Setting it process-wide is a side effect of
    loading a streaming model or chunking one: the price is one ``mmap`` per allocation of 1 MiB or more.
    """
    global _threshold_pinned
    if _threshold_pinned:  # once per process: the setting is process-wide
        return
    _threshold_pinned = True
    try:
        _libc().mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):
        pass
