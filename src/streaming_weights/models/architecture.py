"""Which parts of a transformers model stream and which stay resident (the *unit map*).

A streamed unit is one repeated block: a module whose class is listed in the model's
``_no_split_modules`` and that sits in an ``nn.ModuleList`` (``model.layers.3``, ``encoder.block.0``,
``transformer.h.5``). Everything else (embeddings, final norm, lm_head, pooler) is resident. Models
without ``_no_split_modules`` fall back to the children of their ``nn.ModuleList`` s.

The model itself is always transformers' own class, built on the ``meta`` device: only parameters go
to meta, buffers (rotary ``inv_freq``, position ids) are computed for real as in ``from_pretrained``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import threading
from itertools import chain
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from ..exceptions import UnsupportedArchitectureError
from ..format.names import RESIDENT_UNIT

_dtype_lock = threading.Lock()
# transformers resolves its public names with lazy imports that are not thread-safe: two threads building
# models at once can see ``getattr(transformers, "LlamaForCausalLM")`` fail while the other imports it.
_import_lock = threading.RLock()


def resolve_architecture(name: str) -> type:
    """The transformers model class called ``name`` (e.g. ``LlamaForCausalLM``).

    Raises:
        UnsupportedArchitectureError: not a transformers ``PreTrainedModel`` class.
    """
    with _import_lock:
        import transformers

    if not isinstance(name, str) or not name.isidentifier():
        raise UnsupportedArchitectureError(f"invalid architecture name {name!r}")
    try:
        with _import_lock:
            cls = getattr(transformers, name)
    except (AttributeError, ImportError) as exc:
        raise UnsupportedArchitectureError(
            f"transformers {transformers.__version__} has no model class {name!r}; upgrade transformers "
            "or re-chunk with a supported architecture"
        ) from exc
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise UnsupportedArchitectureError(f"{name!r} is not a transformers model class")
    return cls


def build_config(model_type: str, config: dict[str, Any]):
    """A transformers config from the manifest's config dict (no hub, no remote code)."""
    with _import_lock:
        from transformers import CONFIG_MAPPING

    try:
        with _import_lock:
            config_cls = CONFIG_MAPPING[model_type]
    except KeyError as exc:
        raise UnsupportedArchitectureError(f"transformers does not know model_type {model_type!r}") from exc
    cfg = dict(config)
    cfg.pop("model_type", None)
    cfg.pop("transformers_version", None)
    return config_cls.from_dict(cfg)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    if dtype is None or not dtype.is_floating_point:
        yield
        return
    with _dtype_lock:
        old = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            yield
        finally:
            torch.set_default_dtype(old)


def build_meta_model(cls: type, config, dtype: torch.dtype | None = None) -> nn.Module:
    """Instantiate ``cls(config)`` with parameters on ``meta`` and real buffers, tied as transformers ties."""
    from accelerate import init_empty_weights
    from transformers.initialization import no_init_weights

    # parameters on meta are never initialised (transformers' own init of a meta model: ~0.2 s at 1B, for nothing)
    with _default_dtype(dtype), init_empty_weights(include_buffers=False), no_init_weights():
        model = cls(config)
    model.tie_weights()
    model.eval()
    return model


def fp32_names(model: nn.Module, dtype: torch.dtype | None) -> frozenset[str]:
    """Tensor names ``from_pretrained(dtype=dtype)`` keeps in float32: the model's ``_keep_in_fp32_modules``
    under float16 and ``_keep_in_fp32_modules_strict`` under float16/bfloat16 (transformers collects both from
    every sub-model into the instance's attributes), each module pattern searched in the full tensor name as
    transformers matches them."""
    patterns: set[str] = set()
    if dtype == torch.float16:
        patterns |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
    if dtype in (torch.float16, torch.bfloat16):
        patterns |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    if not patterns:
        return frozenset()
    pattern = re.compile("|".join(f"(?:{p.replace('*', '.*')})" for p in sorted(patterns)))
    named = chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False))
    return frozenset(name for name, _ in named if pattern.search(name))


def fp32_names_for(manifest: Any, dtype: torch.dtype) -> frozenset[str]:
    """:func:`fp32_names` of the model ``manifest`` describes, computed in ``dtype`` (the resolver the client's
    unit converter is built with). Only half-precision compute can keep anything in float32."""
    if dtype not in (torch.float16, torch.bfloat16):
        return frozenset()
    return _facts_of(manifest)[dtype]


def linear_weight_names(manifest: Any) -> frozenset[str]:
    """Names of the ``nn.Linear`` weights of the model ``manifest`` describes (exactly that class, not a
    subclass): the tensors torch's weight-only kernels may compute with."""
    return _facts_of(manifest)["linear"]


def _facts_of(manifest: Any) -> dict[Any, frozenset[str]]:
    return _facts(manifest.architecture, manifest.model_type, json.dumps(manifest.config, sort_keys=True))


@functools.lru_cache(maxsize=8)
def _facts(architecture: str, model_type: str, config: str) -> dict[Any, frozenset[str]]:
    """What the converter asks of a model's structure, read from one ``meta`` build per model (not per question):
    its ``nn.Linear`` weights and, per half-precision dtype, the tensors kept in float32."""
    model = build_meta_model(resolve_architecture(architecture), build_config(model_type, json.loads(config)))
    linear = frozenset(f"{path}.weight" for path, m in model.named_modules() if type(m) is nn.Linear)
    return {"linear": linear, **{dt: fp32_names(model, dt) for dt in (torch.float16, torch.bfloat16)}}


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """``{alias: stored}`` for parameters shared between several names (e.g. lm_head -> embeddings)."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def streamed_module_names(model: nn.Module) -> list[str]:
    """Paths of the streamed blocks, in registration order (the default execution order)."""
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    names: list[str] = []
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList):
            continue
        for idx, child in module.named_children():
            if (not no_split or type(child).__name__ in no_split) and any(True for _ in child.parameters()):
                names.append(f"{path}.{idx}" if path else idx)
    if not names:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no repeated blocks to stream (no nn.ModuleList of "
            f"{sorted(no_split) or 'modules'}); see docs/extending.md"
        )
    # Nested lists (a block list inside a block) would stream twice: keep the outermost.
    outer = [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]
    return outer


@dataclass(frozen=True)
class UnitMap:
    """Where every stored tensor of a model goes."""

    streamed: list[str]  # module paths, in default execution order
    tied: dict[str, str]  # alias -> stored tensor name
    state_keys: list[str]  # every tensor name to store (parameters + persistent buffers, aliases removed)

    def unit_of(self, tensor_name: str) -> str:
        for path in self.streamed:
            if tensor_name.startswith(path + "."):
                return path
        return RESIDENT_UNIT

    def units(self) -> list[str]:
        """Unit names in file order: resident first, then the streamed blocks."""
        return [RESIDENT_UNIT, *self.streamed]


def unit_map(model: nn.Module) -> UnitMap:
    tied = tied_aliases(model)
    keys = [k for k in model.state_dict(keep_vars=True) if k not in tied]
    return UnitMap(streamed_module_names(model), tied, keys)
