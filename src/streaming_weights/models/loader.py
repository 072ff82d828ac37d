"""Build a streaming model from its manifest: transformers' class on ``meta``, resident parts, ties, tokenizer.

Resident units go through the same assign path as streamed ones (:func:`.hooks.assign_unit`); the
model is only handed out once no parameter outside the streamed blocks is still ``meta``, so nothing
ever computes with uninitialized weights.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..exceptions import ModelError, UnsupportedArchitectureError
from ..format import Manifest
from .architecture import build_config, build_meta_model, resolve_architecture, streamed_module_names
from .engine import StreamingEngine
from .hooks import assign_unit

TOKENIZER_FILES = frozenset({"tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                             "spiece.model", "sentencepiece.bpe.model"})


@dataclass
class LoadedModel:
    manifest: Manifest
    hf_model: torch.nn.Module
    tokenizer: Any


def load_model(engine: StreamingEngine, model_name: str | None, families: frozenset[str], cls_name: str) -> LoadedModel:
    """Fetch the manifest, build the model, load resident parts, bind the streamed ones, load the tokenizer.

    Raises:
        NotFoundError: the source does not host ``model_name``.
        UnsupportedArchitectureError: ``families`` is set and the manifest's model type is not in it.
        ModelError: the manifest and the architecture disagree, or the chunks are incomplete.
    """
    manifest = engine.run(engine.source.get_manifest(model_name), "loading a model",
                          "await model.ensure_loaded_async()` or `async with model")
    check_family(manifest, families, cls_name)
    model = build_model(engine, manifest)
    engine.bind(manifest, model)
    return LoadedModel(manifest, model, load_tokenizer(engine, manifest, model))


def check_family(manifest: Manifest, families: frozenset[str], cls_name: str) -> None:
    mt = manifest.model_type
    if families and mt not in families:
        raise UnsupportedArchitectureError(
            f"{cls_name} runs {sorted(families)} models, but {manifest.name!r} is a {mt!r} model "
            f"({manifest.architecture}); use StreamingBaseModel or the matching class")


def build_model(engine: StreamingEngine, m: Manifest) -> torch.nn.Module:
    """transformers' class for ``m`` on ``meta`` with its resident parts loaded and its ties applied."""
    cls = resolve_architecture(m.architecture)
    dtype = getattr(torch, m.dtype, None)
    model = build_meta_model(cls, build_config(m.model_type, m.config), dtype if isinstance(dtype, torch.dtype) else None)
    expected = [u.name for u in m.streamed]
    if streamed_module_names(model) != expected:
        raise ModelError(
            f"manifest of {m.name!r} streams {expected[:3]}… but {m.architecture} maps to "
            f"{streamed_module_names(model)[:3]}…; re-chunk with this version of streaming_weights")
    for entry in m.resident:
        assign_unit(model, engine.run(engine.source.fetch_unit(m, entry.name)).tensors)
    tie_weights(model, m)
    streamed_prefixes = tuple(n + "." for n in expected)
    missing = [n for n, p in model.named_parameters(remove_duplicate=False)
               if p.is_meta and not n.startswith(streamed_prefixes)]
    if missing:  # never compute with uninitialized weights
        raise ModelError(f"resident parts of {m.name!r} lack {missing[:5]}: the chunks are incomplete")
    return model


def tie_weights(model: torch.nn.Module, m: Manifest) -> None:
    """Make every ``alias`` parameter of the manifest's ``tied`` map the very tensor of its target."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for alias, target in m.tied.items():
        if alias not in params or target not in params:
            raise ModelError(f"tied weight {alias} -> {target} does not exist in {m.architecture}")
        owner_path, _, attr = alias.rpartition(".")
        owner = model.get_submodule(owner_path) if owner_path else model
        owner._parameters[attr] = model.get_parameter(target)


def load_tokenizer(engine: StreamingEngine, manifest: Manifest, model: torch.nn.Module) -> Any:
    """The model's tokenizer (``None`` if the chunks carry none); sets ``model.generation_config`` too."""
    names = {f.name for f in manifest.files}
    gen = "generation_config.json" in names
    if not (names & TOKENIZER_FILES) and not gen:
        return None
    with tempfile.TemporaryDirectory(prefix="surfing-tok-") as tmp:
        for f in manifest.files:
            Path(tmp, f.name).write_bytes(engine.run(engine.source.fetch_file(manifest, f.name)))
        if gen:
            from transformers import GenerationConfig

            model.generation_config = GenerationConfig.from_pretrained(tmp)
        if not names & TOKENIZER_FILES:
            return None
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(tmp, local_files_only=True)
        except Exception as exc:  # noqa: BLE001
            raise ModelError(f"cannot build the tokenizer of {manifest.name!r}: {exc}") from exc
