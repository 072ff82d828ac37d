"""Weight-only quantization: the encoding's layout, round-trip error bounds, strict metadata validation."""

from __future__ import annotations

import json

import pytest
import torch

from streaming_weights.format import decode_unit, encode_tensors, parse_header
from streaming_weights.format.quant import (
    GROUP_SIZE,
    METADATA_KEY,
    OFFSET_SUFFIX,
    SCALE_SUFFIX,
    QuantizationError,
    decode_into,
    dequantize,
    encode,
    max_abs_error,
    metadata_entry,
    quant_spec,
    read_quant_metadata,
)
from streaming_weights.exceptions import UnitFormatError


def weight(out: int = 96, inp: int = 256, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    w = torch.randn(out, inp, generator=g) * 0.02
    w[3, :64] += 0.5  # an outlier group: the bound is per group
    return w.to(dtype)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_within_the_stated_bound(scheme, dtype):
    w = weight(dtype=dtype)
    spec = quant_spec(scheme, tuple(w.shape), {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}[dtype])
    back = dequantize(encode(w, spec), spec, torch.float32)
    err = (back - w.float()).abs().view(spec.shape[0], spec.groups, spec.group_size).amax(-1)
    bound = max_abs_error(w, spec)
    assert bool((err <= bound * (1 + 1e-5) + 1e-8).all()), float((err - bound).max())
    # the bound is half a step (a step is the group's range / 254 for int8, / 15 for int4) plus float16
    # rounding of the stored scale and offset (relative 2**-11)
    rng = w.float().view(spec.shape[0], spec.groups, spec.group_size)
    steps = {"int8": rng.abs().amax(-1) * 2 / 254, "int4": (rng.amax(-1) - rng.amin(-1)) / 15}[scheme]
    assert bool((bound <= steps * 0.5 * 1.01 + 2.0**-10 * rng.abs().amax(-1)).all())
    assert dequantize(encode(w, spec), spec).dtype == dtype  # default: the original dtype


def test_stored_layout_int8():
    w = weight()
    spec = quant_spec("int8", tuple(w.shape), "F32")
    enc = encode(w, spec)
    assert (enc[""].dtype, tuple(enc[""].shape)) == (torch.int8, (96, 256))
    assert (enc[SCALE_SUFFIX].dtype, tuple(enc[SCALE_SUFFIX].shape)) == (torch.float16, (96, 256 // 64))
    assert int(enc[""].abs().max()) == 127 and int(enc[""].min()) >= -127
    assert spec.stored_bytes() == 96 * 256 + 96 * 4 * 2


def test_int4_packing_is_low_nibble_first():
    # one group of 32: values 0..15 twice, so scale 1 and offset 0 give codes equal to the values
    w = torch.tensor([[float(i % 16) for i in range(32)]])
    spec = quant_spec("int4", (1, 32), "F32")
    enc = encode(w, spec)
    assert float(enc[SCALE_SUFFIX]) == 1.0 and float(enc[OFFSET_SUFFIX]) == 0.0
    assert enc[""].dtype == torch.uint8 and tuple(enc[""].shape) == (1, 16)
    assert enc[""][0, 0] == 0 | (1 << 4) and enc[""][0, 7] == 14 | (15 << 4)
    assert torch.equal(dequantize(enc, spec), w)


def test_zero_and_constant_groups():
    w = torch.full((4, 64), 0.25)
    w[1] = 0.0
    spec4 = quant_spec("int4", (4, 64), "F32")
    assert torch.equal(dequantize(encode(w, spec4), spec4), w)  # scale 0, offset = the value (exact in fp16)
    spec8 = quant_spec("int8", (4, 64), "F32")
    back = dequantize(encode(w, spec8), spec8)
    assert torch.equal(back[1], w[1])  # all-zero group: scale 0, no division by zero
    assert float((back - w).abs().max()) <= float(max_abs_error(w, spec8).max())


def test_decode_into_writes_the_callers_buffer():
    w = weight()
    spec = quant_spec("int4", tuple(w.shape), "F32")
    out = torch.empty(spec.shape, dtype=torch.float32)
    assert decode_into(out, encode(w, spec), spec) is out


def test_what_is_not_quantized():
    assert quant_spec("int8", (10, 100), "F32") is None  # 100 is not a multiple of 64
    assert quant_spec("int4", (256,), "F32") is None  # not 2-D
    assert quant_spec("int8", (4, 64), "I64") is None  # not floating
    assert quant_spec("int4", (4, 64), "BF16").group_size == GROUP_SIZE["int4"] == 32
    with pytest.raises(QuantizationError, match="unknown quantization"):
        quant_spec("int3", (4, 64), "F32")


def test_encode_refuses_scales_that_overflow_float16():
    spec = quant_spec("int8", (1, 64), "F32")
    with pytest.raises(QuantizationError, match="overflow"):
        encode(torch.full((1, 64), 1e9), spec)


# ------------------------------------------------------------------------------ metadata validation
def unit(kind: str = "int8", **edit) -> tuple[dict, dict]:
    """(tensor specs, metadata) of a unit holding one quantized tensor ``w`` (``edit`` tweaks its entry)."""
    w = weight(8, 64)
    spec = quant_spec(kind, (8, 64), "F32")
    tensors = {"w" + s: t for s, t in encode(w, spec).items()} | {"norm": torch.ones(8)}
    meta = metadata_entry({"w": spec})
    if edit:
        doc = json.loads(meta[METADATA_KEY])
        doc["tensors"]["w"].update(edit)
        meta = {METADATA_KEY: json.dumps(doc)}
    specs, md, _ = parse_header(encode_tensors(tensors, meta))
    return specs, md


def test_valid_metadata_round_trips_through_a_unit_file():
    specs, md = unit("int4")
    got = read_quant_metadata(md, specs)
    assert list(got) == ["w"] and got["w"].scheme == "int4" and got["w"].shape == (8, 64)


def doc_with(**top) -> dict:
    specs, md = unit()
    doc = json.loads(md[METADATA_KEY]) | top
    return specs, {METADATA_KEY: json.dumps(doc)}


@pytest.mark.parametrize("case, match", [
    (lambda: (unit()[0], {METADATA_KEY: "{not json"}), "not valid JSON"),
    (lambda: doc_with(format="other"), "expected"),
    (lambda: doc_with(version=2), "version 2 is not supported"),
    (lambda: unit(scheme="nf4"), "unknown scheme"),
    (lambda: unit(group_size=128), "groups of 64"),
    (lambda: unit(group_size=True), "groups of 64"),
    (lambda: unit(shape=[8, 128]), "I8\\[8, 128\\]"),
    (lambda: unit(shape=[8, 60]), "not a multiple"),
    (lambda: unit(shape=[8]), "shape must be"),
    (lambda: unit(dtype="I32"), "original dtype"),
    (lambda: unit(extra=1), "exactly scheme"),
])
def test_malformed_metadata_is_rejected(case, match):
    specs, md = case()
    with pytest.raises(QuantizationError, match=match) as info:
        read_quant_metadata(md, specs)
    assert isinstance(info.value, UnitFormatError) and info.value.retryable is False
    assert "malformed quantization metadata" in str(info.value)


def test_missing_and_stray_companions_are_rejected():
    specs, md = unit("int4")
    with pytest.raises(QuantizationError, match="lacks its tensor 'w.qoffset'"):
        read_quant_metadata(md, {k: v for k, v in specs.items() if k != "w.qoffset"})
    with pytest.raises(QuantizationError, match="no quantization entry"):
        read_quant_metadata(md, specs | {"x.qscale": specs["w.qscale"]})
    with pytest.raises(QuantizationError, match="has no metadata"):
        read_quant_metadata({}, specs)
    assert read_quant_metadata({}, {"norm": specs["norm"]}) == {}


def test_a_quantized_unit_is_a_plain_safetensors_file(tmp_path):
    from safetensors.torch import load_file

    w = weight(8, 64)
    spec = quant_spec("int8", (8, 64), "F32")
    enc = {"w" + s: t for s, t in encode(w, spec).items()}
    path = tmp_path / "u.safetensors"
    path.write_bytes(encode_tensors(enc, metadata_entry({"w": spec})))
    loaded = load_file(str(path))
    assert all(torch.equal(loaded[k], v) for k, v in enc.items())
    assert set(decode_unit(bytearray(path.read_bytes()))) == set(enc)
