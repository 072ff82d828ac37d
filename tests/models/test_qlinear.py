"""quantized_in_memory="kernel": blocks' linear layers compute on their codes with torch's weight-only kernels.

The kernels change numerics (bfloat16 activations, scales and zeros), so nothing here is compared exactly:
one layer against the dequantized weights within the bound bfloat16 rounding implies; a model against
transformers running the dequantized weights in float32, within what transformers' own bfloat16 compute
deviates from it; greedy tokens on a LLaMA whose logits are not near ties.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from streaming_weights import StreamingBaseModel, StreamingConfig
from streaming_weights.client import qkernel
from streaming_weights.exceptions import QuantizationError
from streaming_weights.format.chunkfile import TensorSpec
from streaming_weights.format.quant import SCALE_SUFFIX, decode_into, dequantize, encode, quant_spec, read_quant_metadata
from streaming_weights.format.quant import metadata_entry
from streaming_weights.models import qlinear
from streaming_weights.testing import FakeSource
from tests.support.models import chunk

pytestmark = pytest.mark.skipif(qkernel.unavailable() is not None, reason=f"{qkernel.unavailable()}")
IDS = torch.tensor([[5, 17, 33, 2, 9, 41, 7], [8, 3, 99, 14, 250, 61, 30]])
KERNEL_SCHEMES = ("int4", "int8-channel")
U = 2.0 ** -8  # bfloat16's relative rounding error (unit roundoff 2**-9) with a factor 2 of headroom


def kernel_parts(stored: dict, spec) -> dict:
    dts = {"U8": torch.uint8, "I8": torch.int8, "BF16": torch.bfloat16}
    dst = {s: torch.empty(shape, dtype=dts[dt]) for s, (dt, shape) in qkernel.kernel_form(spec).items()}
    qkernel.pack_into(dst, stored, spec)
    return dst


@pytest.mark.parametrize("scheme", KERNEL_SCHEMES)
@pytest.mark.parametrize("rows", [96, 128])  # 96: not a whole block of torch's layout (its converter packs it)
def test_one_layer_is_the_dequantized_weights_up_to_bfloat16_rounding(scheme, rows):
    gen = torch.Generator().manual_seed(7)
    w, bias = torch.randn(rows, 256, generator=gen), torch.randn(rows, generator=gen)
    spec = quant_spec(scheme, tuple(w.shape), "F32")
    stored = encode(w, spec)
    parts = kernel_parts(stored, spec)
    wd = dequantize(stored, spec)
    many = torch.randn(2, qkernel.INT8_KERNEL_MAX_ROWS, 256, generator=gen)  # int8-channel: dequantized, dense
    for x in (torch.randn(3, 5, 256, generator=gen), torch.randn(1, 256, generator=gen), torch.randn(0, 256), many):
        y = qkernel.linear(x, parts, bias)
        xb = x.to(torch.bfloat16).float()  # the kernel's input
        ref = torch.nn.functional.linear(xb, wd, bias)
        assert y.shape == ref.shape and y.dtype == x.dtype
        # kernel rounding: its output and its scales (and int4 zeros = offset + 8 scale) are bfloat16; the
        # weight error is then at most U * (|offset| + 16 |scale|) per group (int4), U * |w| (int8-channel)
        if scheme == "int4":
            s, o = stored[SCALE_SUFFIX].float(), stored[".qoffset"].float()
            werr = (U * (o.abs() + 16 * s)).repeat_interleave(spec.group_size, dim=1)
        else:
            werr = U * wd.abs()
        bound = U * (ref - bias).abs() + xb.abs() @ werr.t() + U * xb.abs() @ wd.abs().t() * 2.0 ** -8
        assert bool(((y - ref).abs() <= bound + 1e-6).all()), float(((y - ref).abs() - bound).max())


def test_the_int4_repacking_is_torchs_layout():
    codes = torch.randint(0, 256, (192, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    unpacked = torch.stack([codes & 0x0F, codes >> 4], dim=-1).view(192, 128).to(torch.int32)
    out = torch.empty_like(codes)
    qkernel._repack_int4(out, codes)
    assert torch.equal(out, torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpacked, 1))


def test_which_codes_a_kernel_takes():
    def specs(scheme, shape):
        spec = quant_spec(scheme, shape, "F32")
        return {"w" + s: TensorSpec(dt, sh, (0, 0)) for s, (dt, sh) in spec.stored().items()}

    assert qkernel.kernel_scheme(specs("int4", (16, 64)), "w") == "int4"
    assert qkernel.kernel_scheme(specs("int4", (8, 64)), "w") is None  # torch packs rows by 16: no kernel
    assert qkernel.kernel_scheme(specs("int8-channel", (8, 256)), "w") == "int8-channel"
    assert qkernel.kernel_scheme(specs("int8", (8, 256)), "w") is None  # groups of 64: no kernel
    assert qkernel.kernel_scheme(specs("int8", (8, 64)), "w") == "int8-channel"  # one group per row
    assert qkernel.kernel_scheme(specs("int8-channel", (8, 72)), "w") is None  # not 16 inputs at a time: NaN in torch
    assert qkernel.kernel_scheme({"w": TensorSpec("F32", (8, 64), (0, 0))}, "w") is None


def test_int8_channel_is_one_scale_per_row_and_strictly_validated():
    w = torch.randn(6, 100)
    spec = quant_spec("int8-channel", (6, 100), "F32")
    assert spec.group_size == 100 and spec.stored() == {"": ("I8", (6, 100)), SCALE_SUFFIX: ("F16", (6, 1))}
    stored = encode(w, spec)
    scale = w.abs().amax(1, keepdim=True) / 127
    assert torch.equal(stored[SCALE_SUFFIX], scale.bfloat16().half())  # rounded to bfloat16 precision, exact in float16
    out = torch.empty(6, 100)
    assert (decode_into(out, stored, spec) - w).abs().max() <= stored[SCALE_SUFFIX].float().max() / 2 + 1e-6
    tensors = {"w": TensorSpec("I8", (6, 100), (0, 600)), "w.qscale": TensorSpec("F16", (6, 1), (600, 612))}
    meta = metadata_entry({"w": spec})
    assert read_quant_metadata(meta, tensors)["w"] == spec
    bad = metadata_entry({"w": spec})["quantization"].replace('"group_size":100', '"group_size":64')
    with pytest.raises(QuantizationError, match="int8-channel uses groups of 100, got 64"):
        read_quant_metadata({"quantization": bad}, tensors)
    with pytest.raises(QuantizationError, match="needs I8"):
        read_quant_metadata(meta, tensors | {"w": TensorSpec("U8", (6, 50), (0, 300))})


# ------------------------------------------------------------------------------------------ the model
def peaky_llama(path):
    """A random-init LLaMA (fixed seed) with large weights, so its greedy choices are not near ties."""
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      initializer_range=0.1, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).eval().save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return peaky_llama(tmp_path_factory.mktemp("qlinear") / "src")


@pytest.fixture(scope="module", params=KERNEL_SCHEMES + ("int8",))
def quantized(request, source, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"qlinear-{request.param}") / "llama"
    chunk(source, out, name="llama", quantize=request.param)
    return request.param, out


def reference(source, scheme):
    """transformers' LLaMA with the weights the chunks dequantize to."""
    model = LlamaForCausalLM.from_pretrained(str(source), dtype=torch.float32).eval()
    with torch.no_grad():
        for m in model.modules():
            spec = quant_spec(scheme, tuple(m.weight.shape), "F32") if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)) else None
            if spec is not None:
                m.weight.copy_(dequantize(encode(m.weight, spec), spec))
    return model


