"""``/v1/embeddings`` of sentence-transformers models give the model's own vectors: the pooling its
``1_Pooling/config.json`` names and the ``Normalize`` its ``modules.json`` lists, checked against plain
transformers with that pooling; inputs past the pipeline's ``max_seq_length`` are OpenAI's 400, not truncated.
The packaged all-MiniLM-L6-v2 runs as a user runs it (``surfing api`` over a weight server process); CLS and max
pooling variants of it run in-process over a loopback weight server."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="needs the `api` extra: pip install -e '.[api,dev]'")
openai = pytest.importorskip("openai", reason="needs the openai client (the `dev` extra)")

import httpx  # noqa: E402
import torch  # noqa: E402

from tests.api.conftest import api_server, surfing_api, weight_server  # noqa: E402
from tests.cli.helpers import assert_one_line_error, surfing_here  # noqa: E402
from tests.support.models import chunk, packaged_minilm_dir  # noqa: E402
from tests.support.servers import start_server_process  # noqa: E402

MODEL = "all-MiniLM-L6-v2"
TEXTS = ["Weights stream layer by layer.", "A cat sat on the mat.", "short", "Embeddings, one block at a time!"]
LONG = "word " * 300  # 302 tokens: past MiniLM's max_seq_length (256), within its 512 positions


def reference(model_dir: Path, texts: list[str], pooling: str, normalize: bool) -> torch.Tensor:
    """Plain transformers with sentence-transformers' documented pooling (mean / CLS / max) and Normalize."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModel.from_pretrained(str(model_dir), local_files_only=True, dtype=torch.float32).eval()
    batch = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    if pooling == "cls":
        vec = hidden[:, 0]
    elif pooling == "max":
        vec = hidden.masked_fill(mask == 0, -1e9).max(dim=1).values
    else:
        vec = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(vec, p=2, dim=1) if normalize else vec


def variant(root: Path, name: str, pooling: str | None, modules: list[str]) -> Path:
    """The packaged MiniLM with its pooling config and module list rewritten (weights linked, not copied)."""
    src = root / f"{name}-src"
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(packaged_minilm_dir(), src, ignore=shutil.ignore_patterns("model.safetensors"))
    (src / "model.safetensors").symlink_to(packaged_minilm_dir() / "model.safetensors")
    if pooling is not None:
        keys = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens", "max": "pooling_mode_max_tokens"}
        cfg = json.loads((src / "1_Pooling" / "config.json").read_text())
        cfg.update({k: mode == pooling for mode, k in keys.items()})
        (src / "1_Pooling" / "config.json").write_text(json.dumps(cfg))
    folders = {"Transformer": "", "Pooling": "1_Pooling", "Normalize": "2_Normalize", "Dense": "2_Dense"}
    (src / "modules.json").write_text(json.dumps([
        {"idx": i, "name": str(i), "path": folders[k], "type": f"sentence_transformers.models.{k}"}
        for i, k in enumerate(modules)]))
    return src


def _vectors(resp) -> torch.Tensor:
    return torch.tensor([d.embedding for d in sorted(resp.data, key=lambda d: d.index)])


def test_surfing_api_embeds_as_the_sentence_transformers_pipeline(minilm_chunks):
    want = reference(packaged_minilm_dir(), TEXTS, "mean", normalize=True)
    server, port = start_server_process(minilm_chunks)
    try:
        with surfing_api("--server", f"ws://127.0.0.1:{port}", "--model", MODEL) as api:
            with api.client() as c:
                b64 = c.embeddings.create(model=MODEL, input=TEXTS)  # the client asks for base64
                flt = c.embeddings.create(model=MODEL, input=TEXTS[0], encoding_format="float")
                with pytest.raises(openai.BadRequestError) as too_long:
                    c.embeddings.create(model=MODEL, input=LONG)
            batch = httpx.post(api.url + "/v1/embeddings", json={"model": MODEL, "input": ["fine", LONG * 2]},
                               timeout=120)
    finally:
        server.terminate()
        server.communicate(timeout=60)
    got = _vectors(b64)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(len(TEXTS)), rtol=0, atol=1e-5)
    torch.testing.assert_close(_vectors(flt)[0], want[0], rtol=0, atol=2e-5)
    assert too_long.value.code == "context_length_exceeded" and too_long.value.param == "input"
    assert "maximum input length is 256 tokens" in too_long.value.message, too_long.value.message
    assert batch.status_code == 400
    err = batch.json()["error"]
    assert (err["type"], err["param"], err["code"]) == ("invalid_request_error", "input", "context_length_exceeded")
    assert "input[1] has 602 tokens" in err["message"], err["message"]


@pytest.fixture(scope="module")
def variants(workdir) -> Path:
    root = workdir / "api-minilm-variants"
    if not (root / "chunks").exists():
        for name, pooling, modules in [("minilm-cls", "cls", ["Transformer", "Pooling"]),
                                       ("minilm-max", "max", ["Transformer", "Pooling", "Normalize"])]:
            chunk(variant(root, name, pooling, modules), root / "chunks" / name, name=name)
    return root


@pytest.mark.parametrize("name, pooling, normalize", [("minilm-cls", "cls", False), ("minilm-max", "max", True)])
def test_cls_and_max_pooling_follow_the_pooling_config(variants, name, pooling, normalize):
    from streaming_weights import StreamingBertModel

    want = reference(variants / f"{name}-src", TEXTS, pooling, normalize)
    with weight_server(variants / "chunks") as (uri, _):
        model = StreamingBertModel(name, uri)
        try:
            with api_server(model) as url, openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as c:
                got = _vectors(c.embeddings.create(model=name, input=TEXTS))
        finally:
            model.close()
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    assert not torch.allclose(got, reference(variants / f"{name}-src", TEXTS, "mean", normalize), atol=1e-3)


def test_a_pipeline_with_a_module_the_server_cannot_apply_is_refused_at_start(workdir, capfd):
    src = variant(workdir / "api-minilm-dense", "minilm-dense", None, ["Transformer", "Pooling", "Dense"])
    (src / "2_Dense").mkdir()
    (src / "2_Dense" / "config.json").write_text(json.dumps({"in_features": 384, "out_features": 256}))
    out = workdir / "api-minilm-dense" / "chunks"
    chunk(src, out, name="minilm-dense")
    res = surfing_here(capfd, "api", "--server", out, "--port", "0")
    assert_one_line_error(res, "sentence_transformers.models.Dense", "cannot apply")
