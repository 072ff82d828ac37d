"""What the chunker will write, decided before any tensor is read.

From a checkpoint's config the model class is built on ``meta`` (no memory), its unit map says which
tensor goes in which unit, the checkpoint's tensor names are mapped onto the model's, and each tensor's
stored dtype is fixed (the source's, or the requested cast for floating tensors), and, with ``quantize``,
which linear / embedding weights are stored quantized (:mod:`streaming_weights.format.quant`).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from ..exceptions import ChunkingError, ConfigurationError
from ..format.chunkfile import UnitLayout, dtype_name, itemsize, plan_unit
from ..format.quant import QuantSpec, metadata_entry, quant_spec
from ..models.architecture import build_meta_model, resolve_architecture, unit_map
from .readers import Source

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_LEGACY = ((".gamma", ".weight"), (".beta", ".bias"))


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"float16"`` / ``"torch.bfloat16"`` -> the torch dtype; a torch dtype or ``None`` is returned as is.

    Raises:
        ConfigurationError: a name other than float32, float16 or bfloat16.
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).removeprefix("torch.")]
    except KeyError:
        raise ConfigurationError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}") from None


def _candidates(ck: str, prefix: str) -> list[str]:
    """Model names a checkpoint key may stand for: as is, with/without the base prefix, legacy names."""
    cands = [ck, f"{prefix}.{ck}" if prefix else ck]
    if prefix and ck.startswith(prefix + "."):
        cands.append(ck[len(prefix) + 1 :])
    for old, new in _LEGACY:
        cands += [c[: -len(old)] + new for c in list(cands) if c.endswith(old)]
    return cands


def map_checkpoint_keys(ckpt_keys: list[str], model_keys: list[str], tied: dict[str, str],
                        buffers: set[str], prefix: str) -> dict[str, str]:
    """``{model key: checkpoint key}`` for every tensor the model stores.

    Handles a base-model prefix present on one side only (``bert.`` / ``model.``), legacy
    ``gamma``/``beta`` names, tied aliases and non-persistent buffers saved by older versions.

    Raises:
        ChunkingError: a model tensor is missing, or the checkpoint has tensors the model lacks.
    """
    wanted = set(model_keys)
    out: dict[str, str] = {}
    unexpected = []
    for ck in ckpt_keys:
        cands = _candidates(ck, prefix)
        hit = next((c for c in cands if c in wanted), None)
        if hit is not None:
            if hit in out:
                raise ChunkingError(f"checkpoint tensors {out[hit]!r} and {ck!r} both map to {hit!r}")
            out[hit] = ck
        elif not any(c in tied or c in buffers for c in cands) and not ck.endswith(".attn.masked_bias"):
            unexpected.append(ck)
    missing = sorted(wanted - set(out))
    if missing or unexpected:
        raise ChunkingError(
            f"checkpoint does not match the model class: missing {missing[:8]}{'…' if len(missing) > 8 else ''}"
            f", unexpected {unexpected[:8]}{'…' if len(unexpected) > 8 else ''}"
        )
    return out


@dataclass(frozen=True)
class ModelPlan:
    """Everything about the output but the bytes.

    Attributes:
        architecture: the transformers class name (``LlamaForCausalLM``).
        config: the transformers config, its ``dtype`` set to ``dtype``.
        dtype: the model's dtype (the cast, or the source's most common floating dtype).
        units: ``{unit name: [model tensor names]}`` in execution order; empty units are left out.
        mapping: ``{model tensor name: checkpoint tensor name}``.
        specs: ``{model tensor name: (safetensors dtype, shape)}`` as stored.
        tied: ``{alias: stored tensor}`` (e.g. ``lm_head.weight`` -> the embedding).
        quant: ``{model tensor name: QuantSpec}`` of the tensors stored quantized (``specs`` then holds the
            codes tensor; the scale / offset companions are added by :meth:`layout`).
    """

    architecture: str
    config: Any
    dtype: torch.dtype
    units: dict[str, list[str]]
    mapping: dict[str, str]
    specs: dict[str, tuple[str, tuple[int, ...]]]
    tied: dict[str, str]
    quant: dict[str, QuantSpec] = dataclasses.field(default_factory=dict)

    def layout(self, unit: str) -> UnitLayout:
        """The unit file's layout (header, quantization metadata and tensor offsets)."""
        entries: dict[str, tuple[str, tuple[int, ...]]] = {}
        quant = {k: self.quant[k] for k in self.units[unit] if k in self.quant}
        for k in self.units[unit]:
            if k in quant:
                entries.update({k + suffix: spec for suffix, spec in quant[k].stored().items()})
            else:
                entries[k] = self.specs[k]
        return plan_unit(entries, metadata_entry(quant))

    @property
    def total_bytes(self) -> int:
        """Tensor bytes of the whole model as stored (headers excluded)."""
        return sum(self.quant[k].stored_bytes() if k in self.quant else math.prod(shape) * itemsize(dt)
                   for k, (dt, shape) in self.specs.items())


