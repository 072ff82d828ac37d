"""Profile the transfer path as used: weight server pinned to one CPU, client on another.

Runs streaming_weights.benchmarks.transfer's measurement (raw TCP vs network-only vs end to end, interleaved
rounds in one run) and, beside it, the client-side costs the issue asks about: BLAKE3 throughput (one
thread), the page-fault cost of a fresh unit buffer vs a reused one, dequantization / dtype-conversion
throughput (one torch thread), and a cProfile of one end-to-end fetch (per-frame Python overhead).

    .venv/bin/python bench/transfer_profile.py [--mb 64] [--repeats 5] [--server-cpu 0] [--client-cpu 1]

Prints one JSON object (also written to --out if given).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import pstats
import statistics
import tempfile
import time
from pathlib import Path


def best_of(fn, n: int = 5) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def hash_and_fault_costs(size: int) -> dict[str, float]:
    from streaming_weights.client.buffers import unit_buffer
    from streaming_weights.format import blake3_hex

    data = (bytearray(os.urandom(1 << 20)) * ((size >> 20) + 1))[:size]
    out = {"blake3_GBps": size / best_of(lambda: blake3_hex(data)) / 1e9}

    def fresh() -> None:
        buf = unit_buffer(size)
        memoryview(buf)[:] = data  # first touch of every page
        del buf

    reused = unit_buffer(size)
    out["fill_fresh_buffer_GBps"] = size / best_of(fresh) / 1e9
    out["fill_reused_buffer_GBps"] = size / best_of(lambda: memoryview(reused).__setitem__(slice(None), data)) / 1e9
    return out


def conversion_throughput() -> dict[str, float]:
    """GB/s of compute-dtype output written, one torch thread, a SmolLM2 MLP-sized weight [1536, 576]."""
    import torch

    from streaming_weights.format.quant import decode_into, encode, quant_spec

    torch.manual_seed(0)
    w = torch.randn(1536, 576) * 0.02
    out = torch.empty_like(w)
    res = {}
    for scheme in ("int8", "int4"):
        spec = quant_spec(scheme, tuple(w.shape), "F32")
        enc = encode(w, spec)
        res[f"dequant_{scheme}_to_fp32_GBps"] = out.numel() * 4 / best_of(lambda: decode_into(out, enc, spec), 20) / 1e9
    bf = w.to(torch.bfloat16)
    res["bf16_to_fp32_GBps"] = out.numel() * 4 / best_of(lambda: out.copy_(bf), 20) / 1e9
    return res


def profile_one_fetch(uri: str, top: int = 12) -> str:
    from streaming_weights.benchmarks.transfer import transport_once

    prof = cProfile.Profile()
    prof.enable()
    asyncio.run(transport_once(uri))
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(top)
    return s.getvalue()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--mb", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--server-cpu", type=int, default=0)
    p.add_argument("--client-cpu", type=int, default=1)
    p.add_argument("--profile", action="store_true", help="also cProfile one end-to-end fetch")
    p.add_argument("--out", default=None)
    a = p.parse_args()

    import torch

    from streaming_weights.benchmarks.common import MiB, weight_server_process
    from streaming_weights.benchmarks.transfer import measure

    os.sched_setaffinity(0, {a.client_cpu})
    torch.set_num_threads(1)
    result: dict = {"load_average_before": os.getloadavg(), "unit_MiB": a.mb,
                    "server_cpu": a.server_cpu, "client_cpu": a.client_cpu}
    with tempfile.TemporaryDirectory(prefix="surfing-profile-") as tmp:
        size, gbps, _ = measure(Path(tmp), a.mb, a.repeats, lambda msg: None, server_cpus=[a.server_cpu])
        paired = lambda k: [x / r for x, r in zip(gbps[k], gbps["raw_tcp"])]  # noqa: E731
        result["GBps_median"] = {k: statistics.median(v) for k, v in gbps.items()}
        result["GBps_rounds"] = gbps
        result["e2e_over_raw_median"] = statistics.median(paired("e2e"))
        result["refetch_over_raw_median"] = statistics.median(paired("refetch"))
        result["net_over_raw_median"] = statistics.median(paired("net"))
        result["e2e_over_net_median"] = statistics.median([e / n for e, n in zip(gbps["e2e"], gbps["net"])])
        if a.profile:
            from streaming_weights.benchmarks.fixtures import write_one_unit_model

            write_one_unit_model(Path(tmp) / "prof", a.mb * MiB)
            with weight_server_process(Path(tmp) / "prof", cache_mb=2 * a.mb + 64, cpus=[a.server_cpu]) as uri:
                asyncio.run(__import__("streaming_weights.benchmarks.transfer", fromlist=["x"]).transport_once(uri))
                result["profile"] = profile_one_fetch(uri)
    result["client_costs"] = hash_and_fault_costs(size)
    result["conversion"] = conversion_throughput()
    result["load_average_after"] = os.getloadavg()
    text = json.dumps(result, indent=1)
    print(text)
    if a.out:
        Path(a.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
