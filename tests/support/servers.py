"""Helpers for the server/transport tests: hand-built chunked models of any size, and a server process."""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

from streaming_weights.format import Manifest, ModelBuilder
from streaming_weights.netutil import free_port, wait_for_port
from streaming_weights.storage import StorageBackend


def unit_tensors(name: str, nbytes: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Two float32 tensors totalling about ``nbytes`` with a cheap, position-dependent pattern."""
    n = max(2, nbytes // 4)
    big = torch.arange(n - 1, dtype=torch.float32).add_(seed)
    return {f"{name}.weight": big, f"{name}.bias": torch.tensor([float(seed)], dtype=torch.float32)}


def build_model(storage: StorageBackend, name: str, unit_sizes: dict[str, int], *, prefix: str = "",
                files: dict[str, bytes] | None = None) -> Manifest:
    """Write units of roughly the given sizes plus a manifest to ``storage`` (under ``prefix``)."""

    async def go() -> Manifest:
        # one unit in memory at a time (load tests build large ones); force: the helper always overwrites
        builder = ModelBuilder(storage, prefix, name=name, force=True)
        for order, (unit, size) in enumerate(unit_sizes.items()):
            await builder.add_unit(unit, unit_tensors(unit, size, seed=order),
                                   role="resident" if order == 0 else "streamed")
        for fname, content in (files or {}).items():
            await builder.add_file(fname, content)
        return await builder.finish(architecture="TestArch", model_type="test", config={"test": True})

    if not _in_loop():
        return asyncio.run(go())
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # called from a test's running loop
        return pool.submit(asyncio.run, go()).result()


def _in_loop() -> bool:
    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        return False


def start_server_process(chunks_dir: Path, *extra: str, env: dict | None = None, port: int | None = None,
                         stdout: int | None = subprocess.PIPE) -> tuple[subprocess.Popen, int]:
    """``python -m streaming_weights.weight_server`` over ``chunks_dir`` on ``port`` (a free one by default);
    returns ``(process, port)`` once the port accepts connections. A server that exits first or never listens
    is killed and reported as ``RuntimeError`` (with its output when ``stdout`` is a pipe)."""
    port = port or free_port()
    cmd = [sys.executable, "-m", "streaming_weights.weight_server", "--chunks-dir", str(chunks_dir),
           "--port", str(port), *extra]
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=stdout, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, timeout=60, proc=proc)
    except TimeoutError:
        proc.kill()
        proc.wait(10)
        raise RuntimeError(f"weight server did not listen on port {port} within 60 s") from None
    return proc, port


def approx_mb(n: int) -> int:
    return math.ceil(n / 2**20)
