"""Helpers for the server/transport tests: hand-built chunked models of any size, and a server process."""

from __future__ import annotations

import asyncio
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from streaming_weights.format import Digests, Manifest, UnitEntry, encode_tensors, parse_header, unit_path
from streaming_weights.format.manifest import BlobEntry
from streaming_weights.format.names import MANIFEST_FILE, file_path, join_key
from streaming_weights.benchmarks import free_port
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
        units = []
        for order, (unit, size) in enumerate(unit_sizes.items()):
            data = encode_tensors(unit_tensors(unit, size, seed=order))
            specs, _, _ = parse_header(data)
            d = Digests.of(data)
            units.append(UnitEntry(unit, unit_path(unit), len(data), d.sha256, d.blake3,
                                   role="resident" if order == 0 else "streamed", order=order, tensors=specs))
            await storage.save(join_key(prefix, unit_path(unit)), data)
            del data
        blobs = []
        for fname, content in (files or {}).items():
            d = Digests.of(content)
            blobs.append(BlobEntry(fname, file_path(fname), len(content), d.sha256, d.blake3))
            await storage.save(join_key(prefix, file_path(fname)), content)
        m = Manifest(name=name, architecture="TestArch", model_type="test", config={"test": True}, dtype="float32",
                     units=tuple(units), files=tuple(blobs))
        await storage.save(join_key(prefix, MANIFEST_FILE), m.to_bytes())
        return m

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


def start_server_process(chunks_dir: Path, *extra: str, env: dict | None = None) -> tuple[subprocess.Popen, int]:
    """``python -m streaming_weights.weight_server`` in a subprocess; waits until /healthz answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "streaming_weights.weight_server", "--chunks-dir", str(chunks_dir),
           "--port", str(port), *extra]
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stdout.read().decode() if proc.stdout else ''}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc, port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start")


def approx_mb(n: int) -> int:
    return math.ceil(n / 2**20)
