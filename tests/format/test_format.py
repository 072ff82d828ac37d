"""format/: unit files (plan/encode/decode) and manifest.json parsing/validation."""

from __future__ import annotations

import copy
import json
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from streaming_weights.exceptions import ManifestError, UnitFormatError
from streaming_weights.format import (
    FORMAT_VERSION, BlobEntry, Digests, Manifest, UnitEntry, decode_unit, encode_tensors, parse_header, plan_unit,
    unit_path,
)
from streaming_weights.format.chunkfile import DTYPES
from streaming_weights.format.names import check_name, file_path


def _rand(dtype: torch.dtype, shape, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    info = torch.iinfo(dtype)
    lo, hi = max(info.min, -1000), min(info.max, 1000)
    return torch.randint(lo, hi, shape, generator=g, dtype=torch.int64).to(dtype)


ALL_DTYPES = sorted(DTYPES.values(), key=str)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype.itemsize == 1 and t.dtype != torch.uint8 else t


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        # compare raw bytes: float8 has no equality kernel and NaN != NaN
        assert a[k].contiguous().view(-1).view(torch.uint8).tolist() == b[k].contiguous().view(-1).view(torch.uint8).tolist(), k


def test_round_trip_all_dtypes_and_zero_size():
    tensors = {f"t.{str(d).removeprefix('torch.')}": _rand(d, (3, 5), i) for i, d in enumerate(ALL_DTYPES)}
    tensors["empty"] = torch.empty(0, 4, dtype=torch.float32)
    tensors["empty_bf16"] = torch.empty(2, 0, dtype=torch.bfloat16)
    tensors["scalar"] = torch.tensor(3.5, dtype=torch.float64)
    buf = encode_tensors(tensors, metadata={"format": "pt"})
    out = decode_unit(buf)
    assert_same(out, tensors)
    # any safetensors reader opens it
    assert_same(st_load(bytes(buf)), tensors)
    specs, meta, start = parse_header(buf)
    assert meta == {"format": "pt"}
    assert start % 8 == 0 and struct.unpack_from("<Q", buf)[0] == start - 8
    # every tensor's offset is aligned to its element size
    for name, s in specs.items():
        assert s.data_offsets[0] % DTYPES[s.dtype].itemsize == 0, name


def test_decode_reads_safetensors_written_by_safetensors():
    tensors = {"a": _rand(torch.bfloat16, (4, 8)), "b": _rand(torch.int32, (7,)), "c": _rand(torch.float16, (2, 3))}
    assert_same(decode_unit(bytearray(st_save(tensors))), tensors)


def test_decode_is_zero_copy():
    buf = encode_tensors({"w": _rand(torch.float32, (64, 64)), "b": _rand(torch.bfloat16, (64,))})
    out = decode_unit(buf)
    base = torch.frombuffer(buf, dtype=torch.uint8).data_ptr()
    for t in out.values():
        assert base <= t.data_ptr() < base + len(buf)
    # writing through the buffer is visible in the tensor: a view, not a copy
    s, _ = plan_unit({"w": ("F32", (64, 64)), "b": ("BF16", (64,))}).span("w")
    buf[s : s + 4] = struct.pack("<f", 42.0)
    assert out["w"][0, 0].item() == 42.0


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(
    st.text("abcdefghij._", min_size=1, max_size=12),
    st.tuples(st.sampled_from(["F32", "F16", "BF16", "I64", "I8", "U8", "BOOL", "F64"]),
              st.lists(st.integers(0, 5), max_size=3)),
    max_size=6,
))
def test_round_trip_property(entries):
    tensors = {n: _rand(DTYPES[d], tuple(shape), i) for i, (n, (d, shape)) in enumerate(entries.items())}
    buf = encode_tensors(tensors)
    assert_same(decode_unit(buf), tensors)
    assert_same(st_load(bytes(buf)), tensors)
    layout = plan_unit({n: (d, tuple(s)) for n, (d, s) in entries.items()})
    assert layout.total_bytes == len(buf)
    assert parse_header(buf)[0] == layout.tensors


# -- malformed unit files -----------------------------------------------------------------------------
def _raw(header: object, data: bytes = b"", *, n: int | None = None) -> bytearray:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return bytearray(struct.pack("<Q", len(raw) if n is None else n) + raw + data)


