"""A sentence-transformers model's embedding pipeline, read from the files its chunks carry.

sentence-transformers describes how a model's token states become a sentence vector in ``modules.json``
(``Transformer`` → ``Pooling`` → optional ``Normalize``), ``1_Pooling/config.json`` (which pooling: mean, CLS
or max; the chunker stores it flat as ``1_Pooling.config.json``) and ``sentence_bert_config.json``
(``max_seq_length``, ``do_lower_case``). The API applies exactly that pipeline, so its vectors equal the
model's own. A model without ``modules.json`` gets mean pooling, unnormalized (what ``model.embed`` does).
A pipeline holding a module this server cannot apply (``Dense``, ...) is refused at start-up rather than
answered with vectors the model would never produce.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

from ..exceptions import ModelError

MODULES = "modules.json"
SENTENCE_CONFIG = "sentence_bert_config.json"
_APPLIED = ("Transformer", "Pooling", "Normalize")
# Pooling config keys, in the order sentence-transformers concatenates them, and the name embed() takes.
_MODES = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max", "pooling_mode_mean_tokens": "mean",
          "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
          "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}
_SUPPORTED = ("mean", "cls", "max")


@dataclass(frozen=True)
class EmbeddingRecipe:
    """How token states become a sentence vector.

    Attributes:
        pooling: ``"mean"``, ``"cls"`` or ``"max"`` (what :func:`~..models.embedding.embed` takes).
        normalize: L2-normalize the pooled vector (sentence-transformers' ``Normalize`` module).
        max_seq_length: the pipeline's own input limit in tokens (``None``: only the model's positions).
        lowercase: lower-case the text before tokenizing (``do_lower_case``).
        origin: where this came from, for messages (``"modules.json"`` or ``"default"``).
    """

    pooling: str = "mean"
    normalize: bool = False
    max_seq_length: int | None = None
    lowercase: bool = False
    origin: str = "default"


def _pooling(cfg: dict[str, Any], where: str) -> str:
    if isinstance(cfg.get("pooling_mode"), str):  # the constructor's single-string form
        modes = [cfg["pooling_mode"]]
    else:
        modes = [name for key, name in _MODES.items() if cfg.get(key)]
    modes = ["mean_sqrt_len_tokens" if m == "mean_sqrt_len" else m for m in modes]
    if len(modes) != 1 or modes[0] not in _SUPPORTED:
        raise ModelError(f"{where} asks for pooling {modes or 'none'}; this server applies exactly one of "
                         f"{list(_SUPPORTED)}, so it cannot reproduce this model's embeddings")
    return modes[0]


def parse_recipe(read: Callable[[str], bytes | None]) -> EmbeddingRecipe:
    """The recipe from the model's files; ``read(name)`` returns a file's bytes or ``None`` when absent.

    Raises:
        ModelError: a file is not valid JSON, the pipeline holds a module other than Transformer / Pooling /
            Normalize, its pooling is not exactly one of mean / CLS / max, or its pooling config is missing.
    """
    raw = read(MODULES)
    if raw is None:
        return EmbeddingRecipe()
    modules = _json(raw, MODULES)
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise ModelError(f"{MODULES}: expected a list of modules, got {type(modules).__name__}")
    pooling, normalize = None, False
    for m in modules:
        kind = str(m.get("type", "")).rpartition(".")[2]
        if kind not in _APPLIED:
            raise ModelError(f"{MODULES} lists {m.get('type')!r} ({m.get('path')!r}), which this server cannot "
                             f"apply (it applies {', '.join(_APPLIED)}): its embeddings would not be the model's")
        if kind == "Pooling":
            name = f"{m.get('path')}.config.json"
            cfg = read(name)
            if cfg is None:
                raise ModelError(f"{MODULES} names a Pooling module but the chunks lack {name}: re-chunk the "
                                 "model with this version of surfing")
            pooling = _pooling(_json(cfg, name), name)
        normalize = normalize or kind == "Normalize"
    sbert = read(SENTENCE_CONFIG)
    extra = _json(sbert, SENTENCE_CONFIG) if sbert is not None else {}
    limit = extra.get("max_seq_length") if isinstance(extra, dict) else None
    return EmbeddingRecipe(pooling or "mean", normalize, int(limit) if isinstance(limit, int) and limit > 0 else None,
                           bool(isinstance(extra, dict) and extra.get("do_lower_case")), MODULES)


def _json(data: bytes, name: str) -> Any:
    try:
        return json.loads(data)
    except ValueError as exc:
        raise ModelError(f"{name} is not valid JSON: {exc}") from exc


async def read_recipe(model: Any) -> EmbeddingRecipe:
    """The recipe of a loaded streaming model, its files fetched (and verified) through the model's source."""
    manifest = model.manifest
    names = {f.name for f in manifest.files}
    wanted = [n for n in names if n == MODULES or n == SENTENCE_CONFIG or n.endswith(".config.json")]
    files: dict[str, bytes] = {}
    for name in wanted:
        files[name] = await model.engine.wrap(model.source.fetch_file(manifest, name))
    return parse_recipe(files.get)


def input_limit(model: Any, recipe: EmbeddingRecipe) -> tuple[int, str]:
    """The most tokens one input may hold, and which declaration sets it: the model's positions, the
    tokenizer's ``model_max_length`` and the pipeline's ``max_seq_length``, whichever is smallest."""
    config = model.hf_model.config
    limits = [(int(getattr(config, "max_position_embeddings", 0) or 0), "the model's max_position_embeddings")]
    tok_max = getattr(model.tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < 1 << 30:  # "unset" tokenizers say 1e30
        limits.append((tok_max, "the tokenizer's model_max_length"))
    if recipe.max_seq_length is not None:
        limits.append((recipe.max_seq_length, f"{SENTENCE_CONFIG} max_seq_length"))
    limits = [(n, why) for n, why in limits if n > 0]
    return min(limits) if limits else (1 << 30, "no declared limit")


__all__ = ["EmbeddingRecipe", "input_limit", "parse_recipe", "read_recipe"]
