"""ModelBuilder / write_model: the one writer of units + manifest (manifest last, no stale objects, no
silent replacement of another model)."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from streaming_weights.exceptions import ChunkingError, ManifestError, UnitFormatError
from streaming_weights.format import Digests, Manifest, ModelBuilder, decode_unit, encode_tensors, write_model
from streaming_weights.storage import MemoryBackend

META = dict(architecture="TestArch", model_type="test", config={"test": True})


def units(*names: str, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {n: {f"{n}.w": torch.randn(3, 4, generator=g), f"{n}.b": torch.randn(4, generator=g)} for n in names}


def write(storage, name: str, *unit_names: str, prefix: str = "m", **kw) -> Manifest:
    return asyncio.run(write_model(storage, prefix, name=name, units=units(*unit_names), **META, **kw))


class RecordingBackend(MemoryBackend):
    """Remembers the order of saves; optionally fails the n-th one."""

    def __init__(self, fail_at: int | None = None) -> None:
        super().__init__()
        self.saved: list[str] = []
        self.fail_at = fail_at

    async def save(self, key, data) -> None:
        if self.fail_at is not None and len(self.saved) == self.fail_at:
            raise OSError("disk full")
        self.saved.append(key)
        await super().save(key, data)


def test_write_model_round_trip():
    mem = RecordingBackend()
    want = units("resident", "layers.0", "layers.1")
    m = asyncio.run(write_model(mem, "m", name="tiny", units=want, files={"tokenizer.json": b"{}"},
                                tied={"head.w": "resident.w"}, **META))
    assert Manifest.from_bytes(mem.objects["m/manifest.json"]) == m
    assert mem.saved[-1] == "m/manifest.json"  # manifest last
    assert [(u.name, u.role, u.order) for u in m.units] == [
        ("resident", "resident", 0), ("layers.0", "streamed", 1), ("layers.1", "streamed", 2)]
    for u in m.units:
        data = mem.objects[f"m/{u.path}"]
        assert (len(data), Digests.of(data)) == (u.bytes, Digests(u.sha256, u.blake3))
        got = decode_unit(bytearray(data), u.tensors)
        assert all(torch.equal(got[k], v) for k, v in want[u.name].items())
    assert m.file("tokenizer.json").sha256 == Digests.of(b"{}").sha256 and m.tied == {"head.w": "resident.w"}


def test_roles_override_and_encoded_units():
    mem = MemoryBackend()
    raw = bytes(encode_tensors({"a.w": torch.arange(6.0)}))
    m = asyncio.run(write_model(mem, name="x", units={"first": raw, "second": units("second")["second"]},
                                roles={"first": "resident"}, **META))
    assert [u.role for u in m.units] == ["resident", "streamed"]
    assert mem.objects["units/first.safetensors"] == raw


def test_failed_write_leaves_no_manifest():
    mem = RecordingBackend(fail_at=2)
    with pytest.raises(OSError, match="disk full"):
        write(mem, "tiny", "resident", "layers.0", "layers.1")
    assert "m/manifest.json" not in mem.objects and mem.saved == ["m/units/resident.safetensors",
                                                                  "m/units/layers.0.safetensors"]


def test_rewrite_of_same_model_drops_orphans():
    mem = MemoryBackend()
    write(mem, "tiny", "resident", "layers.0", "layers.1", files={"vocab.txt": b"a"})
    mem.objects["m/units/leftover.safetensors"] = b"from an interrupted run"
    m = write(mem, "tiny", "resident", "layers.0")
    assert sorted(mem.objects) == ["m/manifest.json", "m/units/layers.0.safetensors", "m/units/resident.safetensors"]
    assert [u.name for u in m.units] == ["resident", "layers.0"]


def test_different_model_refused_unless_force():
    mem = MemoryBackend()
    mem.objects["other/manifest.json"] = b"not ours"  # a sibling model directory is never touched
    write(mem, "model-a", "resident", "a.0", "a.1")
    before = dict(mem.objects)
    with pytest.raises(ChunkingError, match=r"already holds model 'model-a'.*--force"):
        asyncio.run(ModelBuilder(mem, "m", name="model-b").check())
    with pytest.raises(ChunkingError, match="already holds model 'model-a'"):
        write(mem, "model-b", "resident", "b.0")
    assert mem.objects == before  # refused before anything was written
    write(mem, "model-b", "resident", "b.0", force=True)
    assert sorted(k for k in mem.objects if k.startswith("m/")) == [
        "m/manifest.json", "m/units/b.0.safetensors", "m/units/resident.safetensors"]
    assert Manifest.from_bytes(mem.objects["m/manifest.json"]).name == "model-b"
    assert mem.objects["other/manifest.json"] == b"not ours"


def test_force_clears_before_the_first_write():
    """With force, the old model's manifest and units are gone before a unit is written, so a run that
    fails midway leaves neither model's manifest behind."""
    mem = RecordingBackend()
    write(mem, "model-a", "resident", "a.0")
    mem.fail_at = len(mem.saved) + 1
    with pytest.raises(OSError):
        write(mem, "model-b", "resident", "b.0", force=True)
    assert sorted(mem.objects) == ["m/units/resident.safetensors"]  # model-b's first unit, no manifest


@pytest.mark.parametrize("content", [b"\xff not json", b"[1, 2]", json.dumps({"units": []}).encode()])
def test_unreadable_manifest_refused_unless_force(content):
    mem = MemoryBackend({"m/manifest.json": content})
    with pytest.raises(ChunkingError, match="names no model.*--force"):
        write(mem, "tiny", "resident")
    assert write(mem, "tiny", "resident", force=True).name == "tiny"


def test_older_format_manifest_of_same_model_is_replaced():
    mem = MemoryBackend({"m/manifest.json": json.dumps({"format_version": 0, "name": "tiny"}).encode()})
    assert write(mem, "tiny", "resident").format_version == 1


def test_bad_input():
    mem = MemoryBackend()
    b = ModelBuilder(mem, name="x")
    asyncio.run(b.add_unit("u", {"t": torch.zeros(1)}))
    with pytest.raises(ManifestError, match="added twice"):
        asyncio.run(b.add_unit("u", {"t2": torch.zeros(1)}))
    with pytest.raises(ManifestError, match="invalid unit name"):
        asyncio.run(b.add_unit("../evil", {"t": torch.zeros(1)}))
    with pytest.raises(UnitFormatError):
        asyncio.run(b.add_encoded_unit("v", b"\x01\x00\x00\x00\x00\x00\x00\x00{"))
    with pytest.raises(ManifestError, match="non-empty name"):
        ModelBuilder(mem, name="")
    with pytest.raises(ManifestError, match="more than one unit"):
        asyncio.run(write_model(mem, "y", name="y", units={"a": {"t": torch.zeros(1)}, "b": {"t": torch.zeros(1)}},
                                **META))
    assert "y/manifest.json" not in mem.objects