@pytest.mark.parametrize("buf, match", [
    (bytearray(b"\x01\x00"), "too short"),
    (_raw({}, n=1 << 40), "exceeds"),
    (_raw({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, n=200), "exceeds"),
    (_raw(b"{not json"), "not valid JSON"),
    (_raw(b"\xff\xfe"), "not valid JSON"),
    (_raw([1, 2]), "JSON object"),
    (_raw({"a": {"dtype": "F32", "shape": [2]}}), "needs dtype"),
    (_raw({"a": 5}), "needs dtype"),
    (_raw({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8), "unknown dtype"),
    (_raw({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8), "non-negative"),
    (_raw({"a": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}, b"\0" * 8), "non-negative"),
    (_raw({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}, b"\0" * 8), r"\[start, end\]"),
    (_raw({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 12]}}, b"\0" * 12), "do not fit"),
    (_raw({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8), "do not fit"),
    # truncated data section
    (_raw({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 5), "truncated"),
    # trailing bytes no tensor covers
    (_raw({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 12), "cover"),
    # gap
    (_raw({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
           "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}, b"\0" * 12), "expected 4"),
    # overlap
    (_raw({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
           "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8), "expected 8"),
    (_raw({"__metadata__": "x", "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
     "__metadata__"),
    (_raw({"__metadata__": {"k": 1}}), "__metadata__"),
])
def test_malformed_units_rejected(buf, match):
    with pytest.raises(UnitFormatError, match=match):
        decode_unit(buf)


def test_truncated_real_unit_rejected():
    buf = encode_tensors({"w": _rand(torch.float32, (8, 8))})
    for cut in (1, 4, len(buf) - 8, len(buf) - 300):
        with pytest.raises(UnitFormatError):
            decode_unit(buf[:-cut])


def test_header_must_match_manifest_entry():
    t = {"w": _rand(torch.float32, (4, 4)), "b": _rand(torch.float32, (4,))}
    buf = encode_tensors(t)
    specs = parse_header(buf)[0]
    assert decode_unit(buf, specs).keys() == t.keys()
    other = parse_header(encode_tensors({"w": _rand(torch.float16, (4, 4)), "b": t["b"]}))[0]
    for expected in ({"w": specs["w"]}, {**specs, "extra": specs["b"]}, other):
        with pytest.raises(UnitFormatError, match="manifest entry"):
            decode_unit(buf, expected)


# -- manifest ----------------------------------------------------------------------------------------
def _unit(name: str, order: int, role: str = "streamed", tensor: str | None = None) -> UnitEntry:
    buf = encode_tensors({tensor or f"{name}.w": torch.zeros(2, 2)})
    d = Digests.of(buf)
    return UnitEntry(name, unit_path(name), len(buf), d.sha256, d.blake3, role=role, order=order,
                     tensors=parse_header(buf)[0])


def _manifest(**kw) -> Manifest:
    units = (_unit("resident", 0, "resident", "embed.weight"), _unit("model.layers.0", 1), _unit("model.layers.1", 2))
    d = Digests.of(b"{}")
    args = dict(name="org/model", architecture="LlamaForCausalLM", model_type="llama", config={"hidden_size": 2},
                dtype="float32", units=units, files=(BlobEntry("tokenizer.json", "files/tokenizer.json", 2, d.sha256, d.blake3),),
                tied={"lm_head.weight": "embed.weight"}, source="model")
    args.update(kw)
    return Manifest(**args)


def test_manifest_round_trip():
    m = _manifest()
    data = m.to_bytes()
    back = Manifest.from_bytes(data)
    assert back == m
    assert back.to_bytes() == data
    obj = json.loads(data)
    assert obj["format_version"] == 1 < FORMAT_VERSION  # no shard units: still version 1, old readers read it
    assert [u.name for u in back.streamed] == ["model.layers.0", "model.layers.1"]
    assert [u.name for u in back.resident] == ["resident"]
    assert back.unit("model.layers.1").order == 2
    assert back.blob("units/model.layers.0.safetensors").name == "model.layers.0"
    assert back.file("tokenizer.json").bytes == 2
    assert back.total_bytes == sum(u.bytes for u in m.units)
    with pytest.raises(ManifestError, match="no unit"):
        back.unit("model.layers.9")
    with pytest.raises(ManifestError, match="lists nothing"):
        back.blob("units/../manifest.json")


def _obj() -> dict:
    return json.loads(_manifest().to_bytes())


def _mut(fn):
    obj = _obj()
    fn(obj)
    return json.dumps(obj).encode()


def _set(path, value):
    def fn(obj):
        *head, last = path
        for p in head:
            obj = obj[p]
        obj[last] = value
    return fn


def _del(path):
    def fn(obj):
        *head, last = path
        for p in head:
            obj = obj[p]
        del obj[last]
    return fn


U1 = ("units", 1)
BAD_MANIFESTS = {
    "not json": (b"{", "not valid JSON"),
    "not utf8": (b"\xff\xfe", "not valid JSON"),
    "array": (b"[]", "JSON object"),
    "no version": (_mut(_del(["format_version"])), "missing field 'format_version'"),
    "version 4": (_mut(_set(["format_version"], 4)), "format_version 4 is not supported"),
    "version 0": (_mut(_set(["format_version"], 0)), "format_version 0 is not supported"),
    "version str": (_mut(_set(["format_version"], "1")), "'format_version' must be int"),
    "version bool": (_mut(_set(["format_version"], True)), "'format_version' must be int"),
    "no name": (_mut(_del(["name"])), "missing field 'name'"),
    "empty name": (_mut(_set(["name"], "")), "'name' must be a non-empty"),
    "name int": (_mut(_set(["name"], 3)), "'name' must be str"),
    "no units": (_mut(_del(["units"])), "missing field 'units'"),
    "units empty": (_mut(_set(["units"], [])), "no units"),
    "units dict": (_mut(_set(["units"], {})), "'units' must be list"),
    "config list": (_mut(_set(["config"], [])), "'config' must be dict"),
    "no architecture": (_mut(_del(["architecture"])), "missing field 'architecture'"),
    "files not list": (_mut(_set(["files"], "x")), "'files' must be a list"),
    "tied not map": (_mut(_set(["tied"], ["a"])), "'tied' must map"),
    "tied dangling": (_mut(_set(["tied"], {"lm_head.weight": "nope"})), "must point at a stored tensor"),
    "unit not object": (_mut(_set(["units", 1], 7)), r"units\[1\]: must be an object"),
    "unit no sha": (_mut(_del([*U1, "sha256"])), r"units\[1\]: missing field 'sha256'"),
    "short sha": (_mut(_set([*U1, "sha256"], "ab" * 31)), "64 lowercase hex"),
    "upper sha": (_mut(_set([*U1, "sha256"], "AB" * 32)), "64 lowercase hex"),
    "bad blake3": (_mut(_set([*U1, "blake3"], "z" * 64)), "64 lowercase hex"),
    "bytes str": (_mut(_set([*U1, "bytes"], "10")), "'bytes' must be int"),
    "bytes negative": (_mut(_set([*U1, "bytes"], -1)), "negative"),
    "bad role": (_mut(_set([*U1, "role"], "cached")), "role must be one of"),
    "order float": (_mut(_set([*U1, "order"], 1.0)), "'order' must be int"),
    "path mismatch": (_mut(_set([*U1, "path"], "units/other.safetensors")), "must be 'units/model.layers.0"),
    "path escape": (_mut(_set([*U1, "path"], "../../etc/passwd")), "must be"),
    "name dotdot": (_mut(_set([*U1, "name"], "../x")), "invalid unit name"),
    "name slash": (_mut(_set([*U1, "name"], "a/b")), "invalid unit name"),
    "name empty": (_mut(_set([*U1, "name"], "")), "invalid unit name"),
    "name dots": (_mut(_set([*U1, "name"], "a..b")), "invalid unit name"),
    "name hidden": (_mut(_set([*U1, "name"], ".x")), "invalid unit name"),
    "file name escape": (_mut(_set(["files", 0, "name"], "../tokenizer.json")), "invalid file name"),
    "file path mismatch": (_mut(_set(["files", 0, "path"], "tokenizer.json")), "must be 'files/tokenizer.json'"),
    "dup unit": (_mut(lambda o: o["units"].append(copy.deepcopy(o["units"][1]) | {"order": 9})), "duplicate unit names"),
    "dup order": (_mut(_set(["units", 2, "order"], 1)), "duplicate unit 'order'"),
    "unsorted": (_mut(lambda o: o["units"].reverse()), "listed in 'order'"),
    "dup tensor": (_mut(lambda o: o["units"][2].__setitem__("tensors", o["units"][1]["tensors"])), "more than one unit"),
    "dup file": (_mut(lambda o: o["files"].append(o["files"][0])), "duplicate file names"),
    "tensors list": (_mut(_set([*U1, "tensors"], [])), "'tensors' must be dict"),
    "tensor bad dtype": (_mut(_set([*U1, "tensors", "model.layers.0.w", "dtype"], "Q4")), "unknown dtype"),
    "tensor bad offsets": (_mut(_set([*U1, "tensors", "model.layers.0.w", "data_offsets"], [0, 3])), "do not fit"),
}


@pytest.mark.parametrize("data, match", list(BAD_MANIFESTS.values()), ids=list(BAD_MANIFESTS))
def test_malformed_manifests_rejected(data, match):
    with pytest.raises(ManifestError, match=match):
        Manifest.from_bytes(data)


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".hidden", "a..b", "x" * 201, "a\\b", "a\x00b", "a b"])
def test_unsafe_names_rejected(name):
    with pytest.raises(ManifestError):
        check_name(name)
    with pytest.raises(ManifestError):
        unit_path(name)
    with pytest.raises(ManifestError):
        file_path(name)


def test_format_does_not_import_nn_asyncio_or_websockets():
    """Module boundary (DESIGN.md): format/ is pure data, checked on its source's import statements."""
    import ast
    from pathlib import Path

    import streaming_weights.format as fmt

    banned = ("torch.nn", "asyncio", "websockets", "transformers")
    files = sorted(Path(fmt.__file__).parent.glob("*.py"))
    assert len(files) >= 4
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                mods = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for m in mods:
                assert not any(m == b or m.startswith(b + ".") for b in banned), f"{f.name} imports {m}"
