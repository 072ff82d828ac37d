"""Case ``transfer``: one large unit end to end vs raw loopback TCP vs the original hex-in-JSON format.

End to end = :meth:`WebSocketSource.fetch_unit` (network + BLAKE3 verify + zero-copy decode) into a
reused receive buffer, as the engine does in steady state; network only = the same request into a new
buffer. ``python -m streaming_weights.benchmarks.transfer [--mb 256] [--repeats 5]`` runs it alone.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from ..netutil import free_port
from . import hexjson, rawsender
from .common import MiB, module_command, process, summarize, weight_server_process
from .fixtures import write_one_unit_model
from .sandbox import pinned_here


async def transport_once(uri: str) -> tuple[float, float]:
    """(network-only seconds, end-to-end seconds) for unit ``big`` through WebSocketSource."""
    from ..client.buffers import BufferPool
    from ..client.transport import WebSocketSource
    from .. import protocol as proto

    # As in the streaming engine, a dropped unit's receive buffer is reused by the next fetch
    # (steady state of a pass); the first buffer of a run is new, like the engine's first fetch.
    pool = BufferPool(max_bytes=0)
    async with WebSocketSource(uri, timeout_seconds=600, pool=pool) as src:
        manifest = await src.get_manifest(None)
        entry = manifest.unit("big")
        pool.limit(entry.bytes)
        buf = src.new_buffer(entry.bytes)
        t = time.perf_counter()
        await src._request(proto.Op.GET_UNIT, manifest.name, "big", buffer=buf, expected_size=entry.bytes)
        net = time.perf_counter() - t
        src.buffer_pool.give(buf)
        del buf
        t = time.perf_counter()
        unit = await src.fetch_unit(manifest, "big")
        e2e = time.perf_counter() - t
        assert unit.nbytes == entry.bytes
        del unit
        return net, e2e


def measure(tmp: Path, mb: int, repeats: int, say: Callable[[str], None],
            server_cpus: list[int] | None = None) -> tuple[int, dict[str, list[float]]]:
    """(unit bytes, {method: [GB/s per round]}), the methods interleaved so background load hits each alike;
    the senders pinned to ``server_cpus`` when given (the caller pins itself)."""
    m = write_one_unit_model(tmp / "transfer-model", mb * MiB)
    unit_file = tmp / "transfer-model" / m.unit("big").path
    size = m.unit("big").bytes
    raw_port, hex_port = free_port(), free_port()
    times: dict[str, list[float]] = {"raw_tcp": [], "e2e": [], "net": [], "hex_json": []}
    with weight_server_process(tmp / "transfer-model", cache_mb=2 * mb + 64, cpus=server_cpus) as uri, \
            process(module_command("rawsender", str(unit_file), str(raw_port)), raw_port, cpus=server_cpus), \
            process(module_command("hexjson", str(unit_file), str(hex_port)), hex_port, cpus=server_cpus):
        hex_uri = f"ws://127.0.0.1:{hex_port}"
        rawsender.receive_once(raw_port, size)  # warm every path once (server cache, page cache, imports)
        asyncio.run(transport_once(uri))
        asyncio.run(hexjson.fetch_once(hex_uri))
        for i in range(repeats):
            say(f"transfer: round {i + 1}/{repeats}")
            times["raw_tcp"].append(rawsender.receive_once(raw_port, size))
            net, e2e = asyncio.run(transport_once(uri))
            times["net"].append(net)
            times["e2e"].append(e2e)
            times["hex_json"].append(asyncio.run(hexjson.fetch_once(hex_uri)))
    return size, {k: [size / t / 1e9 for t in v] for k, v in times.items()}


def run(ctx: Any) -> dict[str, Any]:
    mb, repeats = (8, 2) if ctx.quick else (128, 3)
    with pinned_here(ctx.client_cpus):
        size, gbps = measure(ctx.tmp, mb, repeats, ctx.say, server_cpus=ctx.server_cpus)
    ratio = lambda k: [a / b for a, b in zip(gbps[k], gbps["raw_tcp"])]  # noqa: E731  (paired per round)
    return {
        "title": "Transfer: one large unit, end to end vs raw TCP vs the original hex-in-JSON format",
        "measured": (f"one {size / MiB:.0f} MiB unit over loopback, weight server in its own process serving from "
                     f"its memory cache, every sender pinned to CPU {ctx.server_cpus[0]}, the receiver (this "
                     f"process) to CPU {ctx.client_cpus[0]}; {repeats} interleaved rounds after one warm-up round. raw TCP = a sender "
                     "process sendall()s the same bytes, the receiver recv_into()s a preallocated buffer. "
                     "end-to-end = WebSocketSource.fetch_unit (network + BLAKE3 verify, overlapped with the "
                     "receive + zero-copy decode) into a reused receive buffer, as the engine does in steady "
                     "state; network only = the same request into a new buffer. "
                     "hex-in-JSON = the original project's wire format (unit as hex in one JSON text message "
                     "over websockets, then bytes.fromhex + safetensors load), re-implemented for this measurement. "
                     "Goals from issue 14 (end to end >= 0.8 of raw TCP and >= 0.9 of network only); network "
                     "only writes into a fresh buffer and pays its page faults, so end to end / network only can "
                     "exceed 1. The profile of one fetch and the SO_RCVBUF A/B are in TRANSFER_AND_QUANT.md."),
        "metrics": {
            "raw_tcp_GBps": summarize(gbps["raw_tcp"], "GB/s"),
            "websocketsource_network_only_GBps": summarize(gbps["net"], "GB/s"),
            "websocketsource_end_to_end_GBps": summarize(gbps["e2e"], "GB/s"),
            "original_hex_json_GBps": summarize(gbps["hex_json"], "GB/s"),
        },
        "ratios": {
            # issue 14's goals, for the pinned setting (the earlier unpinned goal was >= 0.6 of raw)
            "end_to_end_over_raw_tcp": summarize(ratio("e2e"), "x") | {"goal": ">= 0.8"},
            "network_only_over_raw_tcp": summarize(ratio("net"), "x"),
            "end_to_end_over_network_only": summarize([a / b for a, b in zip(gbps["e2e"], gbps["net"])], "x")
            | {"goal": ">= 0.9"},
            "end_to_end_over_hex_json": summarize([a / b for a, b in zip(gbps["e2e"], gbps["hex_json"])], "x"),
        },
        "unit_bytes": size,
    }


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m streaming_weights.benchmarks.transfer", description=__doc__)
    p.add_argument("--mb", type=int, default=256, help="unit size in MiB")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="surfing-transfer-") as tmp:
        size, gbps = measure(Path(tmp), a.mb, a.repeats, lambda msg: print(msg, file=sys.stderr))
    for k, v in gbps.items():
        print(f"{k:10} best {max(v):.2f} GB/s, median {summarize(v, 'GB/s')['median']:.2f} GB/s")
    print(f"end-to-end / raw TCP (best): {max(gbps['e2e']) / max(gbps['raw_tcp']):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
