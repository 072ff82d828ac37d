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
from ..memory import pin_mmap_threshold, release_free_heap
from .architecture import build_config, build_meta_model, resolve_architecture, streamed_module_names
from .engine import StreamingEngine
from .edges import assemble, kept_and_streamed, names_of
from .hooks import assign_tensor, assign_unit

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
    pin_mmap_threshold()  # before any weight or activation: keeps the heap from holding freed batches
    # The tokenizer first: parsing tokenizer.json peaks at several times what the tokenizer keeps, and
    # that transient is best spent while no weights are held (the heap it leaves is trimmed right away).
    tokenizer, generation_config = load_tokenizer(engine, manifest)
    release_free_heap()
    model = build_model(engine, manifest)
    if generation_config is not None:
        model.generation_config = generation_config
    engine.bind(manifest, model)
    return LoadedModel(manifest, model, tokenizer)


def check_family(manifest: Manifest, families: frozenset[str], cls_name: str) -> None:
    mt = manifest.model_type
    if families and mt not in families:
        raise UnsupportedArchitectureError(
            f"{cls_name} runs {sorted(families)} models, but {manifest.name!r} is a {mt!r} model "
            f"({manifest.architecture}); use StreamingBaseModel or the matching class")


def build_model(engine: StreamingEngine, m: Manifest) -> torch.nn.Module:
    """transformers' class for ``m`` on ``meta`` with its resident parts loaded and its ties applied."""
    cls = resolve_architecture(m.architecture)
    dtype = engine.converter.compute_dtype(m)  # config.dtype, else the stored one (client.convert)
    model = build_meta_model(cls, build_config(m.model_type, m.config), dtype)
    expected = [u.name for u in m.streamed]
    if streamed_module_names(model) != expected:
        raise ModelError(
            f"manifest of {m.name!r} streams {expected[:3]}… but {m.architecture} maps to "
            f"{streamed_module_names(model)[:3]}…; re-chunk with this version of streaming_weights")
    # The model's code is imported and its skeleton built: what is left is what the plan may use, and a
    # budget too small fails here, before the resident parts are fetched.
    plan = engine.make_plan(m)
    fetch = lambda name: engine.run(engine.source.fetch_unit(m, name)).tensors  # noqa: E731
    for entry in m.resident:
        assign_unit(model, fetch(entry.name))
    kept, streamed = kept_and_streamed(m, plan.streamed)
    for tensor in kept:
        assign_tensor(model, tensor.name, assemble(fetch, tensor))
    # sharded weights the plan streams stay meta here (edges.EdgeBinding takes them), their aliases too
    streamed_shards = {name for tensor in streamed for name in names_of(m, tensor.name)}
    tie_weights(model, m)
    streamed_prefixes = tuple(n + "." for n in expected)
    missing = [n for n, p in model.named_parameters(remove_duplicate=False)
               if p.is_meta and not n.startswith(streamed_prefixes) and n not in streamed_shards]
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


def load_tokenizer(engine: StreamingEngine, manifest: Manifest) -> tuple[Any, Any]:
    """The model's tokenizer and generation config (each ``None`` if the chunks carry none)."""
    names = {f.name for f in manifest.files}
    gen = "generation_config.json" in names
    if not (names & TOKENIZER_FILES) and not gen:
        return None, None
    config = None
    with tempfile.TemporaryDirectory(prefix="surfing-tok-") as tmp:
        for f in manifest.files:
            Path(tmp, f.name).write_bytes(engine.run(engine.source.fetch_file(manifest, f.name)))
        if gen:
            from transformers import GenerationConfig

            config = GenerationConfig.from_pretrained(tmp)
        if not names & TOKENIZER_FILES:
            return None, config
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(tmp, local_files_only=True), config
        except Exception as exc:  # noqa: BLE001
            raise ModelError(f"cannot build the tokenizer of {manifest.name!r}: {exc}") from exc
