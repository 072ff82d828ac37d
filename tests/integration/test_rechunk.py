"""Issue 23, item 5: a weight server (and a storage source) follows its storage while it runs.

A model chunked into the served directory after start-up is served without a restart; a re-chunked model is
served with the manifest that matches its units; a client that loaded the old manifest gets
ModelChangedError ("re-chunked … load the model again"), not "corrupted in storage or in transit". On a
running ``surfing serve`` process, in a chunk directory, and over S3.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from streaming_weights import ModelChunker, StreamingLlamaModel
from streaming_weights.exceptions import IntegrityError, ModelChangedError
from tests.cli.helpers import surfing_here
from tests.support import models as tiny
from tests.support.models import chunk
from tests.support.servers import start_server_process
from tests.support.streaming import served

IDS = torch.tensor([[1, 5, 9, 23, 7, 3]])


def _retrained(src: Path, out: Path) -> Path:
    """A copy of checkpoint ``src`` with every weight changed (same shapes, so same unit sizes): a new
    training run of the same model."""
    shutil.copytree(src, out)
    for f in out.glob("*.safetensors"):
        save_file({k: (v * 0.5 + 0.01).contiguous() for k, v in load_file(str(f)).items()}, str(f),
                  metadata={"format": "pt"})
    return out


def _first_layers(src: Path, out: Path, n: int) -> Path:
    """A copy of llama checkpoint ``src`` keeping only its first ``n`` layers (those stay byte-identical)."""
    import json

    shutil.copytree(src, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["num_hidden_layers"] = n
    (out / "config.json").write_text(json.dumps(cfg))
    for f in out.glob("*.safetensors"):
        kept = {k: v for k, v in load_file(str(f)).items()
                if not k.startswith("model.layers.") or int(k.split(".")[2]) < n}
        save_file(kept, str(f), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """(first checkpoint, its retrained copy, logits of each on IDS)."""
    root = tmp_path_factory.mktemp("rechunk")
    old = tiny.llama(root / "tiny-llama", layers=3)
    new = _retrained(old, root / "tiny-llama-v2")
    want = []
    for src in (old, new):
        with torch.no_grad():
            want.append(AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()(IDS).logits)
    assert not torch.allclose(want[0], want[1])
    return old, new, want


def _open(where: str) -> StreamingLlamaModel:
    return StreamingLlamaModel("m", where, cache_size=0, prefetch_count=0)  # every forward fetches every layer


def _logits(model: StreamingLlamaModel) -> torch.Tensor:
    return model.hf_model(input_ids=IDS).logits


def _old_then_new(where: str, rechunk, want: list[torch.Tensor]) -> None:
    """A client loads the model, it is re-chunked, a new client gets the new weights and the old client a
    ModelChangedError saying what to do."""
    with _open(where) as before:
        assert torch.allclose(_logits(before), want[0], atol=1e-5)
        rechunk()
        with _open(where) as after:  # the manifest that matches the units now in storage
            assert torch.allclose(_logits(after), want[1], atol=1e-5)
        with pytest.raises(ModelChangedError, match=r"model 'm' was re-chunked at .* load the model again") as err:
            _logits(before)
        assert "corrupted" not in str(err.value) and isinstance(err.value, IntegrityError)
        assert isinstance(err.value.__cause__, Exception)  # the mismatch it explains


def test_a_model_chunked_after_start_up_is_served_by_the_running_server(sources, tmp_path, capfd):
    old, new, want = sources
    chunk(old, tmp_path / "m", name="m")
    proc, port = start_server_process(tmp_path)
    try:
        res = surfing_here(capfd, "chunk", new, "--output-dir", tmp_path / "later", "--name", "later")  # while it serves
        assert res.returncode == 0, res.stderr
        with StreamingLlamaModel("later", f"ws://127.0.0.1:{port}", cache_size=0) as later:
            assert torch.allclose(_logits(later), want[1], atol=1e-5)
        shutil.rmtree(tmp_path / "later")  # and a removed one is no longer served
        res = surfing_here(capfd, "embed", "--server", f"ws://127.0.0.1:{port}", "--model", "later", "--text", "x")
        assert res.returncode == 2 and "does not host model 'later'; it hosts ['m']" in res.stderr, res.stderr
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_model_re_chunked_under_a_running_server(sources, tmp_path, capfd):
    old, new, want = sources
    chunk(old, tmp_path / "m", name="m")
    proc, port = start_server_process(tmp_path)

    def rechunk() -> None:
        res = surfing_here(capfd, "chunk", new, "--output-dir", tmp_path / "m", "--name", "m", "--force")
        assert res.returncode == 0, res.stderr

    try:
        _old_then_new(f"ws://127.0.0.1:{port}", rechunk, want)
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_model_re_chunked_in_a_chunk_directory(sources, tmp_path):
    old, new, want = sources
    chunk(old, tmp_path / "m", name="m")
    _old_then_new(str(tmp_path), lambda: chunk(new, tmp_path / "m", name="m", force=True), want)


@pytest.mark.s3
def test_a_model_chunked_and_re_chunked_in_s3(sources, s3_server, s3_bucket, monkeypatch):
    old, new, want = sources
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)

    def to_s3(src: Path, prefix: str, name: str) -> None:
        backend = s3_server.backend(s3_bucket, prefix)
        asyncio.run(ModelChunker(str(src), storage_backend=backend, name=name, force=True).chunk_model())

    to_s3(old, "models/m", "m")
    with served(f"s3://{s3_bucket}/models", token="") as uri:
        to_s3(new, "models/later", "later")  # after start-up
        with StreamingLlamaModel("later", uri, cache_size=0) as later:
            assert torch.allclose(_logits(later), want[1], atol=1e-5)
        _old_then_new(uri, lambda: to_s3(new, "models/m", "m"), want)
    to_s3(old, "models/m", "m")
    _old_then_new(f"s3://{s3_bucket}/models", lambda: to_s3(new, "models/m", "m"), want)  # s3:// read directly


def test_a_unit_gone_with_the_re_chunk_is_a_model_change_too(sources, tmp_path):
    old, _, _ = sources
    chunk(old, tmp_path / "m", name="m")
    with _open(str(tmp_path)) as before:
        _logits(before)
        chunk(_first_layers(old, tmp_path / "two-layers", 2), tmp_path / "m", name="m", force=True)
        with pytest.raises(ModelChangedError, match="unit 'model.layers.2' is no longer part of it"):
            _logits(before)
