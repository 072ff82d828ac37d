"""The quant case's kernel projection: every way it times computes the same projection."""

from __future__ import annotations

import pytest

from streaming_weights.benchmarks import qkernels
from streaming_weights.client import qkernel


@pytest.mark.skipif(qkernel.unavailable() is not None, reason=f"{qkernel.unavailable()}")
def test_each_timed_way_computes_the_projection():
    calls = qkernels._calls(rows=1)
    assert {"bf16_dense", "int8_channel_kernel", "int4_kernel", "int8_channel_dequant_per_use",
            "int4_dequant_per_use", "int8_dequant_per_use"} == set(calls)
    outs = {k: fn().float() for k, fn in calls.items()}
    scale = float(outs["bf16_dense"].abs().max())
    for scheme in ("int8_channel", "int4"):  # the same codes: apart only by bfloat16 rounding (a few 2**-8)
        assert float((outs[f"{scheme}_kernel"] - outs[f"{scheme}_dequant_per_use"]).abs().max()) < 2 ** -6 * scale
    for key, y in outs.items():  # each within its quantization error of the dense projection (int4 ~ 1/15 step)
        assert float((y - outs["bf16_dense"]).abs().max()) < (2 ** -3 if "int4" in key else 2 ** -5) * scale, key
