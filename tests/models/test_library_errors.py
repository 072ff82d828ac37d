"""Bad input to the library: every mistake a user can make with chunks and names gets a specific error
that says what to do, through a local chunk directory and through a weight server alike.

(Pickle checkpoints offered to the chunker are covered in tests/chunker/test_chunker.py: test_malicious_pickle_rejected,
test_lone_pickle_file_rejected, test_directory_with_only_pickles_rejected.)
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
import torch

from streaming_weights import StreamingBaseModel, StreamingLlamaModel
from streaming_weights.exceptions import (
    ConfigurationError,
    IntegrityError,
    ManifestError,
    NotFoundError,
    StreamingWeightsError,
    UnitFormatError,
    UnitUnavailableError,
    UnsupportedArchitectureError,
)
from streaming_weights.format import Digests, encode_tensors
from streaming_weights.server import WeightServer

from tests.support.streaming import served

pytestmark = pytest.mark.timeout(120)
IDS = torch.tensor([[5, 17, 33, 2]])


@pytest.fixture
def chunks(tiny_chunks, tmp_path) -> Path:
    _, out = tiny_chunks("llama", layers=6)
    d = tmp_path / "llama"
    shutil.copytree(out, d)
    return d


def edit_manifest(d: Path, fn) -> None:
    m = json.loads((d / "manifest.json").read_text())
    fn(m)
    (d / "manifest.json").write_text(json.dumps(m))


def unit_entry(m: dict, name: str) -> dict:
    return next(u for u in m["units"] if u["name"] == name)


def cause_chain(exc: BaseException | None) -> list[type]:
    out = []
    while exc is not None:
        out.append(type(exc))
        exc = exc.__cause__
    return out


def start_server(d: Path):
    return asyncio.run(WeightServer(str(d), port=0).load_models())


# ------------------------------------------------------------------------------------- manifests
def test_missing_manifest(chunks):
    (chunks / "manifest.json").unlink()
    with pytest.raises(NotFoundError, match=r"no chunked model \(manifest.json\)"):
        StreamingLlamaModel(None, str(chunks))
    with pytest.raises(ConfigurationError, match=r"no chunked model \(manifest.json\)"):
        start_server(chunks)


@pytest.mark.parametrize("text", ["{not json", "[]", '{"format_version": 1}', '{"format_version": 999, "name": "x"}', ""])
def test_malformed_manifest(chunks, text):
    (chunks / "manifest.json").write_text(text)
    with pytest.raises(ManifestError) as ei:
        StreamingLlamaModel(None, str(chunks))
    assert "manifest.json" in str(ei.value)  # says which file is wrong
    with pytest.raises(ManifestError, match="manifest.json"):
        start_server(chunks)


# ----------------------------------------------------------------------------- manifest vs units
def _swap_unit(chunks: Path, update_hash: bool) -> None:
    """Replace layer 1's file by another valid safetensors file (layer 0's tensors)."""
    data = (chunks / "units" / "model.layers.0.safetensors").read_bytes()
    (chunks / "units" / "model.layers.1.safetensors").write_bytes(data)
    if update_hash:
        d = Digests.of(data)
        edit_manifest(chunks, lambda m: unit_entry(m, "model.layers.1").update(sha256=d.sha256, blake3=d.blake3,
                                                                                 bytes=len(data)))


@pytest.mark.parametrize("where", ["dir", "ws"])
@pytest.mark.parametrize("update_hash, cause", [(True, UnitFormatError), (False, IntegrityError)])
def test_unit_file_does_not_match_manifest(chunks, where, update_hash, cause):
    _swap_unit(chunks, update_hash)
    ctx = served(chunks) if where == "ws" else _nullctx(str(chunks))
    with ctx as uri, StreamingLlamaModel("llama", uri, cache_size=1, max_retries=0) as m:
        with pytest.raises(UnitUnavailableError, match="model.layers.1") as ei:
            m.forward(IDS)
        assert cause in cause_chain(ei.value), cause_chain(ei.value)
        assert "model.layers.1" not in m.get_cache_info()["cached_components"]
        msg = str(ei.value.__cause__)
        assert ("re-chunk" in msg or "manifest entry" in msg), msg  # says what is wrong / what to do


def test_unit_with_foreign_tensors_and_updated_hash(chunks):
    # as large as the unit's real data, so the manifest stays self-consistent and only the fetch can tell
    listed = unit_entry(json.loads((chunks / "manifest.json").read_text()), "model.layers.2")
    data = encode_tensors({"evil.weight": torch.zeros(max(t["data_offsets"][1] for t in listed["tensors"].values()) // 4)})
    (chunks / "units" / "model.layers.2.safetensors").write_bytes(data)
    d = Digests.of(data)
    edit_manifest(chunks, lambda m: unit_entry(m, "model.layers.2").update(sha256=d.sha256, blake3=d.blake3,
                                                                             bytes=len(data)))
    with StreamingLlamaModel("llama", str(chunks), cache_size=1, max_retries=0) as m:
        with pytest.raises(UnitUnavailableError) as ei:
            m.forward(IDS)
        assert UnitFormatError in cause_chain(ei.value)


def test_unit_file_missing_from_storage(chunks):
    (chunks / "units" / "model.layers.3.safetensors").unlink()
    with served(chunks) as uri, StreamingLlamaModel("llama", uri, cache_size=1, max_retries=0) as m:
        # not retried (the server would answer the same): NotFoundError itself, naming the file
        with pytest.raises(NotFoundError, match="model.layers.3.*missing from storage"):
            m.forward(IDS)


# ------------------------------------------------------------------------------------ model names
def test_model_name_not_hosted_lists_hosted_names(chunks):
    with served(chunks) as uri:
        with pytest.raises(NotFoundError, match=r"does not host model 'nope'; it hosts \['llama'\]"):
            StreamingLlamaModel("nope", uri, max_retries=0)
    with pytest.raises(NotFoundError, match=r"does not host model 'nope'; it hosts \['llama'\]"):
        StreamingLlamaModel("nope", str(chunks))


def test_several_models_and_no_name_asks_for_one(chunks, tmp_path):
    multi = tmp_path / "multi"
    shutil.copytree(chunks, multi / "a")
    shutil.copytree(chunks, multi / "b")
    edit_manifest(multi / "b", lambda m: m.update(name="llama-b"))
    for uri_ctx in (served(multi), _nullctx(str(multi))):
        with uri_ctx as uri:
            with pytest.raises(NotFoundError, match=r"pass model_name= one of \['llama', 'llama-b'\]"):
                StreamingLlamaModel(None, uri, max_retries=0)


# ---------------------------------------------------------------------------------- architectures
@pytest.mark.parametrize("arch", ["NotAModel", "os", "__import__", "LlamaConfig", "AutoModel", "eval('1')",
                                  "transformers.LlamaForCausalLM", ""])
def test_wrong_architecture_class(chunks, arch):
    edit_manifest(chunks, lambda m: m.update(architecture=arch))
    # (the manifest parser may refuse a malformed name first: ManifestError, also specific)
    with pytest.raises((UnsupportedArchitectureError, ManifestError)) as ei:
        StreamingBaseModel(None, str(chunks))
    assert "architecture" in str(ei.value) or "model class" in str(ei.value), ei.value


def test_wrong_model_type(chunks):
    edit_manifest(chunks, lambda m: m.update(model_type="definitely-not-a-model"))
    with pytest.raises(UnsupportedArchitectureError, match="model_type"):
        StreamingBaseModel(None, str(chunks))


def test_family_class_mismatch_names_the_right_class(tiny_chunks):
    _, bert = tiny_chunks("bert")
    with pytest.raises(UnsupportedArchitectureError, match="use StreamingBaseModel or the matching class"):
        StreamingLlamaModel(None, str(bert))


def test_every_library_error_reaches_the_cli_as_one_line_with_status_2():
    """What the one error tree is for: the CLI boundary turns an error of any class in
    streaming_weights.exceptions into one line in the CLI's words with exit status 2; anything else is a bug
    (status 1)."""
    import inspect

    from streaming_weights import exceptions
    from streaming_weights.cli.errors import describe

    classes = [c for _, c in inspect.getmembers(exceptions, inspect.isclass)
               if c.__module__ == exceptions.__name__ and issubclass(c, BaseException)]
    assert {ManifestError, UnitFormatError, IntegrityError, NotFoundError, UnsupportedArchitectureError,
            UnitUnavailableError, ConfigurationError, StreamingWeightsError} <= set(classes)
    for cls in classes:
        assert describe(cls("cannot load\n  model_name='x'")) == ("cannot load --model 'x'", 2), cls
    assert describe(RuntimeError("cannot load model_name='x'")) == ("RuntimeError: cannot load model_name='x'", 1)


class _nullctx:
    def __init__(self, value):
        self.value = value

    def __enter__(self):
        return self.value

    def __exit__(self, *exc):
        return None
