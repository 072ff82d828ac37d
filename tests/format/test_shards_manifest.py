"""format/: row-shard units (role "shard", "rows"), their validation, format_version 2, and the builder's rows."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
from safetensors.torch import load as st_load

from streaming_weights.exceptions import ManifestError
from streaming_weights.format import Digests, Manifest, TensorSpec, UnitEntry, write_model
from streaming_weights.format.builder import ModelBuilder
from streaming_weights.format.manifest import SUPPORTED_VERSIONS
from streaming_weights.format.names import shard_unit_name
from streaming_weights.storage import MemoryBackend

EMB = "model.embed_tokens.weight"
D = Digests.of(b"")


def _spec(dtype: str, shape: tuple[int, ...], start: int = 0) -> TensorSpec:
    n = {"F32": 4, "F16": 2, "I8": 1}[dtype]
    size = n
    for d in shape:
        size *= d
    return TensorSpec(dtype, shape, (start, start + size))


def _unit(name: str, order: int, role: str, tensors: dict[str, TensorSpec], rows=None) -> UnitEntry:
    size = 8 + max((t.data_offsets[1] for t in tensors.values()), default=0)  # a file holding its data
    return UnitEntry(name, f"units/{name}.safetensors", size, D.sha256, D.blake3, role=role, order=order,
                     tensors=tensors, rows=rows)


def _shard(start: int, stop: int, order: int, *, dtype: str = "F32", cols: int = 8, tensor: str = EMB,
           extra: dict[str, TensorSpec] | None = None) -> UnitEntry:
    tensors = {tensor: _spec(dtype, (stop - start, cols)), **(extra or {})}
    return _unit(shard_unit_name(tensor, start, stop), order, "shard", tensors, rows=(start, stop))


def _manifest(*shards: UnitEntry, resident: dict[str, TensorSpec] | None = None, **kw) -> Manifest:
    units = (_unit("resident", 0, "resident", resident or {"model.norm.weight": _spec("F32", (8,))}),
             *shards, _unit("model.layers.0", 99, "streamed", {"model.layers.0.w": _spec("F32", (8, 8))}))
    return Manifest(name="m", architecture="LlamaForCausalLM", model_type="llama", config={}, dtype="float32",
                    units=units, **kw)


def test_shard_unit_name():
    assert shard_unit_name(EMB, 0, 4096) == "model.embed_tokens.weight.rows-0-4096"
    with pytest.raises(ManifestError, match="invalid unit name"):
        shard_unit_name("../x", 0, 1)


def test_sharded_manifest_round_trip_and_lookups():
    m = _manifest(_shard(0, 4, 1), _shard(4, 8, 2), _shard(8, 10, 3), tied={"lm_head.weight": EMB})
    assert m.format_version == 2
    obj = json.loads(m.to_bytes())
    assert obj["format_version"] == 2
    assert [u.get("rows") for u in obj["units"]] == [None, [0, 4], [4, 8], [8, 10], None]
    assert ["rows" in u for u in obj["units"]] == [False, True, True, True, False]
    back = Manifest.from_bytes(m.to_bytes())
    assert back == m and back.to_bytes() == m.to_bytes()
    assert [u.name for u in back.shards] == [f"{EMB}.rows-0-4", f"{EMB}.rows-4-8", f"{EMB}.rows-8-10"]
    assert {t: [u.rows for u in us] for t, us in back.shard_groups().items()} == {EMB: [(0, 4), (4, 8), (8, 10)]}
    assert [u.name for u in back.resident] == ["resident"]
    assert [u.name for u in back.streamed] == ["model.layers.0"]
    assert back.shards[0].shard_tensor == EMB and back.resident[0].shard_tensor is None
    assert 2 in SUPPORTED_VERSIONS and 1 in SUPPORTED_VERSIONS


def test_quantized_shard_companions_and_two_groups():
    q = {f"{EMB}.qscale": _spec("F16", (4, 2), 32)}
    s1 = _shard(0, 4, 1, dtype="I8", cols=128, extra=q)
    s2 = _shard(4, 8, 2, dtype="I8", cols=128, extra={f"{EMB}.qscale": _spec("F16", (4, 2), 32)})
    head = _shard(0, 8, 3, tensor="lm_head.weight")
    m = _manifest(s1, s2, head)
    assert s1.shard_tensor == EMB
    assert list(m.shard_groups()) == [EMB, "lm_head.weight"]


def test_unsharded_manifest_stays_version_1():
    m = _manifest()
    assert m.format_version == 1 and json.loads(m.to_bytes())["format_version"] == 1
    assert m.shards == [] and m.shard_groups() == {}


BAD_GROUPS = {
    "gap": (lambda: (_shard(0, 4, 1), _shard(5, 8, 2)), r"rows \[4, 5\) of sharded tensor .* are in no shard"),
    "not from 0": (lambda: (_shard(2, 4, 1),), r"rows \[0, 2\) of sharded tensor"),
    "overlap": (lambda: (_shard(0, 4, 1), _shard(3, 8, 2)), r"overlaps rows before 4"),
    "out of order": (lambda: (_shard(4, 8, 1), _shard(0, 4, 2)), r"rows \[0, 4\) .* in no shard"),
    "mixed dtype": (lambda: (_shard(0, 4, 1), _shard(4, 8, 2, dtype="F16")), r"disagree.*F32.*F16"),
    "trailing dims": (lambda: (_shard(0, 4, 1), _shard(4, 8, 2, cols=6)), r"dtype and trailing dimensions"),
    "companions differ": (lambda: (_shard(0, 4, 1, dtype="I8", cols=128,
                                          extra={f"{EMB}.qscale": _spec("F16", (4, 2), 512)}),
                                   _shard(4, 8, 2, dtype="I8", cols=128)), r"hold different tensors"),
}


@pytest.mark.parametrize("make, match", list(BAD_GROUPS.values()), ids=list(BAD_GROUPS))
def test_bad_shard_groups_rejected(make, match):
    with pytest.raises(ManifestError, match=match):
        _manifest(*make())


def test_sharded_tensor_also_in_resident_rejected():
    with pytest.raises(ManifestError, match="is sharded .* and also stored in a non-shard unit"):
        _manifest(_shard(0, 4, 1), resident={EMB: _spec("F32", (4, 8))})


def test_ties_to_a_sharded_tensor():
    _manifest(_shard(0, 4, 1), tied={"lm_head.weight": EMB})  # allowed
    with pytest.raises(ManifestError, match="must point at a stored tensor"):
        _manifest(_shard(0, 4, 1), tied={EMB: "model.norm.weight"})  # a sharded tensor is stored: not an alias


BAD_UNITS = {
    "two tensors": (lambda: _shard(0, 4, 1, extra={"other.weight": _spec("F32", (4, 8))}), "exactly one model tensor"),
    "stray companion": (lambda: _shard(0, 4, 1, extra={"other.weight.qscale": _spec("F16", (4, 2))}),
                        "neither .* nor one of its companions"),
    "1-D": (lambda: _unit("s", 1, "shard", {EMB: _spec("F32", (4,))}, rows=(0, 4)), "2 or more dimensions"),
    "row count": (lambda: _unit("s", 1, "shard", {EMB: _spec("F32", (3, 8))}, rows=(0, 4)), "with 4 rows"),
    "no rows": (lambda: _unit("s", 1, "shard", {EMB: _spec("F32", (4, 8))}), "'rows' is required"),
    "rows on resident": (lambda: _unit("resident", 0, "resident", {}, rows=(0, 4)), "'rows' is required for role"),
    "empty rows": (lambda: _unit("s", 1, "shard", {EMB: _spec("F32", (0, 8))}, rows=(2, 2)), "0 <= start < stop"),
}


@pytest.mark.parametrize("make, match", list(BAD_UNITS.values()), ids=list(BAD_UNITS))
def test_bad_shard_units_rejected(make, match):
    with pytest.raises(ManifestError, match=match):
        make()


def _json() -> dict:
    return json.loads(_manifest(_shard(0, 4, 1), _shard(4, 8, 2)).to_bytes())


def _with(fn) -> bytes:
    obj = _json()
    fn(obj)
    return json.dumps(obj).encode()


BAD_JSON = {
    "rows missing": (lambda o: o["units"][1].pop("rows"), r"units\[1\]: missing field 'rows'"),
    "rows not list": (lambda o: o["units"][1].__setitem__("rows", "0-4"), r"'rows' must be list"),
    "rows one int": (lambda o: o["units"][1].__setitem__("rows", [4]), r"'rows' must be \[start, stop\]"),
    "rows three": (lambda o: o["units"][1].__setitem__("rows", [0, 2, 4]), r"'rows' must be \[start, stop\]"),
    "rows str": (lambda o: o["units"][1].__setitem__("rows", [0, "4"]), r"'rows' must be \[start, stop\]"),
    "rows bool": (lambda o: o["units"][1].__setitem__("rows", [False, 4]), r"'rows' must be \[start, stop\]"),
    "rows float": (lambda o: o["units"][1].__setitem__("rows", [0, 4.0]), r"'rows' must be \[start, stop\]"),
    "rows negative": (lambda o: o["units"][1].__setitem__("rows", [-1, 3]), "0 <= start < stop"),
    "rows reversed": (lambda o: o["units"][1].__setitem__("rows", [4, 0]), "0 <= start < stop"),
    "rows on streamed": (lambda o: o["units"][3].__setitem__("rows", [0, 8]), r"units\[3\]: field 'rows' is only"),
    "rows vs shape": (lambda o: o["units"][1].__setitem__("rows", [0, 3]), r"units\[1\]: .*with 3 rows"),
    "version 1 with shards": (lambda o: o.__setitem__("format_version", 1), "role 'shard' needs format_version 2"),
    "version 4": (lambda o: o.__setitem__("format_version", 4), "format_version 4 is not supported.*upgrade"),
}


@pytest.mark.parametrize("fn, match", list(BAD_JSON.values()), ids=list(BAD_JSON))
def test_bad_shard_json_rejected(fn, match):
    with pytest.raises(ManifestError, match=match):
        Manifest.from_bytes(_with(fn))


# -- the builder ------------------------------------------------------------------------------------------
def _weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {EMB: torch.randn(10, 8, generator=g), "model.norm.weight": torch.randn(8, generator=g),
            "model.layers.0.w": torch.randn(8, 8, generator=g)}


def _write(mem: MemoryBackend, w: dict[str, torch.Tensor], cuts=((0, 4), (4, 8), (8, 10))) -> Manifest:
    units = {"resident": {"model.norm.weight": w["model.norm.weight"]}}
    units.update({shard_unit_name(EMB, a, b): {EMB: w[EMB][a:b]} for a, b in cuts})
    units["model.layers.0"] = {"model.layers.0.w": w["model.layers.0.w"]}
    return asyncio.run(write_model(mem, "m", name="tiny", units=units, architecture="LlamaForCausalLM",
                                   model_type="llama", config={}, rows={shard_unit_name(EMB, a, b): (a, b)
                                                                        for a, b in cuts}))


def test_write_model_with_rows_writes_version_2_and_verifiable_shards():
    mem, w = MemoryBackend(), _weights()
    m = _write(mem, w)
    assert m.format_version == 2 and [u.role for u in m.units] == ["resident", "shard", "shard", "shard", "streamed"]
    assert Manifest.from_bytes(mem.objects["m/manifest.json"]) == m
    parts = []
    for u in m.shard_groups()[EMB]:
        data = bytes(mem.objects[f"m/{u.path}"])
        d = Digests.of(data)
        assert (d.sha256, d.blake3, len(data)) == (u.sha256, u.blake3, u.bytes)
        parts.append(st_load(data)[EMB])
    assert torch.equal(torch.cat(parts), w[EMB])
    assert EMB not in m.unit("resident").tensors


def test_builder_refuses_bad_rows_before_saving():
    mem, w = MemoryBackend(), _weights()
    b = ModelBuilder(mem, "m", name="tiny")
    with pytest.raises(ManifestError, match="with 5 rows"):
        asyncio.run(b.add_unit("s", {EMB: w[EMB][:4]}, rows=(0, 5)))
    with pytest.raises(ManifestError, match="'rows' is required"):
        asyncio.run(b.add_unit("s", {EMB: w[EMB][:4]}, role="resident", rows=(0, 4)))
    assert not any(k.startswith("m/units/") for k in mem.objects)
    with pytest.raises(ManifestError, match="in no shard"):  # a gap: refused by finish, no manifest saved
        _write(mem, w, cuts=((0, 4), (5, 10)))
    assert "m/manifest.json" not in mem.objects


def test_rerun_is_byte_identical():
    a, b, w = MemoryBackend(), MemoryBackend(), _weights()
    _write(a, w)
    _write(b, w)
    _write(b, w)  # rerun over the same model
    assert {k: bytes(v) for k, v in a.objects.items()} == {k: bytes(v) for k, v in b.objects.items()}
