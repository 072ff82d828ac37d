"""Case ``transfer``: one large unit end to end vs raw loopback TCP vs the original hex-in-JSON format.

End to end = :meth:`WebSocketSource.fetch_unit` (network + BLAKE3 verify + zero-copy decode) of a unit's
first verified fetch into a reused receive buffer; refetch = the same once the unit has a fingerprint (the
engine's steady state when a model does not fit); network only = the same request into a new buffer; from
file = the same from a server streaming the unit from its chunk directory.
``python -m streaming_weights.benchmarks.transfer [--mb 256] [--repeats 5]`` runs it alone, pinned (this
process on the first usable CPU, the senders on the second); ``--disk`` measures reading a local chunk
directory against ``dd iflag=direct`` instead (:mod:`.disk`).
"""

from __future__ import annotations

import asyncio
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import blake3

from ..netutil import free_port
from . import disk, hexjson, rawsender
from .common import MiB, module_command, process, summarize, weight_server
from .fixtures import write_one_unit_model
from .sandbox import pinned_here, usable_cpus


async def transport_once(uri: str, sender_pid: int | None = None) -> dict[str, tuple[float, tuple[float, float]]]:
    """{"net": network only, "e2e": first verified fetch, "refetch": a fetch of a unit verified twice before}
    -> (seconds, CPU seconds of that fetch (receiver, sender ``sender_pid``; 0 without it)), unit ``big``
    through WebSocketSource. The refetch is checked against the unit's fingerprint instead of BLAKE3
    (:mod:`streaming_weights.client.fingerprint`): the engine's steady state when a model does not fit."""
    from ..client.buffers import BufferPool
    from ..client.transport import WebSocketSource
    from .. import protocol as proto

    # As in the streaming engine, a dropped unit's receive buffer is reused by the next fetch
    # (steady state of a pass); the first buffer of a run is new, like the engine's first fetch.
    pool = BufferPool(max_bytes=0)
    out: dict[str, tuple[float, tuple[float, float]]] = {}

    async def timed(name: str, fetch: Any) -> Any:
        before, t = _cpu_pair(sender_pid), time.perf_counter()
        got = await fetch
        out[name] = time.perf_counter() - t, _cpu_since(before, sender_pid)
        return got

    async with WebSocketSource(uri, timeout_seconds=600, pool=pool) as src:
        manifest = await src.get_manifest(None)
        entry = manifest.unit("big")
        pool.limit(entry.bytes)
        buf = src.new_buffer(entry.bytes)
        await timed("net", src._request(proto.Op.GET_UNIT, manifest.name, "big", buffer=buf, expected_size=entry.bytes))
        src.buffer_pool.give(buf)
        del buf
        (await timed("e2e", src.fetch_unit(manifest, "big"))).recycle(pool)
        (await src.fetch_unit(manifest, "big")).recycle(pool)  # verified again, and fingerprinted
        unit = await timed("refetch", src.fetch_unit(manifest, "big"))
        assert unit.nbytes == entry.bytes and src.fingerprints.tag_bytes == entry.bytes
        del unit
        return out


def _cpu_pair(pid: int | None) -> tuple[float, float]:
    """CPU seconds used so far by this process and by process ``pid`` (0 without one)."""
    return _cpu_seconds(), _cpu_seconds(pid) if pid else 0.0


def _cpu_since(before: tuple[float, float], pid: int | None) -> tuple[float, float]:
    """CPU seconds (this process, ``pid``) used since :func:`_cpu_pair` returned ``before``."""
    now = _cpu_pair(pid)
    return now[0] - before[0], now[1] - before[1]


def _cpu_seconds(pid: int | None = None) -> float:
    """CPU seconds used so far by this process or by process ``pid`` (all threads; ``pid``'s from the
    scheduler's nanosecond counters, the 10 ms ticks of /proc/PID/stat being too coarse for one fetch)."""
    if pid is None:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # a thread that just ended
    return total / 1e9


class _Rounds:
    """Wall seconds and CPU seconds (receiver, sender) of each contender, round by round."""

    def __init__(self) -> None:
        self.wall: dict[str, list[float]] = {}
        self.cpu: dict[str, list[tuple[float, float]]] = {}

    def add(self, name: str, seconds: float, cpu: tuple[float, float] | None = None) -> None:
        self.wall.setdefault(name, []).append(seconds)
        if cpu is not None:
            self.cpu.setdefault(name, []).append(cpu)

    def sender(self, name: str, pid: int, call: Callable[[], float]) -> None:
        """Time ``call`` (it returns its own seconds), with this process's and ``pid``'s CPU around it."""
        before = _cpu_pair(pid)
        seconds = call()
        self.add(name, seconds, _cpu_since(before, pid))

    def websocket(self, uri: str, pid: int, prefix: str) -> None:
        """One :func:`transport_once` from ``uri``, its fetches named ``prefix`` + net / e2e / refetch."""
        for name, (seconds, cpu) in asyncio.run(transport_once(uri, pid)).items():
            self.add(prefix + name, seconds, cpu)