def quantizable(model: torch.nn.Module) -> set[str]:
    """Names of the weights weight-only quantization applies to: every ``nn.Linear`` and ``nn.Embedding``
    weight (the embedding too: tied to the LM head, and a quarter of a small model's bytes)."""
    kinds = (torch.nn.Linear, torch.nn.Embedding)
    return {f"{path}.weight" if path else "weight" for path, mod in model.named_modules() if isinstance(mod, kinds)}


def plan_model(source: Source, dtype: torch.dtype | None, what: str, quantize: str | None = None) -> ModelPlan:
    """Plan the chunking of ``source`` (named ``what`` in errors), casting floating tensors to ``dtype``
    (``None``: each tensor keeps the checkpoint's dtype) and quantizing linear weights with ``quantize``
    (``None``, ``"int8"`` or ``"int4"``; weights whose input dimension the group size does not divide stay
    unquantized).

    Raises:
        ChunkingError: no architecture in the config, or checkpoint and model class disagree.
        UnsupportedArchitectureError: transformers has no such class.
    """
    if not source.architecture:
        raise ChunkingError(f"{what}: config.json names no 'architectures'; cannot pick a model class")
    cls = resolve_architecture(source.architecture)
    config = source.config
    src_dtypes = source.dtypes()
    floats = Counter(d for d in src_dtypes.values() if d.is_floating_point)
    model_dtype = dtype or (floats.most_common(1)[0][0] if floats else torch.float32)
    config.dtype = model_dtype
    meta = build_meta_model(cls, config, model_dtype)
    umap = unit_map(meta)
    buffers = {n for n, _ in meta.named_buffers()}
    # Checkpoints of a head model loaded into a base model (or the reverse) differ by this prefix.
    base_prefix = getattr(meta, "base_model_prefix", "") or ""
    mapping = map_checkpoint_keys(source.keys(), umap.state_keys, umap.tied, buffers, base_prefix)
    shapes = {k: tuple(v.shape) for k, v in meta.state_dict(keep_vars=True).items()}
    linear = quantizable(meta) if quantize else set()
    del meta

    def stored(key: str) -> torch.dtype:
        src = src_dtypes[mapping[key]]
        return dtype if (dtype is not None and src.is_floating_point) else src

    units: dict[str, list[str]] = {u: [] for u in umap.units()}
    for key in umap.state_keys:
        units[umap.unit_of(key)].append(key)
    specs = {k: (dtype_name(stored(k)), shapes[k]) for k in umap.state_keys}
    quant = {k: q for k in sorted(linear & set(specs)) if (q := quant_spec(quantize, specs[k][1], specs[k][0])) is not None}
    return ModelPlan(
        architecture=cls.__name__, config=config, dtype=model_dtype,
        units={u: ks for u, ks in units.items() if ks}, mapping=mapping,
        specs={k: (quant[k].stored()[""] if k in quant else spec) for k, spec in specs.items()},
        tied=dict(umap.tied), quant=quant,
    )


__all__ = ["ModelPlan", "map_checkpoint_keys", "parse_dtype", "plan_model", "quantizable"]
