"""On-arrival conversion (client.convert): quantized chunks dequantized into the compute dtype, wire bytes
counted as stored, malformed metadata refused with a specific (not retried) error."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from streaming_weights import StreamingLlamaModel
from streaming_weights.client.convert import ConvertingSource, parse_compute_dtype
from streaming_weights.client.storage_source import StorageSource
from streaming_weights.exceptions import ConfigurationError, UnitUnavailableError
from streaming_weights.format import encode_tensors, write_model
from streaming_weights.format.quant import METADATA_KEY, QuantizationError, dequantize, encode, metadata_entry, quant_spec
from streaming_weights.storage.filesystem import FilesystemBackend
from tests.support import models as tiny

IDS = torch.tensor([[5, 17, 33, 2, 9, 41, 7], [3, 8, 12, 19, 1, 4, 6]])


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return tiny.llama(tmp_path_factory.mktemp("q") / "src", layers=4)


def reference(src, scheme: str) -> torch.nn.Module:
    """transformers' model of ``src`` with every linear/embedding weight replaced by its dequantized copy."""
    ref = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    kinds = (torch.nn.Linear, torch.nn.Embedding)
    with torch.no_grad():
        for _, mod in ref.named_modules():
            if isinstance(mod, kinds) and (spec := quant_spec(scheme, tuple(mod.weight.shape), "F32")) is not None:
                mod.weight.copy_(dequantize(encode(mod.weight, spec), spec))
    return ref


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_model_equals_transformers_on_the_dequantized_weights(source, tmp_path, scheme):
    summary = tiny.chunk(source, tmp_path / scheme, name="q", quantize=scheme)
    assert summary["quantize"] == scheme
    ref = reference(source, scheme)
    with StreamingLlamaModel("q", str(tmp_path / scheme), cache_size=1) as m:
        with torch.no_grad():
            got = m.hf_model(input_ids=IDS, labels=IDS)
            want = ref(input_ids=IDS, labels=IDS)
        torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=1e-6)
        torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=1e-6)
        layer = m.hf_model.model.layers[-1].mlp.up_proj
        assert layer.weight.is_meta  # streamed (the one kept unit is the first): swapped in only while it runs
        conv = m.engine.converter
        entry = m.manifest.streamed[0]
        assert conv.memory_bytes(entry, m.manifest) > entry.bytes  # float32 in memory, codes on the wire
        info = m.get_cache_info()
        assert info["bytes_fetched"] % entry.bytes == 0  # wire bytes: whole stored units


def test_units_carry_codes_and_scales_on_the_wire(source, tmp_path):
    tiny.chunk(source, tmp_path / "c", name="q", quantize="int4")
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    layer = next(u for u in manifest["units"] if u["name"] == "model.layers.0")
    t = layer["tensors"]
    assert t["model.layers.0.mlp.up_proj.weight"]["dtype"] == "U8"
    assert t["model.layers.0.mlp.up_proj.weight"]["shape"] == [128, 32]  # [out, in/2]
    assert t["model.layers.0.mlp.up_proj.weight.qscale"]["shape"] == [128, 2]  # 64 / 32 groups
    assert t["model.layers.0.input_layernorm.weight"]["dtype"] == "F32"  # norms are not quantized


def test_memory_bytes_matches_the_converted_unit(source, tmp_path):
    tiny.chunk(source, tmp_path / "c", name="q", quantize="int8")

    async def run():
        conv = ConvertingSource(StorageSource(FilesystemBackend(str(tmp_path / "c"))), "bfloat16")
        manifest = await conv.get_manifest("q")
        entry = manifest.streamed[1]
        unit = await conv.fetch_unit(manifest, entry.name)
        assert unit.nbytes == entry.bytes  # the wire size
        assert {t.dtype for t in unit.tensors.values()} == {torch.bfloat16}
        assert not any(n.endswith((".qscale", ".qoffset")) for n in unit.tensors)
        assert conv.memory_bytes(entry, manifest) == len(unit.buffer)
        await conv.close()

    asyncio.run(run())


def test_unconverted_units_pass_through_zero_copy(source, tmp_path):
    tiny.chunk(source, tmp_path / "c", name="plain")

    async def run():
        inner = StorageSource(FilesystemBackend(str(tmp_path / "c")))
        conv = ConvertingSource(inner, torch.float32)
        manifest = await conv.get_manifest("plain")
        unit = await conv.fetch_unit(manifest, manifest.streamed[0].name)
        assert len(unit.buffer) == manifest.streamed[0].bytes and conv.converted_units == 0  # the receive buffer
        assert conv.memory_bytes(manifest.streamed[0], manifest) == manifest.streamed[0].bytes
        assert conv.location == inner.location
        await conv.close()

    asyncio.run(run())


def bad_model(tmp_path, edit) -> str:
    """A one-layer chunk directory whose streamed unit carries edited quantization metadata."""
    w = torch.randn(8, 64)
    spec = quant_spec("int8", (8, 64), "F32")
    doc = json.loads(metadata_entry({"layers.0.w": spec})[METADATA_KEY])
    edit(doc)
    layer = encode_tensors({"layers.0.w" + s: t for s, t in encode(w, spec).items()},
                           {METADATA_KEY: json.dumps(doc)})
    asyncio.run(write_model(FilesystemBackend(str(tmp_path)), name="bad", units={"resident": {"e": torch.ones(2)},
                            "layers.0": layer}, architecture="X", model_type="x", config={}))
    return str(tmp_path)


