"""The setting the product is for: a memory cap, a cold page cache, one core for the client, one for the server.

- :class:`MemoryCap`: a child cgroup (v1 ``memory`` controller or v2 ``memory.max``) with a hard limit that
  a benchmark child joins before it execs (so its interpreter start-up is charged too). Creating one needs
  root; where it cannot be created, :func:`cap_support` says why and the suite runs uncapped, saying so.
- :func:`evict`: drop a contender's files from the page cache (``posix_fadvise(DONTNEED)`` after a sync)
  so every run reads them cold, as a fresh machine would.
- :func:`pinned`: a ``preexec_fn`` joining the cgroup and pinning the process to given CPUs
  (``sched_setaffinity``), applied between fork and exec.
"""

from __future__ import annotations

import itertools
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

V1_ROOT = Path("/sys/fs/cgroup/memory")
V2_ROOTS = (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup"))
_counter = itertools.count()


def _v2_root() -> Path | None:
    for root in V2_ROOTS:
        ctl = root / "cgroup.controllers"
        if ctl.is_file() and "memory" in ctl.read_text().split():
            return root
    return None


def cap_support() -> tuple[str | None, str]:
    """(``"v1"`` / ``"v2"`` / None, why): which cgroup memory controller this process can create caps in."""
    if os.geteuid() != 0:
        return None, "not root: cannot create a cgroup, runs are uncapped"
    if (V1_ROOT / "memory.limit_in_bytes").is_file() and os.access(V1_ROOT, os.W_OK):
        return "v1", f"cgroup v1 memory controller at {V1_ROOT}"
    root = _v2_root()
    if root is not None and os.access(root, os.W_OK):
        return "v2", f"cgroup v2 memory.max under {root}"
    return None, "no writable cgroup memory controller (v1 or v2): runs are uncapped"


class MemoryCap:
    """A cgroup with a hard memory limit of ``limit`` bytes (RSS + page cache, no swap); a context manager.

    ``procs`` is the file a process writes its pid to in order to join. :attr:`oom_kills` counts the
    kernel's OOM kills inside it (v1 ``memory.oom_control`` / v2 ``memory.events``).

    Raises:
        OSError: the cgroup cannot be created (check :func:`cap_support` first).
    """

    def __init__(self, limit: int) -> None:
        self.limit = int(limit)
        self.kind, _ = cap_support()
        if self.kind is None:
            raise OSError("no writable cgroup memory controller")
        name = f"surfing-bench-{os.getpid()}-{next(_counter)}"
        root = V1_ROOT if self.kind == "v1" else _v2_root()
        assert root is not None
        self.path = root / name

    def __enter__(self) -> MemoryCap:
        self.path.mkdir()
        if self.kind == "v1":
            (self.path / "memory.limit_in_bytes").write_text(str(self.limit))
            swap = self.path / "memory.memsw.limit_in_bytes"
            if swap.exists():  # RAM + swap: a capped process must not escape into swap
                swap.write_text(str(self.limit))
        else:
            (self.path / "memory.max").write_text(str(self.limit))
            if (self.path / "memory.swap.max").exists():
                (self.path / "memory.swap.max").write_text("0")
        return self

    @property
    def procs(self) -> Path:
        return self.path / "cgroup.procs"

    @property
    def oom_kills(self) -> int:
        f = self.path / ("memory.oom_control" if self.kind == "v1" else "memory.events")
        try:
            for line in f.read_text().splitlines():
                key, _, val = line.partition(" ")
                if key == "oom_kill":
                    return int(val)
        except OSError:
            pass
        return 0

    def __exit__(self, *exc: object) -> None:
        try:
            self.path.rmdir()  # every member has exited by now (the suite waits for its children)
        except OSError:
            pass


def evict(paths: Iterable[str | os.PathLike[str]]) -> int:
    """Drop every file under ``paths`` from the page cache; returns the bytes advised away.

    Dirty pages cannot be dropped, so each file is synced first (a file just written by the set-up is
    otherwise still cached). Missing paths are skipped.
    """
    total = 0
    for p in paths:
        root = Path(p)
        files = [root] if root.is_file() else [f for f in root.rglob("*") if f.is_file()] if root.is_dir() else []
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                total += os.fstat(fd).st_size
            finally:
                os.close(fd)
    return total


def usable_cpus() -> list[int]:
    """CPUs this process may run on, in order."""
    return sorted(os.sched_getaffinity(0))


def pinned(cpus: Iterable[int] | None, cap: MemoryCap | None = None) -> Callable[[], None] | None:
    """A ``preexec_fn`` that joins ``cap`` and pins to ``cpus`` (None when there is nothing to do).

    It runs in the forked child before exec: only async-signal-safe work (plain writes and a syscall).
    """
    cpu_set = set(cpus) if cpus is not None else None
    procs = str(cap.procs) if cap is not None else None
    if cpu_set is None and procs is None:
        return None

    def preexec() -> None:
        if procs is not None:
            fd = os.open(procs, os.O_WRONLY)
            try:
                os.write(fd, str(os.getpid()).encode())
            finally:
                os.close(fd)
        if cpu_set:
            os.sched_setaffinity(0, cpu_set)

    return preexec


@contextmanager
def pinned_here(cpus: Iterable[int], threads: int | None = 1) -> Iterator[None]:
    """Pin the calling thread (and the threads it starts meanwhile) to ``cpus`` and torch to ``threads``
    compute threads for the block; both restored afterwards. For cases measured in the suite's process."""
    import torch

    before, before_threads = os.sched_getaffinity(0), torch.get_num_threads()
    os.sched_setaffinity(0, set(cpus))
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)
        torch.set_num_threads(before_threads)
