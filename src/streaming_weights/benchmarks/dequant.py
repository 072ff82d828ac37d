"""Dequantization / dtype-conversion throughput (part of case ``quant``): what the client pays on arrival.

The client turns each fetched unit into its compute dtype with :func:`format.quant.decode_into` (int8 /
int4) or one ``copy_`` (bfloat16). Measured on one weight, one torch thread (the caller pins), rounds
interleaved so background load hits each conversion alike; GB/s counts the float32 output written.
"""

from __future__ import annotations

import time
from typing import Any, Callable

CONVERSIONS = ("int8", "int4", "bf16")


def _timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def conversions(shape: tuple[int, int]) -> dict[str, Callable[[], Any]]:
    """{conversion: a call that converts one ``shape`` weight into a reused float32 output}."""
    import torch

    from ..format.quant import decode_into, encode, quant_spec

    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g) * 0.02
    out = torch.empty_like(w)
    calls: dict[str, Callable[[], Any]] = {}
    for scheme in ("int8", "int4"):
        spec = quant_spec(scheme, tuple(w.shape), "F32")
        stored = encode(w, spec)
        calls[scheme] = lambda stored=stored, spec=spec: decode_into(out, stored, spec)
    bf = w.to(torch.bfloat16)
    calls["bf16"] = lambda: out.copy_(bf)
    return calls


def measure(shape: tuple[int, int], repeats: int) -> dict[str, list[float]]:
    """{conversion: [GB/s of float32 output per round]} for ``repeats`` interleaved rounds (after a warm-up)."""
    calls = conversions(shape)
    nbytes = shape[0] * shape[1] * 4
    for fn in calls.values():
        fn()
    gbps: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(repeats):
        for k, fn in calls.items():
            gbps[k].append(nbytes / _timed(fn) / 1e9)
    return gbps