def test_malformed_metadata_is_a_specific_error_and_not_retried(tmp_path):
    path = bad_model(tmp_path, lambda doc: doc["tensors"]["layers.0.w"].update(group_size=32))

    async def run():
        conv = ConvertingSource(StorageSource(FilesystemBackend(path)))
        manifest = await conv.get_manifest("bad")
        with pytest.raises(QuantizationError, match="int8 uses groups of 64, got 32"):
            await conv.fetch_unit(manifest, "layers.0")
        from streaming_weights.client.retry import RetryingSource, RetryPolicy

        retrying = RetryingSource(conv, RetryPolicy(max_retries=3, timeout_seconds=5))
        with pytest.raises((QuantizationError, UnitUnavailableError)) as info:
            await retrying.fetch_unit(manifest, "layers.0")
        assert retrying.retries == 0, "the bytes matched their hash: another attempt would read the same"
        assert "groups of 64" in str(info.value)

    asyncio.run(run())


@pytest.mark.parametrize("spelling, want", [
    (None, None), ("auto", None), ("float32", torch.float32), ("torch.bfloat16", torch.bfloat16),
    (torch.float16, torch.float16), ("half", torch.float16),
])
def test_compute_dtype_spellings(spelling, want):
    assert parse_compute_dtype(spelling) == want


@pytest.mark.parametrize("bad", ["int8", "fp8", torch.int64])
def test_bad_compute_dtype(bad):
    with pytest.raises(ConfigurationError, match="dtype"):
        parse_compute_dtype(bad)


def test_kernel_weights_land_on_aligned_addresses_whatever_the_shapes(tmp_path):
    # torch's int8 kernel crashes on a weight 8 bytes off a 16-byte boundary: the compute buffer aligns every tensor
    # (odd row counts and widths put the stored codes anywhere), and a width it cannot take is dequantized instead
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from streaming_weights import StreamingBaseModel
    from streaming_weights.testing import FakeSource
    from tests.support.models import chunk

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=80, intermediate_size=100, num_hidden_layers=2, num_attention_heads=5,
                      num_key_value_heads=1, head_dim=16, max_position_embeddings=64)  # down_proj: 100 inputs, no kernel
    LlamaForCausalLM(cfg).eval().save_pretrained(str(tmp_path / "src"))
    chunk(tmp_path / "src", tmp_path / "llama", name="llama", quantize="int8-channel")
    with StreamingBaseModel("llama", FakeSource(chunks_dir=tmp_path / "llama"), quantized_in_memory="kernel",
                            cache_size=2) as m:
        with torch.no_grad():
            logits = m.hf_model(input_ids=torch.tensor([[1, 5, 9, 33]])).logits
        held = m.engine.call(lambda: [t for u in m.engine.cache.cached.values() for t in u.tensors.values()])
        assert m.engine.codes.layers == 12 and m.engine.codes.kernel_calls and logits.isfinite().all()
        assert held and all(t.data_ptr() % 64 == 0 for t in held)
    with StreamingBaseModel("llama", FakeSource(chunks_dir=tmp_path / "llama"), quantized_in_memory="codes",
                            cache_size=2) as m:
        with torch.no_grad():
            want = m.hf_model(input_ids=torch.tensor([[1, 5, 9, 33]])).logits
    assert (logits - want).abs().max() <= 2.0 ** -5 * want.abs().max()  # bfloat16 activations in the kernel


def test_int8_channel_units_compute_in_place_on_the_receive_buffer(tmp_path, monkeypatch):
    # the chunker aligns every tensor whose size is a multiple of 64 bytes: int8-channel codes are then their own
    # kernel form, computed on where they landed (no compute buffer, no copy), with the same results as copied
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from streaming_weights import StreamingBaseModel
    from streaming_weights.client import convert
    from streaming_weights.format.chunkfile import DATA_ALIGN, parse_header
    from streaming_weights.testing import FakeSource
    from tests.support.models import chunk

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
    LlamaForCausalLM(cfg).eval().save_pretrained(str(tmp_path / "src"))
    chunk(tmp_path / "src", tmp_path / "llama", name="llama", quantize="int8-channel")
    for f in (tmp_path / "llama" / "units").iterdir():
        specs, _, start = parse_header(f.read_bytes())
        assert start % DATA_ALIGN == 0
        assert all(s.data_offsets[0] % DATA_ALIGN == 0 for s in specs.values() if s.nbytes % DATA_ALIGN == 0)
    ids = torch.tensor([[1, 5, 9, 33, 60]])

    def run():
        with StreamingBaseModel("llama", FakeSource(chunks_dir=tmp_path / "llama"), quantized_in_memory="kernel",
                                cache_size=3, speculation="off") as m:
            with torch.no_grad():
                logits = m.hf_model(input_ids=ids).logits
            tokens = m.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
            units = m.engine.call(lambda: list(m.engine.cache.cached.values()))
            inside = []
            for u in units:
                base = torch.frombuffer(u.buffer, dtype=torch.uint8).data_ptr()
                inside += [base <= t.data_ptr() < base + len(u.buffer) for n, t in u.tensors.items() if t.dtype == torch.int8]
            return logits, tokens, inside, m.engine.converter.converted_units, m.get_cache_info()["plan"]["unit_bytes"]

    logits, tokens, inside, converted, unit_bytes = run()
    assert len(inside) == 3 * 7 and all(inside)  # every projection's codes are in a buffer the cache holds
    monkeypatch.setattr(convert, "_in_place", lambda *a: False)  # the copying path: a compute buffer per unit
    want_logits, want_tokens, _, copies, copied_bytes = run()
    assert copies >= converted + 3  # in place, no block converted (the resident embedding and lm_head do)
    assert torch.equal(logits, want_logits) and torch.equal(tokens, want_tokens)
    assert unit_bytes <= copied_bytes + 4096  # the scales' own buffer is all an in-place unit adds to its bytes
