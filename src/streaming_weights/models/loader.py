"""Build a streaming model from its manifest: transformers' class on ``meta``, resident parts, ties, tokenizer.

What the model costs besides its weights is measured from after its code is imported (transformers' modeling
module of the architecture: ~110 MiB of anonymous memory for Llama, the process's once, not the model's); the
tokenizer is built on first use (:mod:`.tokenizer`).

Resident units go through the same assign path as streamed ones (:func:`.hooks.assign_unit`); the
model is only handed out once no parameter outside the streamed blocks is still ``meta``, so nothing
ever computes with uninitialized weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..exceptions import ModelError, UnsupportedArchitectureError
from ..format import Manifest
from ..memory import current_anon, pin_mmap_threshold, release_free_heap
from .architecture import build_config, build_meta_model, resolve_architecture, streamed_module_names
from .engine import StreamingEngine
from .edges import assemble, kept_and_streamed, names_of
from .hooks import assign_tensor, assign_unit
from .patching import FunctionHook, add_hook
from .tokenizer import LazyTokenizer, copy_files


@dataclass
class LoadedModel:
    manifest: Manifest
    hf_model: torch.nn.Module
    lazy_tokenizer: LazyTokenizer | None

    @property
    def tokenizer(self) -> Any:
        """The tokenizer (built on first access) or ``None`` when the chunks carry none."""
        return None if self.lazy_tokenizer is None else self.lazy_tokenizer.get()


def load_model(engine: StreamingEngine, model_name: str | None, families: frozenset[str], cls_name: str) -> LoadedModel:
    """Fetch the manifest, build the model, load resident parts, bind the streamed ones; the tokenizer's files
    are copied to disk and built on first use.

    Raises:
        NotFoundError: the source does not host ``model_name``.
        UnsupportedArchitectureError: ``families`` is set and the manifest's model type is not in it.
        ModelError: the manifest and the architecture disagree, or the chunks are incomplete.
    """
    manifest = engine.run(engine.source.get_manifest(model_name), "loading a model",
                          "await model.ensure_loaded_async()` or `async with model")
    check_family(manifest, families, cls_name)
    pin_mmap_threshold()  # before any weight or activation: keeps the heap from holding freed batches
    before = current_anon()
    resolve_architecture(manifest.architecture)  # imports the modeling code (and GenerationConfig's)
    release_free_heap()
    engine.overhead_from += max(0, current_anon() - before)  # code is the process's, not this model's
    tokenizer_dir, generation_config = copy_files(
        lambda name: engine.run(engine.source.fetch_file(manifest, name)), [f.name for f in manifest.files])
    # owns the directory from here (removed once built, or with this object if loading fails below)
    count = lambda n: None if engine.closed else engine.add_overhead(n)  # noqa: E731 - a closed model holds nothing
    tokenizer = None if tokenizer_dir is None else LazyTokenizer(tokenizer_dir, manifest.name, count)
    model = build_model(engine, manifest)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, torch.nn.Linear):
        add_hook(head, FunctionHook(pre=_fresh_half_input))
    if generation_config is not None:
        model.generation_config = generation_config
    engine.bind(manifest, model)
    return LoadedModel(manifest, model, tokenizer)


def _fresh_half_input(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """torch (2.13, CPU) multiplies a half-precision input whose size-1 dims keep a slice's strides (the last
    position of the hidden states, as ``generate`` passes it to the lm_head) by first copying the whole weight:
    320 MiB and ~2x the time per decoded token for a 262k-token bfloat16 lm_head. The same values in a fresh
    tensor give bit-identical logits without the copy (float32 takes another kernel then: left as it is)."""
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.bfloat16, torch.float16) or x.dim() < 3:
        return None
    fresh = x.clone(memory_format=torch.contiguous_format)
    return None if fresh.stride() == x.stride() else ((fresh, *args[1:]), kwargs)


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
    fetch = lambda name: engine.run(engine.source.fetch_unit(m, name))  # noqa: E731
    for entry in m.resident:
        assign_unit(model, fetch(entry.name).tensors)
    kept, streamed = kept_and_streamed(m, plan.streamed)
    as_codes = lambda u: engine.converter.codes_kept(m, u) or engine.converter.kernel_names(m, u)  # noqa: E731
    for tensor in kept:
        if all(as_codes(u) for u in tensor.units):  # held as codes (or kernel form): computed per use
            engine.held_edges.update({u: fetch(u) for u in tensor.units})
            streamed.append(tensor)
        else:
            assign_tensor(model, tensor.name, assemble(fetch, tensor, engine.pool))
    # sharded weights the plan streams or holds as codes stay meta here (edges.EdgeBinding takes them), and
    # their aliases too
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
