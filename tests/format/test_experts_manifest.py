"""format/: expert units (role "expert", "rows" = experts [start, stop) of one experts module), their validation
and format_version 3; older manifests keep loading."""

from __future__ import annotations

import json

import pytest

from streaming_weights.exceptions import ManifestError
from streaming_weights.format import Digests, Manifest, TensorSpec, UnitEntry
from streaming_weights.format.manifest import EXPERT_VERSION, FORMAT_VERSION, SUPPORTED_VERSIONS
from streaming_weights.format.names import expert_unit_name

MOD = "model.layers.0.mlp.experts"
D = Digests.of(b"")


def _spec(shape: tuple[int, ...], dtype: str = "F32", start: int = 0) -> TensorSpec:
    size = {"F32": 4, "F16": 2}[dtype]
    for d in shape:
        size *= d
    return TensorSpec(dtype, shape, (start, start + size))


def _unit(name: str, order: int, role: str, tensors: dict[str, TensorSpec], rows=None) -> UnitEntry:
    size = 8 + max((t.data_offsets[1] for t in tensors.values()), default=0)
    return UnitEntry(name, f"units/{name}.safetensors", size, D.sha256, D.blake3, role=role, order=order,
                     tensors=tensors, rows=rows)


def _expert(start: int, stop: int, order: int, *, module: str = MOD, name: str | None = None, dtype: str = "F32",
            hidden: int = 8, tensors: dict[str, TensorSpec] | None = None) -> UnitEntry:
    n = stop - start
    gate_up = _spec((n, 2 * hidden, hidden), dtype)
    down = _spec((n, hidden, hidden), dtype, gate_up.data_offsets[1])
    tensors = tensors if tensors is not None else {f"{module}.gate_up_proj": gate_up, f"{module}.down_proj": down}
    return _unit(name or expert_unit_name(module, start, stop), order, "expert", tensors, rows=(start, stop))


def _manifest(*experts: UnitEntry, dense: dict[str, TensorSpec] | None = None, **kw) -> Manifest:
    units = (_unit("resident", 0, "resident", {"model.norm.weight": _spec((8,))}),
             _unit("model.layers.0", 1, "streamed", dense or {"model.layers.0.mlp.gate.weight": _spec((4, 8))}),
             *experts)
    return Manifest(name="m", architecture="MixtralForCausalLM", model_type="mixtral", config={"num_local_experts": 4},
                    dtype="float32", units=units, **kw)


def _four(**kw) -> tuple[UnitEntry, ...]:
    return tuple(_expert(e, e + 1, 2 + e, **kw) for e in range(4))


def test_expert_unit_names():
    assert expert_unit_name("model.layers.3.mlp.experts", 5, 6) == "model.layers.3.mlp.experts.5"
    assert expert_unit_name("model.layers.3.mlp.experts", 4, 8) == "model.layers.3.mlp.experts.4-7"
    with pytest.raises(ManifestError, match="invalid unit name"):
        expert_unit_name("../x", 0, 1)


def test_expert_manifest_round_trip_is_version_3_with_groups():
    m = _manifest(*_four())
    assert m.format_version == EXPERT_VERSION == 3 and FORMAT_VERSION >= 3 and 3 in SUPPORTED_VERSIONS
    obj = json.loads(m.to_bytes())
    assert obj["format_version"] == 3
    assert [u.get("rows") for u in obj["units"]] == [None, None, [0, 1], [1, 2], [2, 3], [3, 4]]
    assert [u["role"] for u in obj["units"]] == ["resident", "streamed"] + ["expert"] * 4
    back = Manifest.from_bytes(m.to_bytes())
    assert back == m and back.to_bytes() == m.to_bytes()
    groups = {p: [u.rows for u in us] for p, us in back.expert_groups().items()}
    assert groups == {MOD: [(0, 1), (1, 2), (2, 3), (3, 4)]}
    assert [u.name for u in back.experts] == [f"{MOD}.{e}" for e in range(4)]
    assert back.experts[0].expert_module == MOD and back.streamed[0].expert_module is None
    assert [u.name for u in back.streamed] == ["model.layers.0"] and back.shards == []


def test_grouped_expert_units_and_two_modules():
    other = "model.layers.1.mlp.experts"
    m = _manifest(_expert(0, 2, 2), _expert(2, 4, 3), _expert(0, 4, 4, module=other))
    assert [u.name for u in m.experts] == [f"{MOD}.0-1", f"{MOD}.2-3", f"{other}.0-3"]
    assert list(m.expert_groups()) == [MOD, other]


def test_manifests_without_experts_keep_their_version():
    m = _manifest()
    assert m.format_version == 1 and m.experts == [] and m.expert_groups() == {}
    assert Manifest.from_bytes(m.to_bytes()).format_version == 1


