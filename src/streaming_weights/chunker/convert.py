"""Checkpoint layout -> the model class's layout, the way transformers converts it at load time.

transformers 5 renames checkpoint keys and merges some tensors while loading (per-expert 2-D weights
stacked into the fused 3-D ``experts.gate_up_proj`` / ``experts.down_proj``, Mixtral's ``w1``/``w3``,
GPT-NeoX's ``embed_out``…). Those steps are listed by
``transformers.conversion_mapping.get_model_conversion_mapping(model)`` as ``WeightRenaming`` /
``WeightConverter`` objects (``transformers.core_model_loading``). This module uses exactly those objects,
key by key, so any architecture ``from_pretrained`` loads is read the same way here — with no per-architecture
table of our own — and one model tensor is produced at a time from only the checkpoint tensors it needs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..exceptions import ChunkingError

#: reads one checkpoint tensor by its key
Reader = Callable[[str], torch.Tensor]


@dataclass
class Recipe:
    """How to produce model tensor(s) from checkpoint tensors.

    Attributes:
        target: the first model tensor it produces (the key transformers files it under).
        sources: ``[(source pattern, checkpoint key)]`` in transformers' collection order.
        converter: the ``WeightConverter`` (a private copy) or ``None`` for a plain rename.
        targets: every model tensor it produces (a split such as ``qkv -> q, k, v`` makes several).
    """

    target: str
    sources: list[tuple[str, str]] = field(default_factory=list)
    converter: Any = None
    targets: list[str] = field(default_factory=list)

    @property
    def keys(self) -> list[str]:
        """The checkpoint keys this recipe reads."""
        return [k for _, k in self.sources]

    def run(self, read: Reader, meta: torch.nn.Module | None, config: Any) -> dict[str, torch.Tensor]:
        """``{model tensor name: tensor}`` for every target (reads only this recipe's checkpoint tensors).

        Raises:
            ChunkingError: transformers' conversion failed (shapes that do not stack, a missing expert…).
        """
        if self.converter is None:
            return {self.target: read(self.sources[0][1])}
        conv = copy.deepcopy(self.converter)  # convert() consumes what was collected: keep the recipe reusable
        for pattern, key in self.sources:
            conv.add_tensor(self.target, key, pattern, lambda k=key: read(k))
        try:
            out = conv.convert(self.target, model=meta, config=config)
        except Exception as exc:  # noqa: BLE001 - transformers raises plain errors; name the tensor
            raise ChunkingError(f"converting checkpoint tensors {self.keys[:4]} into {self.target!r} failed: "
                                f"{exc}") from exc
        return {k: (v[0] if isinstance(v, list) else v) for k, v in out.items()}


def plan_recipes(meta: torch.nn.Module, ckpt_keys: list[str], wanted: set[str]) -> tuple[dict[str, Recipe], list[str]]:
    """Map checkpoint keys onto the model's tensors with transformers' conversion mapping.

    Args:
        meta: the model class built on ``meta`` (its conversion mapping and state dict names).
        ckpt_keys: every tensor name in the checkpoint.
        wanted: the model tensors to produce.

    Returns:
        ``({model tensor: Recipe}, [checkpoint keys no model tensor takes])``; a recipe producing several
        tensors is listed under each of them.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    mapping = get_model_conversion_mapping(meta)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    meta_sd = {k: True for k in meta.state_dict(keep_vars=True)}
    prefix = getattr(meta, "base_model_prefix", None) or None
    recipes: dict[str, Recipe] = {}
    unmatched: list[str] = []
    for key in sorted(ckpt_keys, key=dot_natural_key):  # transformers' order: experts 0..E-1 stack in order
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, meta_sd)
        if renamed not in wanted and key in wanted:
            renamed, pattern = key, None
        if renamed not in wanted:
            unmatched.append(key)
            continue
        if pattern is None:
            if renamed in recipes:
                raise ChunkingError(f"checkpoint tensors {recipes[renamed].keys[0]!r} and {key!r} both map to "
                                    f"{renamed!r}")
            recipes[renamed] = Recipe(renamed, [(key, key)], None, [renamed])
            continue
        conv = by_pattern[pattern]
        recipe = recipes.get(renamed)
        if recipe is None:
            targets = [renamed.replace(conv.target_patterns[0], t) for t in conv.target_patterns]
            recipe = Recipe(renamed, [], conv, [t for t in targets if t in wanted] or [renamed])
            for t in recipe.targets:
                recipes[t] = recipe
        recipe.sources.append((pattern, key))
    return recipes, unmatched


__all__ = ["Recipe", "plan_recipes"]
