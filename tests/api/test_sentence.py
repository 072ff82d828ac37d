"""Reading a sentence-transformers pipeline (``modules.json`` + module configs) into the API's embedding recipe:
pure parsing, no model."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi", reason="needs the `api` extra: pip install -e '.[api,dev]'")

from streaming_weights.api.sentence import EmbeddingRecipe, parse_recipe  # noqa: E402
from streaming_weights.exceptions import ModelError  # noqa: E402

ST = "sentence_transformers.models."


def _files(modules: list[dict] | None, pooling: dict | None = None, sbert: dict | None = None) -> dict[str, bytes]:
    out = {}
    if modules is not None:
        out["modules.json"] = json.dumps(modules).encode()
    if pooling is not None:
        out["1_Pooling.config.json"] = json.dumps(pooling).encode()
    if sbert is not None:
        out["sentence_bert_config.json"] = json.dumps(sbert).encode()
    return out


def _modules(*kinds: str) -> list[dict]:
    paths = {"Transformer": "", "Pooling": "1_Pooling", "Normalize": "2_Normalize", "Dense": "2_Dense"}
    return [{"idx": i, "name": str(i), "path": paths[k], "type": ST + k} for i, k in enumerate(kinds)]


def _pool(mode: str) -> dict:
    return {"word_embedding_dimension": 8, "pooling_mode_cls_token": mode == "cls",
            "pooling_mode_mean_tokens": mode == "mean", "pooling_mode_max_tokens": mode == "max",
            "pooling_mode_mean_sqrt_len_tokens": False}


def test_a_model_without_modules_json_keeps_plain_mean_pooling():
    assert parse_recipe({}.get) == EmbeddingRecipe("mean", False, None, False, "default")


@pytest.mark.parametrize("mode", ["mean", "cls", "max"])
def test_pooling_normalize_and_limits_come_from_the_files(mode):
    files = _files(_modules("Transformer", "Pooling", "Normalize"), _pool(mode),
                   {"max_seq_length": 128, "do_lower_case": True})
    assert parse_recipe(files.get) == EmbeddingRecipe(mode, True, 128, True, "modules.json")
    files = _files(_modules("Transformer", "Pooling"), {"pooling_mode": mode})  # the one-string form
    assert parse_recipe(files.get) == EmbeddingRecipe(mode, False, None, False, "modules.json")


@pytest.mark.parametrize("files, phrase", [
    (_files(_modules("Transformer", "Pooling", "Dense"), _pool("mean")), "Dense"),
    (_files(_modules("Transformer", "Pooling"), {**_pool("mean"), "pooling_mode_max_tokens": True}),
     "['max', 'mean']"),
    (_files(_modules("Transformer", "Pooling"), {"pooling_mode_lasttoken": True}), "lasttoken"),
    (_files(_modules("Transformer", "Pooling")), "re-chunk"),
    ({"modules.json": b"{not json"}, "not valid JSON"),
])
def test_a_pipeline_this_server_cannot_reproduce_is_refused(files, phrase):
    with pytest.raises(ModelError) as exc:
        parse_recipe(files.get)
    assert phrase in str(exc.value)