def run(chunks, mode="kernel", **kw):
    with StreamingBaseModel("llama", FakeSource(chunks_dir=chunks), quantized_in_memory=mode, speculation="off",
                            **kw) as m:
        with torch.no_grad():
            logits = m.hf_model(input_ids=IDS).logits
        tokens = m.generate(input_ids=IDS[:1], max_new_tokens=8, do_sample=False)
        held = [t.dtype for u in m.engine.call(lambda: dict(m.engine.cache.cached)).values() for t in u.tensors.values()]
        return logits, tokens, m.engine, m.get_cache_info()["plan"], held


@pytest.mark.slow
def test_the_model_computes_on_codes_within_bfloat16s_error(quantized, source):
    scheme, chunks = quantized
    ref = reference(source, scheme)
    with torch.no_grad():
        want = ref(input_ids=IDS).logits
        bf16 = ref.to(torch.bfloat16)(input_ids=IDS).logits.float()
        bf16_tokens = ref.generate(input_ids=IDS[:1], max_new_tokens=8, do_sample=False)
        want_tokens = ref.float().generate(input_ids=IDS[:1], max_new_tokens=8, do_sample=False)
    # this model's greedy choices survive bfloat16 compute throughout (no near ties): a kernel that rounds less
    # (the logits check below) must keep them too
    assert torch.equal(bf16_tokens, want_tokens)
    logits, tokens, engine, plan, held = run(chunks, cache_size=2)
    assert engine.kernel_fallback is None
    if scheme in KERNEL_SCHEMES:  # every projection of the 3 blocks (7 each) computes with a kernel
        assert isinstance(engine.codes, qlinear.KernelTier) and engine.codes.layers == 21
        assert engine.codes.kernel_calls >= 21
    else:  # groups of 64 on inputs of 128 and 256: no kernel takes them; the compressed tier, per use
        assert type(engine.codes) is qlinear.CodesTier and engine.codes.expansions >= 3
    assert (logits - want).abs().max() <= (bf16 - want).abs().max()  # the kernel rounds less than bf16 compute
    assert torch.equal(tokens, want_tokens)
    if scheme in KERNEL_SCHEMES:
        assert held and set(held) <= {torch.uint8, torch.int8, torch.bfloat16, torch.float32}
        assert torch.uint8 in held or torch.int8 in held  # the cache holds codes, in kernel form
        _, _, _, dequantized, _ = run(chunks, "dequantized", cache_size=2)
        assert plan["unit_bytes"] < dequantized["unit_bytes"] / 2  # the plan counts codes


