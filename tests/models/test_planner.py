"""Memory planner: budget -> prefetch window, kept units, whole model; the bound; the minimum; the model wiring."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from streaming_weights import StreamingConfig, StreamingLlamaModel
from streaming_weights.exceptions import ConfigurationError
from streaming_weights.format import Manifest
from streaming_weights.models.planner import RUNTIME_BYTES, headroom_of, plan_memory

IDS = torch.tensor([[5, 17, 33, 2, 9, 41, 7]])


@pytest.fixture(scope="module")
def tiny(tiny_chunks):
    src, chunks = tiny_chunks("llama", layers=6)
    return src, chunks, Manifest.from_bytes((chunks / "manifest.json").read_bytes())


def sizes(m: Manifest) -> tuple[int, int, int]:
    plan = plan_memory(m, StreamingConfig(), budget=None)
    return plan.resident_bytes, plan.unit_bytes, plan.headroom_bytes


def test_budget_fills_prefetch_then_cache_then_whole_model(tiny):
    _, _, m = tiny
    res, unit, head = sizes(m)
    minimum = res + unit + head
    cfg = StreamingConfig(prefetch_count=2)
    assert plan_memory(m, cfg, budget=minimum).as_dict()["cache_size"] == 0
    one = plan_memory(m, cfg, budget=minimum + unit)  # one spare slot: the prefetch window comes first
    assert (one.prefetch_count, one.cache_size) == (1, 0)
    three = plan_memory(m, cfg, budget=minimum + 3 * unit + unit // 2)
    assert (three.prefetch_count, three.cache_size) == (2, 1)
    assert three.bound_bytes == res + 4 * unit + head <= three.budget_bytes
    whole = plan_memory(m, cfg, budget=minimum + 5 * unit)  # 6 units alive = all 6 layers: keep them all
    assert whole.cache_size == 6 and whole.bound_bytes == res + 6 * unit + head
    assert plan_memory(m, cfg, budget=10 * minimum).bound_bytes == whole.bound_bytes


def test_budget_below_minimum_names_it(tiny):
    _, _, m = tiny
    res, unit, head = sizes(m)
    with pytest.raises(ConfigurationError, match=rf"below the minimum .*\({res + unit + head} bytes\)"):
        plan_memory(m, StreamingConfig(), budget=res + unit + head - 1)


def test_explicit_cache_size_overrides_and_the_bound_is_honest(tiny):
    _, _, m = tiny
    res, unit, head = sizes(m)
    plan = plan_memory(m, StreamingConfig(cache_size=4, prefetch_count=1), budget=res + unit + head)
    assert (plan.source, plan.cache_size, plan.prefetch_count) == ("cache_size", 4, 1)
    assert plan.bound_bytes == res + (4 + 1 + 1) * unit + head
    default = plan_memory(m, StreamingConfig(), budget=None)
    assert (default.source, default.cache_size) == ("default", 3)


def test_headroom_grows_with_sequence_and_batch(tiny):
    _, _, m = tiny
    hr = headroom_of(m)
    c = m.config
    # KV cache: keys + values of every layer, float32
    assert hr.kv_per_token == 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * (
        c["hidden_size"] // c["num_attention_heads"]) * 4
    per = hr.bytes(64, 1) - RUNTIME_BYTES  # torch's runtime buffers are there once, whatever the batch
    assert hr.bytes(128, 2) - RUNTIME_BYTES > 2 * per and hr.bytes(64, 2) - RUNTIME_BYTES == 2 * per
    budget = plan_memory(m, StreamingConfig(), budget=None).bound_bytes + 100 * per
    plan = plan_memory(m, StreamingConfig(), budget=budget)
    assert plan.max_batch(64) >= 100 > plan.max_batch(128)


def test_model_runs_under_a_budget_with_identical_output(tiny):
    src, chunks, m = tiny
    ref = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    res, unit, head = sizes(m)
    with torch.no_grad():
        want = ref(IDS).logits
    slack = 16 << 20  # the engine adds the measured overhead (tokenizer, skeleton, first-use set-up)
    for budget in [res + unit + head + slack, f"{(res + 3 * unit + head + slack) / 1e6:.6f}MB", 100 * (res + head)]:
        with StreamingLlamaModel("llama", str(chunks), memory_budget=budget) as model:
            for _ in range(2):
                with torch.no_grad():
                    got = model.hf_model(IDS).logits
                assert torch.allclose(got, want, atol=1e-5), budget
            info = model.get_cache_info()
            plan = info["plan"]
            again = plan_memory(m, StreamingConfig(), budget=plan["budget_bytes"],
                                overhead_bytes=plan["overhead_bytes"])
            assert plan["cache_size"] == again.cache_size == info["max_cache_size"]
            assert plan["bound_bytes"] == again.bound_bytes <= plan["budget_bytes"]
            assert {"budget_bytes", "bound_bytes", "resident", "streamed", "prefetch_count", "host"} <= set(plan)
            assert info["peak_live_units"] <= plan["live_units"]
            if plan["cache_size"] == 6:  # the whole model fits: the second pass fetched nothing
                assert info["fetches"] == 6
    assert plan["cache_size"] == 6


def test_memory_budget_from_env_and_explicit_cache_size_wins(tiny, monkeypatch):
    _, chunks, m = tiny
    res, unit, head = sizes(m)
    monkeypatch.setenv("SURFING_MEMORY_BUDGET", str(res + unit + head + (16 << 20)))
    with StreamingLlamaModel("llama", str(chunks)) as model:
        assert model.get_cache_info()["plan"]["source"] == "budget"
    with StreamingLlamaModel("llama", str(chunks), cache_size=5) as model:
        assert model.get_cache_info()["plan"]["cache_size"] == 5 and model.cache_size == 5
    monkeypatch.setenv("SURFING_MEMORY_BUDGET", "10")
    with pytest.raises(ConfigurationError, match="below the minimum"):
        StreamingLlamaModel("llama", str(chunks))


def test_inspect_prints_the_plan_and_names_the_minimum(tiny, capsys):
    from streaming_weights.cli import main

    _, chunks, m = tiny
    res, unit, head = sizes(m)
    assert main(["inspect", str(chunks), "--memory", str(res + 3 * unit + head)]) == 0
    out = capsys.readouterr().out
    assert "memory plan for llama" in out and "keep 1, prefetch 1" in out
    assert main(["inspect", str(chunks), "--memory", "1000"]) == 2
    assert f"({res + unit + head} bytes)" in capsys.readouterr().err


def test_cli_cache_size_overrides_memory_and_defaults_apply():
    import argparse

    from streaming_weights.cli.options import add_client_args, cache_size_of

    p = argparse.ArgumentParser()
    add_client_args(p, cache_size=4, memory="auto")
    assert cache_size_of(p.parse_args([])) is None  # planned from --memory auto
    assert cache_size_of(p.parse_args(["--cache-size", "2"])) == 2
    q = argparse.ArgumentParser()
    add_client_args(q, cache_size=4)
    assert cache_size_of(q.parse_args([])) == 4 and q.parse_args(["--memory", "1GB"]).memory == "1GB"


def test_a_long_request_makes_room_for_its_kv_cache(tiny):
    _, chunks, m = tiny
    res, unit, head = sizes(m)
    hr = headroom_of(m)
    budget = res + 5 * unit + head + (16 << 20)
    with StreamingLlamaModel("llama", str(chunks), memory_budget=budget) as model:
        kept, plan = model.cache_size, model.engine.plan
        assert kept >= 4
        # a batch of 16-token sequences whose KV cache and activations leave room for only ~2 units
        per_seq = hr.bytes(16, 1) - RUNTIME_BYTES
        free = plan.budget_bytes - (res + unit + plan.overhead_bytes + hr.bytes(16, 1))
        long = model.engine.fit_request(16, batch=1 + (free - 2 * unit) // per_seq)
        assert model.cache_size == long.cache_size < kept  # KV for that batch displaced kept units
        model.engine.fit_request(8)
        assert model.cache_size == kept  # back to the load-time plan, never beyond
        with pytest.raises(ConfigurationError, match="below the minimum"):
            model.engine.fit_request(256, batch=10_000)
