"""What the chunker will write, decided before any tensor is read.

From a checkpoint's config the model class is built on ``meta`` (no memory), its unit map says which
tensor goes in which unit, the checkpoint's tensor names are mapped onto the model's, and each tensor's
stored dtype is fixed (the source's, or the requested cast for floating tensors), and, with ``quantize``,
which linear / embedding weights are stored quantized (:mod:`streaming_weights.format.quant`), and which
embedding / LM-head weights are split into row shards (units of role ``shard``, see docs/format.md).
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
from ..format.names import RESIDENT_UNIT, expert_unit_name, shard_unit_name
from ..format.quant import QuantSpec, metadata_entry, quant_spec
from ..memory import parse_size
from ..models.architecture import build_meta_model, fp32_names, resolve_architecture, unit_map
from ..models.experts import expert_modules
from .convert import Recipe, plan_recipes
from .readers import Source

#: ``shard_size="auto"`` shards a tensor only above this many stored bytes (or the largest streamed unit)
AUTO_SHARD_MIN_BYTES = 16 << 20

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


def parse_shard_size(value: int | str | None) -> int | str | None:
    """``"auto"`` stays ``"auto"``; ``None`` / ``"off"`` -> ``None`` (no shards); ``"64MB"`` / ``"1GiB"`` / an int
    -> bytes (> 0).

    Raises:
        ConfigurationError: anything else (a size that does not parse, 0 or less, a bool).
    """
    if value is None or (isinstance(value, str) and value.strip().lower() == "off"):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigurationError(f"shard_size must be 'auto', 'off', None or a size such as 64MB, got {value!r}")
    try:
        size = parse_size(value, "shard_size")
    except ConfigurationError:
        raise ConfigurationError(f"shard_size={value!r} is not a size: use 'auto', 'off', or a size such as "
                                 "64MB, 1GiB or a byte count above 0") from None
    if size == "auto":
        return "auto"
    if int(size) <= 0:
        raise ConfigurationError(f"shard_size must be more than 0 bytes (or 'off' for no shards), got {value!r}")
    return int(size)


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
        shards: ``{shard unit name: (model tensor name, start, stop)}``; each such unit is also in ``units``
            (holding ``[tensor]``), and ``specs`` / ``quant`` describe the whole tensor.
        recipes: ``{model tensor name: Recipe}`` for tensors transformers' conversion mapping produces from
            several checkpoint tensors (or with an operation); ``mapping`` holds the plain renames.
        experts: ``{expert unit name: (experts module path, start, stop)}``: experts ``[start, stop)`` of a
            mixture-of-experts module; the unit (also in ``units``) holds those rows of each of the module's
            fused tensors, and ``specs`` describe the whole tensors.
    """

    architecture: str
    config: Any
    dtype: torch.dtype
    units: dict[str, list[str]]
    mapping: dict[str, str]
    specs: dict[str, tuple[str, tuple[int, ...]]]
    tied: dict[str, str]
    quant: dict[str, QuantSpec] = dataclasses.field(default_factory=dict)
    shards: dict[str, tuple[str, int, int]] = dataclasses.field(default_factory=dict)
    recipes: dict[str, Recipe] = dataclasses.field(default_factory=dict)
    experts: dict[str, tuple[str, int, int]] = dataclasses.field(default_factory=dict)

    def rows_of(self, unit: str) -> tuple[int, int] | None:
        """``(start, stop)`` of a shard or expert unit (rows of its tensors' first dimension), else ``None``."""
        span = self.shards.get(unit) or self.experts.get(unit)
        return None if span is None else (span[1], span[2])

    def source_keys(self, key: str) -> list[str]:
        """The checkpoint tensors model tensor ``key`` is read from."""
        return self.recipes[key].keys if key in self.recipes else [self.mapping[key]]

    def unit_quant(self, unit: str) -> dict[str, QuantSpec]:
        """``{tensor: QuantSpec}`` of the quantized tensors of ``unit`` as stored there (a shard's: its rows)."""
        quant = {k: self.quant[k] for k in self.units[unit] if k in self.quant}
        if unit in self.shards and quant:
            key, start, stop = self.shards[unit]
            quant[key] = dataclasses.replace(quant[key], shape=(stop - start, quant[key].shape[1]))
        return quant

    def layout(self, unit: str) -> UnitLayout:
        """The unit file's layout (header, quantization metadata and tensor offsets)."""
        entries: dict[str, tuple[str, tuple[int, ...]]] = {}
        quant = self.unit_quant(unit)
        for k in self.units[unit]:
            if k in quant:
                entries.update({k + suffix: spec for suffix, spec in quant[k].stored().items()})
            elif (span := self.rows_of(unit)) is not None:
                start, stop = span
                dt, shape = self.specs[k]
                entries[k] = (dt, (stop - start, *shape[1:]))
            else:
                entries[k] = self.specs[k]
        return plan_unit(entries, metadata_entry(quant))

    def groups(self) -> list[list[str]]:
        """Units in file order, the shards of one tensor (the experts of one module) together: written from
        one read of it (them)."""
        out: list[list[str]] = []

        def owner(unit: str) -> str | None:
            return (self.shards.get(unit) or self.experts.get(unit) or (None,))[0]

        for unit in self.units:
            key = owner(unit)
            if key is not None and out and owner(out[-1][0]) == key:
                out[-1].append(unit)
            else:
                out.append([unit])
        return out

    def stored_bytes(self, key: str) -> int:
        """Bytes of tensor ``key`` as stored (codes and quantization companions included)."""
        if key in self.quant:
            return self.quant[key].stored_bytes()
        dt, shape = self.specs[key]
        return math.prod(shape) * itemsize(dt)

    @property
    def total_bytes(self) -> int:
        """Tensor bytes of the whole model as stored (headers excluded)."""
        return sum(self.stored_bytes(k) for k in self.specs)