@pytest.mark.slow
def test_without_the_kernels_it_is_the_compressed_tier_exactly(quantized, monkeypatch):
    scheme, chunks = quantized
    monkeypatch.setattr(qkernel, "unavailable", lambda: "no kernels in this test")
    logits, tokens, engine, _, _ = run(chunks, cache_size=2)
    assert engine.kernel_fallback == "no kernels in this test: dequantizing per use instead"
    want_logits, want_tokens, codes_engine, _, _ = run(chunks, "codes", cache_size=2)
    assert type(engine.codes) is type(codes_engine.codes) and torch.equal(logits, want_logits)
    assert torch.equal(tokens, want_tokens)


def test_off_the_cpu_the_kernels_are_not_used():
    codes, kernel, why = qlinear.in_memory_form(StreamingConfig(quantized_in_memory="kernel"), on_host=False)
    assert codes and kernel is None and "device" in why
    codes, kernel, why = qlinear.in_memory_form(StreamingConfig(quantized_in_memory="kernel"), on_host=True)
    assert codes and kernel is qlinear.linear_weight_names and why is None
    assert qlinear.in_memory_form(StreamingConfig(quantized_in_memory="codes"), on_host=True) == (True, None, None)


@pytest.mark.slow
def test_row_sharded_quantized_embeddings_convert_on_arrival_with_codes(tiny_source, tmp_path):
    # quantized_in_memory="codes": the shards reach their modules converted (assembled whole): exactly dequantized
    out = tmp_path / "llama"
    chunk(tiny_source("llama", layers=2), out, name="llama", quantize="int8-channel", shard_size="8KB")
    want, want_tokens, *_ = run(out, "dequantized", cache_size=0)
    logits, tokens, engine, _, _ = run(out, "codes", cache_size=0)
    assert any(u.role == "shard" for u in engine.manifest.units) and not engine.held_edges
    assert not any(engine.converter.codes_kept(engine.manifest, u.name) for u in engine.manifest.shards)
    assert torch.equal(logits, want) and torch.equal(tokens, want_tokens)


def sharded_llama(path, tied):
    """A random-init LLaMA (fixed seed) whose embedding and lm_head (tied or not) are large enough for row shards."""
    torch.manual_seed(2)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      initializer_range=0.1, tie_word_embeddings=tied, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).eval().save_pretrained(str(path))
    return path


def run_kernel(chunks, **kw):
    """Logits of IDS, 8 greedy tokens, and what the engine held, with quantized_in_memory="kernel"."""
    with StreamingBaseModel("llama", FakeSource(chunks_dir=chunks), quantized_in_memory="kernel", speculation="off",
                            **kw) as model:
        with torch.no_grad():
            logits = model.hf_model(input_ids=IDS).logits
        tokens = model.generate(input_ids=IDS[:1], max_new_tokens=8, do_sample=False)
        return logits, tokens, model.engine, model.get_cache_info()["plan"], set(model.engine.held_edges)


