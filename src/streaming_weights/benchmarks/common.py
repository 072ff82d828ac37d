"""Pieces every benchmark case shares: summaries, child processes, the weight-server process, prompts."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator

from ..netutil import free_port, wait_for_port
from .sandbox import MemoryCap, pinned

Progress = Callable[[str], None]
MiB = 1 << 20
PACKAGE = __name__.rsplit(".", 1)[0]  # streaming_weights.benchmarks


def machine_description() -> str:
    import torch

    gpu = f"GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU"
    return (f"{os.cpu_count()} CPU cores ({platform.machine()}, shared with other jobs: noisy), {gpu}, "
            f"loopback TCP; Python {platform.python_version()}")


def summarize(values: list[float], unit: str) -> dict[str, Any]:
    """Median and spread of repeated measurements."""
    vals = [float(v) for v in values]
    if not vals:
        return {"unit": unit, "n": 0, "median": float("nan"), "min": float("nan"), "max": float("nan"),
                "values": []}
    return {"unit": unit, "n": len(vals), "median": statistics.median(vals), "min": min(vals), "max": max(vals),
            "values": vals}


def child_env() -> dict[str, str]:
    """The environment of a benchmark child process: this package importable, no network, quiet tokenizers."""
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def module_command(module: str, *args: str) -> list[str]:
    """``python -m streaming_weights.benchmarks.<module> ARGS`` (child programs are modules, never strings)."""
    return [sys.executable, "-m", f"{PACKAGE}.{module}", *args]


@contextmanager
def process(cmd: list[str], port: int, timeout: float = 90.0,
            cpus: list[int] | None = None) -> Iterator[subprocess.Popen]:
    """Run ``cmd`` (pinned to ``cpus`` if given) until the block ends; yields once it listens on ``port``.
    Its output goes to a temporary file (a pipe nobody reads would block a chatty child) whose tail is
    shown if it exits early."""
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, env=child_env(), stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=pinned(cpus))
        try:
            try:
                wait_for_port(port, proc=proc, timeout=timeout)
            except (RuntimeError, TimeoutError) as exc:
                log.seek(0)
                tail = log.read().decode(errors="replace")[-2000:]
                raise RuntimeError(f"{' '.join(cmd[2:4])}: {exc}; output: {tail}") from None
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextmanager
def weight_server(chunks_dir: Path | str, cache_mb: float, *extra: str,
                  cpus: list[int] | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """``python -m streaming_weights.weight_server`` in its own process (pinned to ``cpus`` if given);
    yields (its ws:// URI, the process). ``extra``: more ``surfing serve`` flags (``--max-rate 1Gbit``)."""
    port = free_port()
    cmd = [sys.executable, "-m", "streaming_weights.weight_server", "--chunks-dir", str(chunks_dir),
           "--port", str(port), "--cache-size", str(int(cache_mb)), "--max-inflight", "32", "--quiet", *extra]
    with process(cmd, port, cpus=cpus) as proc:
        yield f"ws://127.0.0.1:{port}", proc


@contextmanager
def weight_server_process(chunks_dir: Path | str, cache_mb: float, *extra: str,
                          cpus: list[int] | None = None) -> Iterator[str]:
    """Like :func:`weight_server`, yielding only the URI."""
    with weight_server(chunks_dir, cache_mb, *extra, cpus=cpus) as (uri, _):
        yield uri


def run_child(kind: str, args: dict[str, Any], timeout: float, *, cap: int | None = None,
              cpus: list[int] | None = None, module: str = "child") -> dict[str, Any]:
    """Run measurement ``kind`` in a fresh interpreter (``benchmarks.<module>``, default ``child``); returns
    its JSON result.

    ``cap``: bytes of a cgroup memory limit the child runs inside (from exec on; None = uncapped);
    ``cpus``: CPUs it is pinned to. A child the cap OOM-kills returns ``{"error": ..., "oom": True}``.
    """
    with tempfile.TemporaryDirectory(prefix="surfing-bench-child-") as tmp, \
            (MemoryCap(cap) if cap is not None else nullcontext()) as cgroup:
        out = Path(tmp) / "result.json"
        cmd = module_command(module, kind, json.dumps(args), str(out))
        try:
            proc = subprocess.run(cmd, env=child_env(), capture_output=True, timeout=timeout,
                                  preexec_fn=pinned(cpus, cgroup))
        except subprocess.TimeoutExpired:
            return {"error": f"{kind} did not finish within {timeout:.0f} s", "timeout": timeout,
                    "tokens": args.get("tokens")}
        if cgroup is not None and cgroup.oom_kills:
            return {"error": f"{kind} was OOM-killed by the {cap / MiB:.0f} MiB memory cap", "oom": True}
        if proc.returncode != 0 or not out.is_file():
            tail = (proc.stderr or b"").decode(errors="replace").strip().splitlines()[-8:]
            return {"error": f"{kind} exited with {proc.returncode}: " + " | ".join(tail)}
        return json.loads(out.read_text())


def prompt_ids(vocab: int, length: int, seed: int = 7) -> Any:
    """A fixed random prompt of token ids (ids 0-2 are left out: pad/bos/eos of the test models)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, max(4, vocab - 1), (1, length), generator=g)


def unit_bound(manifest: Any, cache: int, prefetch: int) -> int:
    """A streaming client's weight bound: resident parts + (cache + prefetch + 1) x the largest unit."""
    largest = max(u.bytes for u in manifest.streamed)
    return sum(u.bytes for u in manifest.resident) + (cache + prefetch + 1) * largest