def measure(tmp: Path, mb: int, repeats: int, say: Callable[[str], None],
            server_cpus: list[int] | None = None) -> tuple[int, dict[str, list[float]], _Rounds]:
    """(unit bytes, {method: [GB/s per round]}, CPU use per round), the methods interleaved so background
    load hits each alike; the senders pinned to ``server_cpus`` when given (the caller pins itself).

    Two weight servers: one holds the unit in its memory cache (``e2e``, ``net``), the other streams it
    from its chunk directory (too big for its cache: ``sendfile``; ``from_file_*``)."""
    m = write_one_unit_model(tmp / "transfer-model", mb * MiB)
    unit_file = tmp / "transfer-model" / m.unit("big").path
    size = m.unit("big").bytes
    raw_port, hex_port = free_port(), free_port()
    r = _Rounds()
    with weight_server(tmp / "transfer-model", 4 * mb + 64, cpus=server_cpus) as (uri, server), \
            weight_server(tmp / "transfer-model", 1, cpus=server_cpus) as (file_uri, file_server), \
            process(module_command("rawsender", str(unit_file), str(raw_port)), raw_port, cpus=server_cpus) as raw, \
            process(module_command("hexjson", str(unit_file), str(hex_port)), hex_port, cpus=server_cpus) as hexs:
        hex_uri = f"ws://127.0.0.1:{hex_port}"
        raw_buf = bytearray(size)  # reused, like the unit buffer of the end-to-end fetch
        rawsender.receive_once(raw_port, size, raw_buf)  # warm every path once (server cache, page cache, imports)
        asyncio.run(transport_once(uri))
        asyncio.run(transport_once(file_uri))
        asyncio.run(hexjson.fetch_once(hex_uri))
        for i in range(repeats):
            say(f"transfer: round {i + 1}/{repeats}")
            r.sender("raw_tcp", raw.pid, lambda: rawsender.receive_once(raw_port, size, raw_buf))
            r.add("blake3", _hash_once(raw_buf))
            r.websocket(uri, server.pid, "")
            r.websocket(file_uri, file_server.pid, "from_file_")
            r.sender("hex_json", hexs.pid, lambda: asyncio.run(hexjson.fetch_once(hex_uri)))
    return size, {k: [size / t / 1e9 for t in v] for k, v in r.wall.items()}, r


def _hash_once(buf: bytearray) -> float:
    """Seconds BLAKE3 takes over ``buf`` on this (the receiver's) core: what verifying adds per byte at least."""
    t0 = time.perf_counter()
    blake3.blake3(buf).digest()
    return time.perf_counter() - t0


def cpu_per_gb(r: _Rounds, size: int) -> dict[str, Any]:
    """CPU milliseconds per GB moved, receiver and sender, per contender: the per-byte work, which
    background load on a shared machine does not change the way it changes the wall time."""
    return {name: {side: summarize([c[k] * 1e3 / (size / 1e9) for c in rounds], "CPU ms per GB")
                   for k, side in enumerate(("receiver", "sender"))} for name, rounds in r.cpu.items()}


def figures(size: int, gbps: dict[str, list[float]], r: _Rounds) -> dict[str, Any]:
    """The case's metrics and ratios (paired per round) from :func:`measure`'s results."""
    ratio = lambda k, base="raw_tcp": summarize([a / b for a, b in zip(gbps[k], gbps[base])], "x")  # noqa: E731
    return {
        "metrics": {
            "raw_tcp_GBps": summarize(gbps["raw_tcp"], "GB/s"),
            "websocketsource_network_only_GBps": summarize(gbps["net"], "GB/s"),
            "websocketsource_end_to_end_GBps": summarize(gbps["e2e"], "GB/s"),
            "websocketsource_refetch_GBps": summarize(gbps["refetch"], "GB/s"),
            "websocketsource_end_to_end_from_file_GBps": summarize(gbps["from_file_e2e"], "GB/s"),
            "websocketsource_refetch_from_file_GBps": summarize(gbps["from_file_refetch"], "GB/s"),
            "original_hex_json_GBps": summarize(gbps["hex_json"], "GB/s"),
            "blake3_GBps": summarize(gbps["blake3"], "GB/s"),
        },
        "ratios": {
            # issue 14's goals, for the pinned setting (the earlier unpinned goal was >= 0.6 of raw); issue 26's
            # goal for both server paths
            "end_to_end_over_raw_tcp": ratio("e2e") | {"goal": ">= 0.8"},
            "refetch_over_raw_tcp": ratio("refetch") | {"goal": ">= 0.8"},
            "end_to_end_from_file_over_raw_tcp": ratio("from_file_e2e") | {"goal": ">= 0.8"},
            "refetch_from_file_over_raw_tcp": ratio("from_file_refetch") | {"goal": ">= 0.8"},
            "network_only_over_raw_tcp": ratio("net"),
            "end_to_end_over_network_only": ratio("e2e", "net") | {"goal": ">= 0.9"},
            "end_to_end_over_hex_json": ratio("e2e", "hex_json"),
        },
        "cpu_ms_per_GB": cpu_per_gb(r, size),
    }