@pytest.mark.slow
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("scheme", KERNEL_SCHEMES + ("int8",))
@pytest.mark.parametrize("shards", ["kept", "streamed"])
def test_row_shards_stay_codes_with_the_kernels(scheme, tied, shards, tmp_path, monkeypatch):
    # "kernel": the embedding's shards stay codes and give rows decoded alone; an lm_head's shards compute with the
    # kernel (in kernel form) or, without one (group-wise int8, or a tied embedding), expand per use. Against the
    # same chunks with the shards converted on arrival (what "codes" does with them): identical, but for an lm_head
    # computed by the kernel (bfloat16 activations: within that one layer's rounding)
    out = tmp_path / "llama"
    chunk(sharded_llama(tmp_path / "src", tied), out, name="llama", quantize=scheme, shard_size="24KB")
    kw = {"cache_size": 0} if shards == "kept" else {"memory_budget": "1GB"}
    if shards == "streamed":  # the plan streams the shards whatever the budget (the path a tight budget takes)
        from streaming_weights.models import engine as engine_module, planner

        monkeypatch.setattr(engine_module, "plan_memory", lambda *a, **kw: planner.plan_memory(
            *a, **{**kw, "stream_shards": True}))
    logits, tokens, engine, plan, held = run_kernel(out, **kw)
    m = engine.manifest
    assert len(m.shards) >= (4 if tied else 8)
    assert all(engine.converter.codes_kept(m, u.name) or engine.converter.kernel_names(m, u.name) for u in m.shards)
    lm_kernel = [u.name for u in m.shards if engine.converter.kernel_names(m, u.name)]
    assert bool(lm_kernel) == (not tied and scheme in KERNEL_SCHEMES)  # only an untied lm_head takes a kernel
    assert plan["shards_streamed"] == (shards == "streamed")
    assert held == ({u.name for u in m.shards} if shards == "kept" else set())
    with monkeypatch.context() as mp:  # the shards converted on arrival instead
        from streaming_weights.client.convert import ConvertingSource

        codes_kept, kernel_names = ConvertingSource.codes_kept, ConvertingSource.kernel_names
        shard = lambda self, man, u: man.unit(u).role == "shard"  # noqa: E731
        mp.setattr(ConvertingSource, "codes_kept", lambda self, man, u: not shard(self, man, u) and codes_kept(self, man, u))
        mp.setattr(ConvertingSource, "kernel_names", lambda self, man, u: frozenset() if shard(self, man, u)
                   else kernel_names(self, man, u))
        want, want_tokens, _, converted, _ = run_kernel(out, **kw)
    if shards == "kept":  # the plan counts the shards' codes
        assert plan["resident_bytes"] < converted["resident_bytes"] / 2
    if not lm_kernel:
        assert torch.equal(logits, want) and torch.equal(tokens, want_tokens)
    else:  # the lm_head alone rounds its input to bfloat16: |logit| x 2^-8 plus the input's rounding through W
        assert (logits - want).abs().max() <= 2.0 ** -7 * want.abs().max()


def test_an_embeddings_rows_decode_alone_to_what_the_whole_shard_decodes_to(tmp_path):
    source = sharded_llama(tmp_path / "src", tied=False)
    for scheme in ("int8", "int4", "int8-channel"):
        chunk(source, tmp_path / scheme, name="llama", quantize=scheme, shard_size="24KB")
        with StreamingBaseModel("llama", FakeSource(chunks_dir=tmp_path / scheme), quantized_in_memory="kernel",
                                cache_size=0) as model:
            engine, m = model.engine, model.engine.manifest
            unit = next(u for u in m.shards if u.shard_tensor == "model.embed_tokens.weight")
            held = engine.held_edges[unit.name]
            whole = engine.converter.expand(m, held, bytearray(engine.converter.memory_bytes(unit, m)))
            rows = torch.tensor([5, 0, 5, unit.rows[1] - unit.rows[0] - 1])
            got = engine.converter.gather(m, unit.name, held.tensors, "model.embed_tokens.weight", rows)
            assert got.dtype == torch.float32 and torch.equal(got, whole["model.embed_tokens.weight"][rows])


@pytest.mark.slow
def test_the_patched_layers_are_restored_by_unbind(quantized):
    scheme, chunks = quantized
    if scheme not in KERNEL_SCHEMES:
        pytest.skip("group-wise int8 on these shapes: no layer computes with a kernel")
    with StreamingBaseModel("llama", FakeSource(chunks_dir=chunks), quantized_in_memory="kernel", cache_size=2) as m:
        linears = [mod for mod in m.hf_model.model.layers.modules() if type(mod) is torch.nn.Linear]
        assert len(linears) == m.engine.codes.layers and all("forward" in mod.__dict__ for mod in linears)
        m.engine.codes.unbind()
        assert m.engine.codes.layers == 0 and not any("forward" in mod.__dict__ for mod in linears)
