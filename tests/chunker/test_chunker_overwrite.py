"""Chunking into a directory that holds another model (issue 19 #2) and the mode of written files (#11)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tests.support.models import chunk
from streaming_weights.exceptions import ChunkingError
from streaming_weights.format import Manifest


def listing(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())


def expected_listing(m: Manifest) -> list[str]:
    return sorted(["manifest.json", *(u.path for u in m.units), *(f.path for f in m.files)])


def test_different_model_refused_then_replaced_with_force(tiny_source, tmp_path):
    out = tmp_path / "chunks"
    chunk(tiny_source("llama"), out, name="a")
    before = {p: (out / p).read_bytes() for p in listing(out)}
    with pytest.raises(ChunkingError, match=r"already holds model 'a'.*--force"):
        chunk(tiny_source("gpt2"), out, name="b")
    # refused before the source is even opened: a missing source reports the target, not the path
    with pytest.raises(ChunkingError, match="already holds model 'a'"):
        chunk(tmp_path / "no-such-model", out, name="b")
    assert {p: (out / p).read_bytes() for p in listing(out)} == before  # model a untouched

    res = chunk(tiny_source("gpt2"), out, name="b", force=True)
    m = Manifest.from_bytes((out / "manifest.json").read_bytes())
    assert res["name"] == m.name == "b" and m.architecture == "GPT2LMHeadModel"
    assert listing(out) == expected_listing(m)  # none of a's unit files stayed behind
    assert not any("model.layers" in p for p in listing(out))


def test_same_model_rechunked_in_place(tiny_source, tmp_path):
    out = tmp_path / "chunks"
    src = tiny_source("llama")
    chunk(src, out, name="m")
    (out / "units" / "model.layers.99.safetensors").write_bytes(b"stale unit of an older version")
    res = chunk(src, out, name="m", dtype="float16")
    m = Manifest.from_bytes((out / "manifest.json").read_bytes())
    assert res["dtype"] == m.dtype == "float16"
    assert listing(out) == expected_listing(m)


def test_failed_source_leaves_the_existing_model(tiny_source, tmp_path):
    out = tmp_path / "chunks"
    chunk(tiny_source("llama"), out, name="m")
    before = {p: (out / p).read_bytes() for p in listing(out)}
    with pytest.raises(ChunkingError, match="no such file"):
        chunk(tmp_path / "missing" / "x", out, name="m")
    assert {p: (out / p).read_bytes() for p in listing(out)} == before


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_chunk_files_readable_by_others_under_umask_022(tiny_source, tmp_path):
    old = os.umask(0o022)
    try:
        chunk(tiny_source("bert"), tmp_path / "c", name="bert")
    finally:
        os.umask(old)
    modes = {p: stat.S_IMODE((tmp_path / "c" / p).stat().st_mode) for p in listing(tmp_path / "c")}
    assert "manifest.json" in modes and any(p.startswith("units/") for p in modes)
    assert set(modes.values()) == {0o644}, modes
