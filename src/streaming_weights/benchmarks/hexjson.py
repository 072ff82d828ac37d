"""``python -m streaming_weights.benchmarks.hexjson FILE PORT``: the original project's wire format.

Re-implemented only as far as needed to time it: a JSON request, answered by one JSON text message
carrying the serialized unit as a hex string.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time


async def serve(path: str, port: int) -> None:
    from websockets.asyncio.server import serve as ws_serve

    with open(path, "rb") as f:
        data = f.read()

    async def handler(ws) -> None:
        async for raw in ws:
            req = json.loads(raw)
            await ws.send(json.dumps({"type": "component", "component": req["component"], "data": data.hex()}))

    async with ws_serve(handler, "127.0.0.1", port, max_size=None, compression=None):
        await asyncio.Future()


async def fetch_once(uri: str) -> float:
    """One request for unit ``big`` in the hex-in-JSON format, decoded with safetensors; returns the seconds."""
    from safetensors.torch import load as st_load
    from websockets.asyncio.client import connect

    async with connect(uri, max_size=None, compression=None) as ws:
        t = time.perf_counter()
        await ws.send(json.dumps({"type": "get_component", "component": "big"}))
        msg = json.loads(await ws.recv())
        tensors = st_load(bytes.fromhex(msg["data"]))
        dt = time.perf_counter() - t
        del tensors, msg
        return dt


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1], int(sys.argv[2])))