def quantizable(model: torch.nn.Module) -> set[str]:
    """Names of the weights weight-only quantization applies to: every ``nn.Linear`` and ``nn.Embedding``
    weight (the embedding too: tied to the LM head, and a quarter of a small model's bytes)."""
    kinds = (torch.nn.Linear, torch.nn.Embedding)
    return {f"{path}.weight" if path else "weight" for path, mod in model.named_modules() if isinstance(mod, kinds)}


def embedding_weights(model: torch.nn.Module) -> list[str]:
    """Stored names of the input embedding's weight, then the output embedding's (if it is not the same
    tensor): only ``nn.Embedding`` / ``nn.Linear`` modules with a 2-D weight. Tied aliases resolve to the
    stored name (the first in ``named_parameters()``, as :func:`~..models.architecture.tied_aliases`)."""
    names = {id(p): n for n, p in model.named_parameters()}
    out: list[str] = []
    for get in (model.get_input_embeddings, model.get_output_embeddings):
        try:
            mod = get()
        except (AttributeError, NotImplementedError):
            mod = None
        weight = getattr(mod, "weight", None)
        if not isinstance(mod, (torch.nn.Embedding, torch.nn.Linear)) or weight is None or weight.dim() != 2:
            continue
        key = names.get(id(weight))
        if key is not None and key not in out:
            out.append(key)
    return out


#: shard row counts are multiples of this (when they hold that many rows): torch's int4 kernel packs rows in blocks
#: of 64 (and refuses a row count not a multiple of 16), so an lm_head's shards can compute on their codes
SHARD_ROW_ALIGN = 64


