"""Hostile manifests: every size, count, rank and depth is bounded before anything is built from it."""

from __future__ import annotations

import json
import time
import tracemalloc

import pytest

from streaming_weights.exceptions import ManifestError, ManifestLimitError, SecurityError
from streaming_weights.format import Manifest
from streaming_weights.format.manifest import LIMITS, ManifestLimits, json_depth
from streaming_weights.storage import MemoryBackend

from tests.support.servers import build_model

TERABYTE = 1 << 40


@pytest.fixture(scope="module")
def good() -> dict:
    storage = MemoryBackend()
    build_model(storage, "m", {"resident": 1000, "model.layers.0": 4000, "model.layers.1": 4000})
    import asyncio

    return json.loads(asyncio.run(storage.load("manifest.json")))


def _bytes(obj: dict) -> bytes:
    return json.dumps(obj).encode()


def test_a_real_manifest_is_within_every_limit(good):
    assert Manifest.from_bytes(_bytes(good)).name == "m"
    assert json_depth(_bytes(good), LIMITS.max_json_depth) <= 6


def test_a_terabyte_unit_is_refused_fast_with_a_specific_error_and_no_allocation(good):
    obj = json.loads(json.dumps(good))
    unit = obj["units"][1]
    unit["bytes"] = TERABYTE
    name = next(iter(unit["tensors"]))
    n = TERABYTE // 4
    unit["tensors"] = {name: {"dtype": "F32", "shape": [n], "data_offsets": [0, TERABYTE]}}  # self-consistent
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(ManifestLimitError, match=r"manifest.units\[1\].*1099511627776 bytes.*limit") as info:
        Manifest.from_bytes(_bytes(obj))
    elapsed = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert elapsed < 1.0 and peak < 10 << 20
    assert isinstance(info.value, ManifestError) and isinstance(info.value, SecurityError)


def test_tensors_declaring_more_than_a_unit_may_hold_are_refused(good):
    obj = json.loads(json.dumps(good))
    unit = obj["units"][1]
    name = next(iter(unit["tensors"]))
    n = TERABYTE // 4  # a terabyte of float32 declared inside a unit that says it is a few KB
    unit["tensors"][name] = {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}
    with pytest.raises(ManifestLimitError, match=f"tensor {name!r} of 1099511627776 bytes"):
        Manifest.from_bytes(_bytes(obj))
    n = (40 << 30) // 4  # two tensors of 40 GiB each: each within the limit, together beyond it
    unit["tensors"] = {f"t{i}": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]} for i in range(2)}
    with pytest.raises(ManifestLimitError, match="declares tensors of 85899345920 bytes"):
        Manifest.from_bytes(_bytes(obj))


def test_tensor_data_beyond_its_units_declared_size_is_refused(good):
    obj = json.loads(json.dumps(good))
    unit = obj["units"][1]
    name = next(iter(unit["tensors"]))
    n = 1 << 30  # 4 GiB of float32 declared inside a unit that says it is a few KB (within every limit)
    unit["tensors"][name] = {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}
    with pytest.raises(ManifestLimitError, match="beyond the unit's declared"):
        Manifest.from_bytes(_bytes(obj))


def test_absurd_ranks_counts_and_totals_are_refused(good):
    obj = json.loads(json.dumps(good))
    name = next(iter(obj["units"][1]["tensors"]))
    obj["units"][1]["tensors"][name]["shape"] = [1] * 1000
    with pytest.raises(ManifestLimitError, match="1000 dimensions"):
        Manifest.from_bytes(_bytes(obj))
    small = ManifestLimits(max_units=2)
    with pytest.raises(ManifestLimitError, match="3 units; the limit is 2"):
        Manifest.from_bytes(_bytes(good), small)
    with pytest.raises(ManifestLimitError, match="tensors; the limit is 3"):
        Manifest.from_bytes(_bytes(good), ManifestLimits(max_tensors=3))
    with pytest.raises(ManifestLimitError, match="units of .* bytes; the limit is 100"):
        Manifest.from_bytes(_bytes(good), ManifestLimits(max_total_bytes=100))
    files = json.loads(json.dumps(good))
    files["files"] = [{"name": "x", "path": "files/x", "bytes": TERABYTE, "sha256": "0" * 64, "blake3": "0" * 64}]
    with pytest.raises(ManifestLimitError, match="a file of 1099511627776 bytes"):
        Manifest.from_bytes(_bytes(files))


def test_deep_json_is_refused_before_parsing_without_recursion(good):
    bomb = b"[" * 5_000_000 + b"]" * 5_000_000
    t0 = time.perf_counter()
    with pytest.raises(ManifestLimitError, match="nests deeper than 32"):
        Manifest.from_bytes(bomb)
    assert time.perf_counter() - t0 < 2.0
    sneaky = json.loads(json.dumps(good))
    sneaky["config"] = {"a": json.loads("[" * 40 + "]" * 40)}  # deep inside an otherwise valid manifest
    with pytest.raises(ManifestLimitError, match="nests deeper"):
        Manifest.from_bytes(_bytes(sneaky))
    # brackets inside strings are not structure
    quoted = json.loads(json.dumps(good))
    quoted["source"] = "[" * 100 + '\\"{'
    assert Manifest.from_bytes(_bytes(quoted)).source == quoted["source"]


def test_an_oversized_manifest_is_refused_before_parsing():
    with pytest.raises(ManifestLimitError, match="manifest.json is 2000 bytes; the limit is 1000"):
        Manifest.from_bytes(b" " * 2000, ManifestLimits(max_manifest_bytes=1000))


@pytest.mark.parametrize(("text", "depth"), [(b"{}", 1), (b'{"a": [1, {"b": []}]}', 4), (b'"[[["', 0),
                                             (b"[[[", 3), (b"[]" * 10, 1)])
def test_json_depth(text, depth):
    assert json_depth(text, 32) == depth
