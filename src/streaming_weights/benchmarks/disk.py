"""Reading one large unit from a local chunk directory vs ``dd iflag=direct`` on the same file.

ours = :meth:`StorageSource.fetch_unit` (``O_DIRECT`` reads, several in flight, into a reused unit
buffer; BLAKE3 of every byte while later pieces are read; zero-copy decode), the engine's steady state.
page-cache read = the same file ``readinto`` the buffer through the page cache, then hashed: the path
before issue 26. dd = ``dd if=FILE of=/dev/null bs=4M iflag=direct``, its own reported time. The page
cache is emptied of the file (``posix_fadvise(DONTNEED)``) before every read, the contenders take turns
in each round, and the ratios are paired per round. ``left_in_page_cache_bytes`` is what ``fincore``
finds cached of the file right after each read (a capped client's page cache counts against its cap).

``python -m streaming_weights.benchmarks.transfer --disk [--mb 256] [--repeats 5]`` runs it.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

from .common import MiB, summarize
from .fixtures import write_one_unit_model
from .sandbox import evict


def dd_direct(path: Path) -> float:
    """Seconds ``dd iflag=direct`` reports for reading ``path`` in 4 MiB blocks."""
    out = subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=4M", "iflag=direct"], capture_output=True,
                         text=True, check=True).stderr
    return float(out.strip().splitlines()[-1].split(" copied, ")[1].split(" s")[0])


def cached_bytes(path: Path) -> int | None:
    """Bytes of ``path`` in the page cache (``fincore``), None where fincore is missing."""
    if shutil.which("fincore") is None:
        return None
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)], capture_output=True,
                         text=True, check=True).stdout
    return int(out.split()[0])


async def _fetch(src: Any, manifest: Any) -> float:
    t = time.perf_counter()
    unit = await src.fetch_unit(manifest, "big")
    seconds = time.perf_counter() - t
    buf = unit.buffer
    del unit
    src.buffer_pool.give(buf)
    return seconds


def page_cache_read(path: Path, buf: Any) -> float:
    """Seconds to ``readinto`` ``buf`` through the page cache, then hash it: the path before issue 26."""
    import blake3

    t = time.perf_counter()
    view, got = memoryview(buf), 0
    with open(path, "rb", buffering=0) as f:
        while got < len(view):
            n = f.readinto(view[got:])
            if not n:
                break
            got += n
    blake3.blake3(view[:got]).hexdigest()
    return time.perf_counter() - t


def measure(tmp: Path, mb: int, repeats: int, say: Callable[[str], None]) -> tuple[int, dict[str, list[float]], dict]:
    """(unit bytes, {contender: [GB/s per round]}, {contender: [bytes of the file left in the page cache
    after each of its reads]})."""
    from ..client.buffers import BufferPool, unit_buffer
    from ..client.storage_source import StorageSource
    from ..storage import FilesystemBackend

    model_dir = tmp / "disk-model"
    m = write_one_unit_model(model_dir, mb * MiB)
    path, size = model_dir / m.unit("big").path, m.unit("big").bytes
    seconds: dict[str, list[float]] = {"dd_direct": [], "ours": [], "page_cache_read": []}
    left: list[int | None] = []
    left_by_old: list[int | None] = []
    spare = unit_buffer(size)
    for off in range(0, size, 4096):  # fault it in once, like a reused unit buffer
        spare[off] = 1

    async def rounds() -> None:
        src = StorageSource(FilesystemBackend(model_dir), pool=BufferPool(2 * size))
        manifest = await src.get_manifest(None)
        evict([path])
        await _fetch(src, manifest)  # warm-up: imports, the pool's buffer
        for i in range(repeats):
            say(f"disk: round {i + 1}/{repeats}")
            evict([path])
            seconds["dd_direct"].append(dd_direct(path))
            evict([path])
            seconds["ours"].append(await _fetch(src, manifest))
            left.append(cached_bytes(path))
            evict([path])
            seconds["page_cache_read"].append(page_cache_read(path, spare))
            left_by_old.append(cached_bytes(path))
        await src.close()

    asyncio.run(rounds())
    return size, {k: [size / s / 1e9 for s in v] for k, v in seconds.items()}, {"ours": left, "page_cache_read": left_by_old}


def report(size: int, gbps: dict[str, list[float]], left: dict) -> dict[str, Any]:
    paired = lambda k: [a / b for a, b in zip(gbps[k], gbps["dd_direct"])]  # noqa: E731
    return {
        "unit_bytes": size,
        "metrics": {k: summarize(v, "GB/s") for k, v in gbps.items()},
        "ratios": {"ours_over_dd_direct": summarize(paired("ours"), "x") | {"goal": ">= 0.8"},
                   "page_cache_read_over_dd_direct": summarize(paired("page_cache_read"), "x")},
        "left_in_page_cache_bytes": left,
    }


__all__ = ["cached_bytes", "dd_direct", "measure", "page_cache_read", "report"]