def shard_cuts(plan: ModelPlan, keys: list[str], shard_size: int | str) -> dict[str, list[tuple[int, int]]]:
    """``{tensor: [(start, stop), ...]}`` for the tensors of ``keys`` to shard (see :func:`plan_model`)."""
    if shard_size == "auto":
        streamed = [sum(plan.stored_bytes(k) for k in ks) for u, ks in plan.units.items() if u != RESIDENT_UNIT]
        largest = max(streamed, default=0)
        size, above = largest or AUTO_SHARD_MIN_BYTES, max(largest, AUTO_SHARD_MIN_BYTES)
    else:
        size, above = int(shard_size), -1
    out = {}
    for key in keys:
        total, rows = plan.stored_bytes(key), plan.specs[key][1][0]
        if total <= above or rows == 0:
            continue
        step = max(1, size // (total // rows))
        step -= step % SHARD_ROW_ALIGN if step >= SHARD_ROW_ALIGN else 0  # whole blocks of the int4 kernel's layout
        out[key] = [(a, min(a + step, rows)) for a in range(0, rows, step)]
    return out


def with_shards(plan: ModelPlan, keys: list[str], shard_size: int | str | None) -> ModelPlan:
    """``plan`` with the chosen tensors of ``keys`` moved from ``resident`` into row-shard units, placed
    after ``resident`` and before the streamed blocks (in the order of ``keys``)."""
    keys = [k for k in keys if k in plan.units.get(RESIDENT_UNIT, ())]
    cuts = shard_cuts(plan, keys, shard_size) if shard_size is not None else {}
    if not cuts:
        return plan
    units = {RESIDENT_UNIT: [k for k in plan.units[RESIDENT_UNIT] if k not in cuts]}
    shards = {shard_unit_name(k, a, b): (k, a, b) for k, spans in cuts.items() for a, b in spans}
    units.update({u: [k] for u, (k, _, _) in shards.items()})
    units.update({u: ks for u, ks in plan.units.items() if u != RESIDENT_UNIT})
    return dataclasses.replace(plan, units={u: ks for u, ks in units.items() if ks}, shards=shards)


def plan_model(source: Source, dtype: torch.dtype | None, what: str, quantize: str | None = None,
               shard_size: int | str | None = None, expert_units: bool = True) -> ModelPlan:
    """Plan the chunking of ``source`` (named ``what`` in errors), casting floating tensors to ``dtype``
    (``None``: each tensor keeps the checkpoint's dtype) and quantizing linear weights with ``quantize``
    (``None``, ``"int8"`` or ``"int4"``; weights whose input dimension the group size does not divide stay
    unquantized).

    ``shard_size`` (:func:`parse_shard_size`'s result) splits the input embedding's and the output
    embedding's weights (:func:`embedding_weights`; biases never) into row shards: ``None``: never;
    ``"auto"``: a weight whose stored bytes exceed both the largest streamed unit's and
    :data:`AUTO_SHARD_MIN_BYTES`, into shards of about the largest streamed unit's bytes; bytes: every such
    weight, into shards of at most that many stored bytes (at least one row each; the last takes the rest).

    ``expert_units``: each expert of a mixture-of-experts layer (its rows of the experts module's fused
    tensors) is a unit of its own, fetched only when the router picks it; ``False`` keeps them in the layer's
    unit (whole-layer streaming: every expert fetched with its layer).

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
    recipes, mapping = match_checkpoint(meta, source.keys(), umap)
    shapes = {k: tuple(v.shape) for k, v in meta.state_dict(keep_vars=True).items()}
    linear = quantizable(meta) if quantize else set()
    embeddings = embedding_weights(meta)
    keep32 = fp32_names(meta, dtype)  # what from_pretrained(dtype=...) keeps in float32 stays float32 here too
    experts = {p: (n, [f"{p}.{t}" for t, _ in m.named_parameters(recurse=False)])
               for p, (m, n) in expert_modules(meta).items()
               if expert_units and umap.unit_of(p + ".") != RESIDENT_UNIT}
    del meta

    def stored(key: str) -> torch.dtype:
        src = src_dtypes[recipes[key].keys[0] if key in recipes else mapping[key]]
        if dtype is None or not src.is_floating_point:
            return src
        return torch.float32 if key in keep32 and src.itemsize >= 4 else dtype

    units, expert_units = _unit_lists(umap, experts)
    specs = {k: (dtype_name(stored(k)), shapes[k]) for k in umap.state_keys}
    quant = {k: q for k in sorted(linear & set(specs)) if (q := quant_spec(quantize, specs[k][1], specs[k][0])) is not None}
    plan = ModelPlan(
        architecture=cls.__name__, config=config, dtype=model_dtype,
        units={u: ks for u, ks in units.items() if ks}, mapping=mapping,
        specs={k: (quant[k].stored()[""] if k in quant else spec) for k, spec in specs.items()},
        tied=dict(umap.tied), quant=quant, recipes=recipes, experts=expert_units,
    )
    return with_shards(plan, embeddings, shard_size)


def match_checkpoint(meta: torch.nn.Module, ckpt_keys: list[str], umap: Any) -> tuple[dict[str, Recipe], dict[str, str]]:
    """``({model tensor: Recipe}, {model tensor: checkpoint key})``: converted tensors, plain renames.

    transformers' own conversion mapping first (:func:`.convert.plan_recipes`); checkpoint keys it leaves
    unmatched go through :func:`map_checkpoint_keys` (base-model prefix on one side, legacy names, saved
    buffers), which raises for anything still missing or unexpected.

    Raises:
        ChunkingError: checkpoint and model class disagree.
    """
    wanted = set(umap.state_keys)
    recipes, unmatched = plan_recipes(meta, ckpt_keys, wanted)
    converted = {k: r for k, r in recipes.items() if r.converter is not None}
    mapping = {k: r.keys[0] for k, r in recipes.items() if r.converter is None}
    rest = [k for k in umap.state_keys if k not in recipes]
    buffers = {n for n, _ in meta.named_buffers()}
    # Checkpoints of a head model loaded into a base model (or the reverse) differ by this prefix.
    base_prefix = getattr(meta, "base_model_prefix", "") or ""
    mapping.update(map_checkpoint_keys(unmatched, rest, umap.tied, buffers, base_prefix))
    return converted, mapping


def _unit_lists(umap: Any, experts: dict[str, tuple[int, list[str]]]
                ) -> tuple[dict[str, list[str]], dict[str, tuple[str, int, int]]]:
    """Units in file order, ``{unit: [tensors]}``, each experts module's experts placed right after the
    unit of its layer, one expert per unit; and ``{expert unit: (module path, start, stop)}``."""
    units: dict[str, list[str]] = {u: [] for u in umap.units()}
    fused = {k for _, keys in experts.values() for k in keys}
    for key in umap.state_keys:
        if key not in fused:
            units[umap.unit_of(key)].append(key)
    out: dict[str, list[str]] = {}
    spans: dict[str, tuple[str, int, int]] = {}
    for unit, keys in units.items():
        out[unit] = keys
        for path, (count, params) in experts.items():
            if umap.unit_of(params[0]) != unit:
                continue
            for e in range(count):
                name = expert_unit_name(path, e, e + 1)
                out[name], spans[name] = list(params), (path, e, e + 1)
    return out, spans


__all__ = ["AUTO_SHARD_MIN_BYTES", "ModelPlan", "match_checkpoint", "embedding_weights", "map_checkpoint_keys", "parse_dtype",
           "parse_shard_size", "plan_model", "quantizable", "shard_cuts", "with_shards"]