def run(ctx: Any) -> dict[str, Any]:
    mb, repeats = (8, 2) if ctx.quick else (128, 3)
    with pinned_here(ctx.client_cpus):
        size, gbps, rounds = measure(ctx.tmp, mb, repeats, ctx.say, server_cpus=ctx.server_cpus)
        disk_result = disk.report(*disk.measure(ctx.tmp, mb, repeats, ctx.say))
    return {
        "title": "Transfer: one large unit, end to end vs raw TCP vs the original hex-in-JSON format; local disk vs dd",
        "measured": (f"one {size / MiB:.0f} MiB unit over loopback, every sender pinned to CPU {ctx.server_cpus[0]}, "
                     f"the receiver (this process) to CPU {ctx.client_cpus[0]}; {repeats} interleaved rounds after "
                     "one warm-up round. raw TCP = a sender process sendall()s the same bytes, the receiver "
                     "recv_into()s a preallocated buffer. end-to-end = WebSocketSource.fetch_unit (network + BLAKE3 "
                     "verify of each MiB as it lands, inline on the one CPU the receiver may use + zero-copy "
                     "decode) of the unit's first verified fetch into a reused receive buffer; refetch = the same "
                     "fetch of a unit verified twice before, checked against its fingerprint (AES-GMAC, "
                     "client.fingerprint) instead of BLAKE3: the engine's steady state when a model does not fit; "
                     "both from a weight server holding the unit in its memory cache "
                     "(frames sendmsg()ed from it); from file = a weight server whose cache is too small, streaming "
                     "the unit from its chunk directory with sendfile(); network only = the cached request into a "
                     "new buffer. hex-in-JSON = the original project's wire format (unit as hex in one JSON text "
                     "message over websockets, then bytes.fromhex + safetensors load), re-implemented for this "
                     "measurement. Goals from issues 14 and 26 (end to end >= 0.8 of raw TCP, >= 0.9 of network "
                     "only); network only writes into a fresh buffer and pays its page faults, so end to end / "
                     "network only can exceed 1; raw TCP's sender copies the bytes from its memory (sendall), the "
                     "from-file server's sendfile() does not, so its fetches can exceed raw TCP. cpu_ms_per_GB: CPU time of the receiving process and of the "
                     "sending one per GB, the per-byte work (load on a shared box changes it less than the wall "
                     "time). blake3 = hashing the whole received unit once more on the receiver's core (from memory; "
                     "end to end hashes each MiB while it is still in the cache, faster). disk: " + disk.__doc__.split("\n\n")[1].replace("\n", " ")),
        **_with_disk(figures(size, gbps, rounds), disk_result),
        "disk": disk_result,
        "unit_bytes": size,
    }


def _with_disk(fig: dict[str, Any], disk_result: dict[str, Any]) -> dict[str, Any]:
    """The transfer figures with the disk's and the CPU's in the metrics and ratios tables (the report
    shows those two)."""
    for name, sides in fig["cpu_ms_per_GB"].items():
        for side, v in sides.items():
            fig["metrics"][f"{name}_{side}_cpu_ms_per_GB"] = v
    fig["metrics"] |= {f"disk_{k}_GBps": v for k, v in disk_result["metrics"].items()}
    fig["ratios"] |= {f"disk_{k}": v for k, v in disk_result["ratios"].items()}
    return fig


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m streaming_weights.benchmarks.transfer", description=__doc__)
    p.add_argument("--mb", type=int, default=256, help="unit size in MiB")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--disk", action="store_true", help="measure a local chunk directory against dd iflag=direct instead")
    p.add_argument("--json", action="store_true", help="print every figure as JSON")
    a = p.parse_args(argv)
    say = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    cpus = usable_cpus()
    client, server = (cpus[:1], cpus[1:2]) if len(cpus) > 1 else (cpus, None)
    with tempfile.TemporaryDirectory(prefix="surfing-transfer-") as tmp, pinned_here(client, threads=None):
        if a.disk:
            out = disk.report(*disk.measure(Path(tmp), a.mb, a.repeats, say))
        else:
            out = figures(*measure(Path(tmp), a.mb, a.repeats, say, server_cpus=server))
    if a.json:
        print(json.dumps(out, indent=1))
    for group in ("metrics", "ratios"):
        for k, v in out[group].items():
            print(f"{k:45} median {v['median']:.2f} {v['unit']}  (min {v['min']:.2f}, max {v['max']:.2f}; "
                  + ", ".join(f"{x:.2f}" for x in v["values"]) + ")")
    for name, sides in out.get("cpu_ms_per_GB", {}).items():
        print(f"CPU ms per GB, {name:20} " + ", ".join(f"{side} {v['median']:.0f}" for side, v in sides.items()))
    for name, left in out.get("left_in_page_cache_bytes", {}).items():
        print(f"bytes of the file left in the page cache after each read, {name}: {left}")
    print(f"receiver pinned to CPU {client}, senders to {server}; load average {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
