"""Transfer benchmark: end-to-end unit fetch vs raw loopback TCP of the same bytes, in one run.

    python bench/bench_transfer.py [--mb 256] [--repeats 5]

Builds a chunked model with one large unit, starts ``python -m streaming_weights.weight_server`` in a
subprocess (cache large enough that the unit is served from memory, so storage is not measured), and
times, interleaved:

* raw TCP:     a subprocess ``sendall``s the unit's bytes in 1 MiB pieces; we ``recv_into`` a
               preallocated buffer (the ceiling for any protocol over loopback);
* websockets:  the websockets library's own client receiving the same unit (protocol v1, no verify);
* transport:   ``WebSocketSource`` network only (request, land bytes in the buffer; no verify/decode);
* end-to-end:  ``WebSocketSource.fetch_unit`` (network + BLAKE3 verify + zero-copy decode).

Prints GB/s (best of ``--repeats``) and the ratio of end-to-end to raw TCP. Timings on a shared 2-core
machine are noisy: compare the ratios within one run, not absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

from srv_helpers import build_model, start_server_process  # noqa: E402

from streaming_weights import protocol as proto  # noqa: E402
from streaming_weights.benchmarks import _RAW_SENDER, _process, _raw_tcp_once, free_port  # noqa: E402
from streaming_weights.client.buffers import BufferPool  # noqa: E402
from streaming_weights.client.transport import WebSocketSource  # noqa: E402
from streaming_weights.storage import FilesystemBackend  # noqa: E402



def raw_tcp(port: int, size: int, repeats: int) -> list[float]:
    return [size / _raw_tcp_once(port, size) for _ in range(repeats)]


async def websockets_lib(uri: str, unit: str, repeats: int) -> list[float]:
    from websockets.asyncio.client import connect

    out = []
    async with connect(uri, max_size=None, compression=None) as ws:
        for i in range(repeats):
            t = time.perf_counter()
            await ws.send(proto.encode(proto.Request(i + 1, proto.Op.GET_UNIT, None, unit)))
            size = proto.decode(await ws.recv()).size or 0
            buf = bytearray(size)
            got = 0
            while got < size:
                msg = proto.decode(await ws.recv())
                assert isinstance(msg, proto.Data)
                buf[msg.offset : msg.offset + len(msg.payload)] = msg.payload
                got += len(msg.payload)
            out.append(size / (time.perf_counter() - t))
    return out


async def transport(uri: str, unit: str, repeats: int) -> tuple[list[float], list[float]]:
    net, e2e = [], []
    async with WebSocketSource(uri, timeout_seconds=300) as src:
        manifest = await src.get_manifest(None)
        entry = manifest.unit(unit)
        # As in the streaming engine: a dropped unit's buffer is reused by the next fetch.
        src.buffer_pool = BufferPool(max_bytes=entry.bytes)
        await _fetch_and_drop(src, manifest, unit)
        for _ in range(repeats):
            buf = bytearray(entry.bytes)
            t = time.perf_counter()
            await src._request(proto.Op.GET_UNIT, manifest.name, unit, buffer=buf, expected_size=entry.bytes)
            net.append(entry.bytes / (time.perf_counter() - t))
            del buf
            e2e.append(entry.bytes / await _fetch_and_drop(src, manifest, unit))
    return net, e2e


async def _fetch_and_drop(src: WebSocketSource, manifest, unit: str) -> float:
    t = time.perf_counter()
    fetched = await src.fetch_unit(manifest, unit)
    dt = time.perf_counter() - t
    buf, fetched.buffer, fetched.tensors = fetched.buffer, None, {}
    del fetched
    src.buffer_pool.give(buf)
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=int, default=256, help="unit size in MiB")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "model"
        build_model(FilesystemBackend(d), "bench", {"resident": 4096, "big": args.mb << 20})
        unit_file = d / "units" / "big.safetensors"
        size = unit_file.stat().st_size
        server, port = start_server_process(d, "--cache-size", str(2 * args.mb + 64), "--max-inflight", "4")
        raw_port = free_port()
        try:
            with _process([sys.executable, "-c", _RAW_SENDER, str(unit_file), str(raw_port)], raw_port):
                uri = f"ws://127.0.0.1:{port}"
                asyncio.run(transport(uri, "big", 1))  # warm the server's cache and both processes
                results: dict[str, list[float]] = {"raw": [], "lib": [], "net": [], "e2e": []}
                for _ in range(args.repeats):  # interleave so background load hits every method alike
                    results["raw"] += raw_tcp(raw_port, size, 1)
                    results["lib"] += asyncio.run(websockets_lib(uri, "big", 1))
                    net, e2e = asyncio.run(transport(uri, "big", 1))
                    results["net"] += net
                    results["e2e"] += e2e
        finally:
            server.terminate()
            server.wait()

    touch = []
    for _ in range(3):  # what a fresh receive buffer costs before any byte arrives (page faults)
        t = time.perf_counter()
        buf = bytearray(size)
        touch.append(time.perf_counter() - t)
        del buf
    best = {k: max(v) / 1e9 for k, v in results.items()}
    print(f"unit: {size / 2**20:.0f} MiB, best of {args.repeats}, {os.cpu_count()} CPUs (shared machine: compare ratios)")
    print(f"  raw loopback TCP recv_into         {best['raw']:6.2f} GB/s   1.00")
    print(f"  websockets library client          {best['lib']:6.2f} GB/s   {best['lib'] / best['raw']:.2f}")
    print(f"  WebSocketSource network only       {best['net']:6.2f} GB/s   {best['net'] / best['raw']:.2f}")
    print(f"  WebSocketSource end-to-end         {best['e2e']:6.2f} GB/s   {best['e2e'] / best['raw']:.2f}"
          "   (network + BLAKE3 verify + zero-copy decode)")
    print(f"  (allocating a fresh {size / 2**20:.0f} MiB buffer alone: {min(touch) * 1e3:.0f} ms = "
          f"{size / min(touch) / 1e9:.2f} GB/s; raw TCP reuses one buffer, end-to-end needs a new one per unit)")
    print(f"end-to-end / raw TCP ratio: {best['e2e'] / best['raw']:.2f}")


if __name__ == "__main__":
    main()
