"""Issue 23, item 2: the original API chunks and streams with the same ``model_name`` (a local path or a hub
id). A model is reached by that, by its name, or by an unambiguous base name: over a weight server, a chunk
directory and s3://, from the library and from the CLI (``--model``)."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from streaming_weights import ModelChunker, StreamingBertModel, StreamingLlamaModel
from streaming_weights.exceptions import NotFoundError
from tests.cli.helpers import assert_one_line_error, surfing_here
from tests.support import models as tiny
from tests.support.models import chunk
from tests.support.streaming import served

IDS = torch.tensor([[1, 5, 9, 23, 7, 3]])


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Two tiny models chunked into one directory with their default names, as the original docs do:
    ``…/src/tiny-llama`` (named ``tiny-llama``) and a BERT in a generic ``tiny-bert-pkg/model`` folder
    (named ``tiny-bert-pkg``). Returns (chunks dir, llama source, bert source, llama reference)."""
    root = tmp_path_factory.mktemp("names")
    src = tiny.llama(root / "src" / "tiny-llama", layers=3)
    bsrc = tiny.bert(root / "tiny-bert-pkg" / "model", layers=2)
    assert chunk(src, root / "chunks" / "a")["name"] == "tiny-llama"
    assert chunk(bsrc, root / "chunks" / "b")["name"] == "tiny-bert-pkg"
    ref = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    return root / "chunks", src, bsrc, ref


def _logits(name: str, where: str) -> torch.Tensor:
    with StreamingLlamaModel(model_name=name, websocket_uri=where, cache_size=0, prefetch_count=1) as model:
        assert model.model_name == "tiny-llama"  # whatever it was asked by, it is the manifest's model
        return model.hf_model(input_ids=IDS).logits


def _names(src) -> list[str]:
    return [str(src), f"{src}/", "tiny-llama", "someorg/tiny-llama", f"{src.parent}/../src/tiny-llama"]


def test_the_model_name_that_chunked_a_model_reaches_it_over_a_weight_server(store):
    chunks, src, bsrc, ref = store
    with torch.no_grad():
        want = ref(IDS).logits
    with served(chunks, token="") as uri:
        for name in _names(src):
            assert torch.allclose(_logits(name, uri), want, atol=1e-5), name
        with StreamingBertModel(model_name=str(bsrc), websocket_uri=uri) as bert:  # a generic folder's source id
            bert.ensure_loaded()
            assert bert.model_name == "tiny-bert-pkg"
        with pytest.raises(NotFoundError, match=r"does not host model 'tiny'; it hosts \['tiny-bert-pkg', 'tiny-llama'\]"):
            StreamingLlamaModel("tiny", uri).ensure_loaded()


def test_the_same_names_reach_it_in_a_chunk_directory(store):
    chunks, src, _, ref = store
    with torch.no_grad():
        want = ref(IDS).logits
    for name in _names(src):
        assert torch.allclose(_logits(name, str(chunks)), want, atol=1e-5), name


def test_a_base_name_of_two_models_is_refused_naming_both(store, tmp_path):
    _, src, _, _ = store
    chunk(src, tmp_path / "a")  # tiny-llama
    chunk(src, tmp_path / "b", name="tiny-llama-fp16", dtype="float16")  # the same source, another name
    with served(tmp_path, token="") as uri:
        with pytest.raises(NotFoundError, match=r"ambiguous.*\['tiny-llama', 'tiny-llama-fp16'\]"):
            StreamingLlamaModel(str(src), uri).ensure_loaded()  # both were chunked from it
        assert _logits("tiny-llama", uri).shape == (1, IDS.shape[1], 320)  # its exact name still reaches one


@pytest.mark.s3
def test_the_model_name_that_chunked_a_model_reaches_it_over_s3(store, s3_server, s3_bucket, monkeypatch):
    _, src, _, ref = store
    asyncio.run(ModelChunker(str(src), storage_backend=s3_server.backend(s3_bucket, "models/tiny-llama")).chunk_model())
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    with torch.no_grad():
        want = ref(IDS).logits
    assert torch.allclose(_logits(str(src), f"s3://{s3_bucket}/models"), want, atol=1e-5)
    with served(f"s3://{s3_bucket}/models", token="") as uri:
        assert torch.allclose(_logits("someorg/tiny-llama", uri), want, atol=1e-5)


def test_cli_model_names_follow_the_readme(store, tmp_path, capfd):
    """``surfing chunk`` with default names, then ``--model`` by name, source path and ``org/name`` over a
    running weight server; the real MiniLM checkpoint (folder ``model``) is named all-MiniLM-L6-v2. The
    commands run in-process (their fresh-process runs are in tests/cli)."""
    chunks, _, _, _ = store
    minilm = tiny.packaged_minilm_dir()
    res = surfing_here(capfd, "chunk", minilm, "--output-dir", tmp_path / "minilm")
    assert res.returncode == 0 and "all-MiniLM-L6-v2" in res.stdout, res.stderr
    for args in (("--server", tmp_path / "minilm"),):
        for name in ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2", str(minilm)):
            out = surfing_here(capfd, "embed", *args, "--model", name, "--text", "a sentence", "--normalize")
            assert out.returncode == 0, (name, out.stderr)
            assert json.loads(out.stdout)["model"] == "all-MiniLM-L6-v2", name
    with served(chunks, token="") as uri:
        res = surfing_here(capfd, "embed", "--server", uri, "--model", "tiny", "--text", "x")
        assert_one_line_error(res, "does not host model 'tiny'", "tiny-llama")


def test_cli_a_gguf_model_by_its_name_its_tagged_stem_and_its_file(smollm2_chunks, capfd):
    """The session's SmolLM2 was chunked from the packaged GGUF with the default name (SmolLM2-135M-Instruct,
    see conftest); over a running server it answers to the old tagged name and to the file it came from."""
    gguf = tiny.packaged_smollm2_gguf()
    with served(smollm2_chunks, token="") as uri:
        host_port = uri.removeprefix("ws://")
        for name in ("SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct.Q4_1", str(gguf), "HuggingFaceTB/SmolLM2-135M-Instruct"):
            res = surfing_here(capfd, "inspect", host_port, "--model", name, "--json")
            assert res.returncode == 0, (name, res.stderr)
            manifest = json.loads(res.stdout)
            assert manifest["name"] == "SmolLM2-135M-Instruct" and manifest["source"] == str(gguf), name
        res = surfing_here(capfd, "inspect", host_port, "--model", "SmolLM2-135M-Instruct.Q8_0")
        assert_one_line_error(res, "does not host model 'SmolLM2-135M-Instruct.Q8_0'")  # another quantization
