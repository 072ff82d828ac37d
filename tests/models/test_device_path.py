"""The device path on the CPU: device="cpu" explicitly, the missing-device error before any fetch, and the
CUDA code path (pinned-style host buffers, copies on a copy stream, events, the device tier in front of the
host tier) run against a recording fake device whose memory is host memory."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from streaming_weights import StreamingLlamaModel
from streaming_weights.config import StreamingConfig
from streaming_weights.exceptions import ConfigurationError
from streaming_weights.models.placement import device_units_for, move_loaded
from streaming_weights.testing import FakeSource
from tests.support.fakedevice import FakeDeviceOps

IDS = torch.tensor([[5, 17, 33, 2, 9, 41, 7]])
LAYERS = 4


@pytest.fixture(scope="module")
def llama(tiny_chunks):
    src, chunks = tiny_chunks("llama", layers=LAYERS)
    ref = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    return chunks, ref


def logits_of(m) -> torch.Tensor:
    with torch.no_grad():
        return m.hf_model(input_ids=IDS).logits


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
@pytest.mark.parametrize("spec", ["cuda", "cuda:0"])
def test_missing_device_raises_before_anything_is_fetched(llama, spec):
    chunks, _ = llama
    src = FakeSource(chunks_dir=chunks)
    with pytest.raises(ConfigurationError, match="no CUDA device"):
        StreamingLlamaModel("llama", src, device=spec)
    assert src.requests == []  # not even the manifest


def test_device_from_the_environment(llama, monkeypatch):
    chunks, _ = llama
    monkeypatch.setenv("SURFING_DEVICE", "gpu")
    src = FakeSource(chunks_dir=chunks)
    with pytest.raises(ConfigurationError, match="device must be"):
        StreamingLlamaModel("llama", src)
    assert src.requests == []
    assert StreamingConfig.from_env({"SURFING_DEVICE": "cuda:1"}).device == "cuda:1"


def test_explicit_cpu_is_todays_path(llama):
    chunks, ref = llama
    with StreamingLlamaModel("llama", FakeSource(chunks_dir=chunks), device="cpu", cache_size=1) as m:
        out = logits_of(m)
        info = m.get_cache_info()
        pool = m.engine.pool  # a ready-built source keeps its own buffers: the engine's pool is for those it builds
    torch.testing.assert_close(out, ref(input_ids=IDS).logits.detach(), rtol=0, atol=1e-5)
    part = info["plan"]["device"]
    assert part["device"] == "cpu" and part["mode"] == "host" and part["copies"] == 0
    assert type(pool).__name__ == "BufferPool"


def test_ring_copies_next_unit_while_this_one_computes(llama):
    """Device smaller than the model: the ring. Outputs exact; every streamed unit crosses once per pass in
    one copy on the copy stream; compute waits on each copy's event; the copy of unit i+1 is issued before
    unit i is released; host buffers are pinned-style views and reused, never while a copy reads them."""
    chunks, ref = llama
    ops = FakeDeviceOps()
    # a location the engine opens itself: its sources are built with the engine's (pinned-style) pool
    with StreamingLlamaModel("llama", str(chunks), device=ops, cache_size=LAYERS, prefetch_count=1) as m:
        m.engine.placement.use_ring()  # as a small device is sized (see test_device_budget_rules)
        ops.log.clear()
        releases: list[str] = []
        real_release = m.engine.placement.release

        def release(name, host_release):
            ops.log.append(("release", name, None))
            releases.append(name)
            real_release(name, host_release)

        m.engine.placement.release = release
        first, second = logits_of(m), logits_of(m)
        stats = m.engine.placement.stats
        pool = m.engine.source.buffer_pool
    want = ref(input_ids=IDS).logits.detach()
    torch.testing.assert_close(first, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(second, want, rtol=0, atol=1e-5)
    # each unit crosses once per pass, plus the next pass's first unit, staged behind the last one
    assert stats.copies == 2 * LAYERS + 1 and stats.device_hits == 0
    assert stats.staged >= LAYERS  # the second pass has every next unit in the host tier: all staged
    log = ops.log
    copied = {e[2]: i for i, e in enumerate(log) if e[:2] == ("record", "copy")}  # event after each copy
    computed = {e[2]: i for i, e in enumerate(log) if e[:2] == ("record", "compute")}  # after a unit's compute
    compute_waits = [(i, e[2]) for i, e in enumerate(log) if e[:2] == ("wait_event", "compute")]
    assert len(compute_waits) == 2 * LAYERS and all(copied[ev] < i for i, ev in compute_waits)
    # the copy into a ring slot waits for the compute of the unit released last (bounded device memory)
    gates = [(i, e[2]) for i, e in enumerate(log) if e[:2] == ("wait_event", "copy")]
    assert len(gates) >= LAYERS and all(computed[ev] < i for i, ev in gates)
    # overlap: in the second pass the copy of layer i+1 is recorded before layer i is released
    second_pass = log[[i for i, e in enumerate(log) if e == ("release", f"model.layers.{LAYERS - 1}", None)][0]:]
    for i in range(LAYERS - 1):
        rel = second_pass.index(("release", f"model.layers.{i}", None))
        assert any(e[0] == "record" for e in second_pass[:rel]), f"no copy ahead of releasing layer {i}"
    # a host buffer is given back only after the host waited for the copy reading it
    assert len(ops.kinds("host_wait")) >= 2 * LAYERS
    assert type(m.engine.source.buffer_pool).__name__ == "HostBufferPool" and pool.allocated >= 1


def test_device_that_fits_the_model_keeps_every_unit(llama):
    """Device large enough: after the first pass every streamed unit stays on the device, so later passes
    fetch nothing and copy nothing; the plan shows the device part."""
    chunks, ref = llama
    ops = FakeDeviceOps()
    src = FakeSource(chunks_dir=chunks)
    with StreamingLlamaModel("llama", src, device=ops, cache_size=0, prefetch_count=1) as m:
        first = logits_of(m)
        fetched, copies = len(src.fetched()), m.engine.placement.stats.copies
        second = logits_of(m)
        info = m.get_cache_info()
        stats = m.engine.placement.stats
    want = ref(input_ids=IDS).logits.detach()
    torch.testing.assert_close(first, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(second, want, rtol=0, atol=1e-5)
    assert copies == LAYERS and stats.copies == LAYERS and stats.device_hits == LAYERS
    assert len(src.fetched()) == fetched  # second pass: nothing from the network
    part = info["plan"]["device"]
    assert part["mode"] == "keep-all" and part["streamed_units"] == LAYERS and part["copy_stream"]
    assert part["resident_bytes"] > 0 and part["bound_bytes"] >= part["resident_bytes"] + part["streamed_bytes"]


def test_resident_parts_and_ties_move_once():
    """move_loaded moves each loaded tensor once (tied weights stay one tensor), leaves meta ones alone."""
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight  # tied
    with torch.device("meta"):
        streamed = torch.nn.Linear(4, 4)
    root = torch.nn.ModuleDict({"emb": emb, "head": head, "block": streamed})
    root.register_buffer("inv_freq", torch.ones(2), persistent=False)
    moved = move_loaded(root, torch.device("meta"))  # any other device will do
    assert root["head"].weight is root["emb"].weight and root["emb"].weight.device.type == "meta"
    assert isinstance(root["emb"].weight, torch.nn.Parameter) and root.inv_freq.device.type == "meta"
    assert moved == (10 * 4 + 2) * 4  # the tied weight counted once; meta parameters not at all


def test_device_budget_rules():
    units = [100, 100, 100, 100]
    assert device_units_for(None, 0, units) is None  # host: the host tier's plan bounds it
    assert device_units_for(1000, 0, units) is None  # 400 <= 900 usable: keep all
    assert device_units_for(350, 0, units) == 2  # 315 usable: the ring (3 units = 300)
    with pytest.raises(ConfigurationError, match=r"cuda:0 .* below the minimum of 444 MiB"):  # (300 + 100) / 0.9
        device_units_for(400 << 20, 100 << 20, [u << 20 for u in units], "cuda:0")  # 260 MiB left for 300


# bench/gpu_check.py's logic on the host (build, serve, parity fp32 + bf16 greedy, timings, the plan's device
# part): tests/benchmarks/test_gpu_and_quant_cases.py::test_gpu_case_reads_what_gpu_check_writes runs it once.


def test_gpu_check_refuses_a_missing_device():
    import subprocess
    import sys
    from pathlib import Path

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    script = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.py"
    proc = subprocess.run([sys.executable, str(script), "--device", "cuda"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "no CUDA device" in proc.stderr


def test_cli_device_flag_reaches_the_model(llama, capsys):
    from streaming_weights.cli import main

    chunks, _ = llama
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    code = main(["generate", "--server", str(chunks), "--model", "llama", "--device", "cuda", "--prompt", "hi"])
    assert code == 2 and "no CUDA device" in capsys.readouterr().err


def test_inputs_and_generate_arguments_go_to_the_device():
    from streaming_weights.models.placement import DevicePlacement

    ops = FakeDeviceOps()
    ops.device = torch.device("meta")  # any device other than the inputs' one
    seen = {}

    def generate(input_ids=None, attention_mask=None, max_new_tokens=0):
        seen.update(input_ids=input_ids, attention_mask=attention_mask, n=max_new_tokens)

    wrapped = DevicePlacement(ops)._on_device(generate)
    wrapped(input_ids=IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=3)
    assert seen["input_ids"].device.type == "meta" and seen["attention_mask"].device.type == "meta"
    assert seen["n"] == 3 and wrapped.__name__ == "generate"


@pytest.mark.parametrize("where", ["weight server", "chunk directory"])
def test_real_sources_receive_into_device_host_buffers(llama, where):
    """WebSocket and storage receivers write into the device's host buffers (memoryviews) and the unit is
    copied from them: outputs exact, buffers reused across passes."""
    from tests.support.streaming import served

    chunks, ref = llama
    ops = FakeDeviceOps()

    def run(location: str) -> tuple[torch.Tensor, Any]:
        with StreamingLlamaModel("llama", location, device=ops, cache_size=0, prefetch_count=1) as m:
            m.engine.placement.use_ring()
            outs = [logits_of(m) for _ in range(2)]
            torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
            return outs[0], m.engine.source.buffer_pool

    if where == "weight server":
        with served(chunks) as uri:
            out, pool = run(uri)
    else:
        out, pool = run(str(chunks))
    torch.testing.assert_close(out, ref(input_ids=IDS).logits.detach(), rtol=0, atol=1e-5)
    assert ops.host_buffers >= 1 and pool.reused >= 1


def test_compute_dtype_on_the_device_path(tiny_chunks):
    """dtype="bfloat16": units converted on arrival (into the device's host buffers), copied, computed in
    bf16 — the same logits as transformers' from_pretrained(dtype=bfloat16)."""
    src_dir, chunks = tiny_chunks("llama", layers=LAYERS)
    ref = AutoModelForCausalLM.from_pretrained(str(src_dir), dtype=torch.bfloat16).eval()
    ops = FakeDeviceOps()
    with StreamingLlamaModel("llama", FakeSource(chunks_dir=chunks), device=ops, dtype="bfloat16",
                             cache_size=0) as m:
        m.engine.placement.use_ring()
        out = logits_of(m)
        copied = m.engine.placement.stats.copy_bytes
    with torch.no_grad():
        want = ref(input_ids=IDS).logits
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert copied > 0