BAD_GROUPS = {
    "gap": (lambda: (_expert(0, 1, 2), _expert(2, 3, 3)),
            rf"rows \[1, 2\) of experts module '{MOD}' are in no expert unit"),
    "not from 0": (lambda: (_expert(1, 2, 2),), rf"rows \[0, 1\) of experts module '{MOD}' are in no expert unit"),
    "overlap": (lambda: (_expert(0, 2, 2), _expert(1, 3, 3)),
                r"expert unit .*\.1-2' \(rows \[1, 3\)\) overlaps rows before 2 of experts module"),
    "duplicate expert": (lambda: (_expert(0, 1, 2), _expert(0, 1, 3, name=f"{MOD}.0")), "duplicate unit names"),
    "out of order": (lambda: (_expert(1, 2, 2), _expert(0, 1, 3)), r"rows \[0, 1\) .* in no"),
    "mixed dtypes": (lambda: (_expert(0, 1, 2), _expert(1, 2, 3, dtype="F16")), r"disagree.*F32.*F16"),
    "trailing dims": (lambda: (_expert(0, 1, 2), _expert(1, 2, 3, hidden=4)), r"dtype and trailing dimensions"),
    "different tensors": (lambda: (_expert(0, 1, 2), _expert(1, 2, 3, tensors={f"{MOD}.down_proj": _spec((1, 8, 8))})),
                          r"hold different tensors"),
}


@pytest.mark.parametrize("make, match", list(BAD_GROUPS.values()), ids=list(BAD_GROUPS))
def test_bad_expert_groups_rejected(make, match):
    with pytest.raises(ManifestError, match=match):
        _manifest(*make())


BAD_UNITS = {
    "wrong name": (lambda: _expert(0, 1, 2, name=f"{MOD}.7"), rf"must be named '{MOD}\.0'"),
    "layer's name": (lambda: _expert(0, 1, 2, name="model.layers.0"), "must be named"),
    "mixed modules": (lambda: _expert(0, 1, 2, tensors={f"{MOD}.gate_up_proj": _spec((1, 16, 8)),
                                                        "model.layers.1.mlp.experts.down_proj": _spec((1, 8, 8))}),
                      "exactly one experts module"),
    "top-level tensor": (lambda: _expert(0, 1, 2, tensors={"gate_up_proj": _spec((1, 16, 8))}),
                         "exactly one experts module"),
    "1-D": (lambda: _expert(0, 1, 2, tensors={f"{MOD}.bias": _spec((1,))}), "2 or more dimensions"),
    "row count": (lambda: _expert(0, 2, 2, tensors={f"{MOD}.down_proj": _spec((1, 8, 8))}), "with 2 rows"),
    "no rows": (lambda: _unit(f"{MOD}.0", 2, "expert", {f"{MOD}.down_proj": _spec((1, 8, 8))}), "'rows' is required"),
    "rows on streamed": (lambda: _unit("model.layers.0", 1, "streamed", {"x.w": _spec((1, 8))}, rows=(0, 1)),
                         "'rows'"),
}


@pytest.mark.parametrize("make, match", list(BAD_UNITS.values()), ids=list(BAD_UNITS))
def test_bad_expert_units_rejected(make, match):
    with pytest.raises(ManifestError, match=match):
        make()


def test_expert_tensor_also_stored_in_the_layer_rejected():
    dense = {"model.layers.0.mlp.gate.weight": _spec((4, 8)), f"{MOD}.down_proj": _spec((4, 8, 8))}
    with pytest.raises(ManifestError, match="split into expert units .* and also stored in another unit"):
        _manifest(*_four(), dense=dense)


def _json() -> dict:
    return json.loads(_manifest(*_four()).to_bytes())


def _with(fn) -> bytes:
    obj = _json()
    fn(obj)
    return json.dumps(obj).encode()


BAD_JSON = {
    "version 2 with experts": (lambda o: o.__setitem__("format_version", 2), "role 'expert' needs format_version 3"),
    "version 1 with experts": (lambda o: o.__setitem__("format_version", 1), "role 'expert' needs format_version 3"),
    "rows missing": (lambda o: o["units"][2].pop("rows"), r"units\[2\]: missing field 'rows'"),
    "rows on streamed": (lambda o: o["units"][1].__setitem__("rows", [0, 1]), r"units\[1\]: field 'rows' is only"),
    "rows on resident": (lambda o: o["units"][0].__setitem__("rows", [0, 1]), r"units\[0\]: field 'rows' is only"),
    "rows vs name": (lambda o: o["units"][3].__setitem__("rows", [2, 3]), r"units\[3\]: .*must be named"),
    "rows vs shape": (lambda o: o["units"][5].update(rows=[3, 5], name=f"{MOD}.3-4",
                                                    path=f"units/{MOD}.3-4.safetensors"), r"units\[5\]: .*with 2 rows"),
    "dropped middle expert": (lambda o: o["units"].pop(3), r"rows \[1, 2\) of experts module .* in no expert unit"),
    "unknown role": (lambda o: o["units"][2].__setitem__("role", "experts"), "role must be one of"),
}


@pytest.mark.parametrize("fn, match", list(BAD_JSON.values()), ids=list(BAD_JSON))
def test_bad_expert_json_rejected(fn, match):
    with pytest.raises(ManifestError, match=match):
        Manifest.from_bytes(_with(fn))


def test_version_2_manifest_with_shards_only_still_loads():
    obj = _json()
    obj["units"] = obj["units"][:2]
    obj["format_version"] = 2
    m = Manifest.from_bytes(json.dumps(obj).encode())
    assert m.format_version == 2 and not m.experts
