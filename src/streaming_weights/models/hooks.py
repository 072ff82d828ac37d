"""Swap a unit's real tensors into a meta-built module right before it runs, and out right after.

The module keeps its ``meta`` parameters between uses; the tensors (views into the unit's verified
receive buffer) are assigned in a forward pre-hook and the meta placeholders restored in a forward
hook that also runs when the forward raises, so a module never computes with missing weights and
never holds a unit the cache has dropped.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..exceptions import ModelError
from .patching import ModuleHook, add_hook


def _split(module: nn.Module, rel: str) -> tuple[nn.Module, str]:
    parent_path, _, attr = rel.rpartition(".")
    try:
        return (module.get_submodule(parent_path) if parent_path else module), attr
    except AttributeError as exc:
        raise ModelError(f"tensor {rel!r} does not belong to {type(module).__name__}") from exc


def assign_tensor(module: nn.Module, rel: str, tensor: torch.Tensor) -> None:
    """Put ``tensor`` at ``rel`` (a parameter or buffer path relative to ``module``) without copying."""
    _put(*_split(module, rel), module, rel, tensor)


def _put(owner: nn.Module, attr: str, module: nn.Module, rel: str, tensor: torch.Tensor) -> None:
    """:func:`assign_tensor` with ``rel`` already resolved to its ``owner`` module and ``attr`` name."""
    if attr in owner._parameters:
        old = owner._parameters[attr]
        if old is not None and old.shape != tensor.shape:
            raise ModelError(f"{rel}: unit tensor has shape {tuple(tensor.shape)}, model expects {tuple(old.shape)}")
        owner._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    elif attr in owner._buffers:
        owner._buffers[attr] = tensor
    else:
        raise ModelError(f"{type(module).__name__} has no parameter or buffer {rel!r}")


def assign_unit(module: nn.Module, tensors: dict[str, torch.Tensor], prefix: str = "",
                slots: dict[str, tuple[nn.Module, str]] | None = None) -> None:
    """Put every tensor of a unit (names are full model paths starting with ``prefix``) into ``module``.

    The one assign path: resident parts (``prefix=""``, ``module`` = the model) and streamed units
    (``prefix`` = the unit's module path) go through it alike. ``slots``: tensor paths already resolved to
    their owner module and name (a streamed unit's binding resolves them once); others are resolved here.
    """
    cut = len(prefix)
    for full, t in tensors.items():
        rel = full[cut:]
        slot = slots.get(rel) if slots is not None else None
        _put(*(slot or _split(module, rel)), module, rel, t)


class UnitBinding(ModuleHook):
    """Streams one unit (module path ``name``) through ``acquire``/``release`` callbacks (a :class:`ModuleHook`).

    The modules owning the unit's tensors are resolved when the binding is made: a submodule replaced after that
    (rather than patched in place, as this package does) would not receive them."""

    def __init__(self, root: nn.Module, name: str, acquire: Callable[[str], dict[str, torch.Tensor]],
                 release: Callable[[str], None]) -> None:
        self.name = name
        self.module = root.get_submodule(name)
        self._acquire = acquire
        self._release = release
        prefix = name + "."
        self._placeholders = {
            n: t for n, t in self.module.state_dict(keep_vars=True).items() if isinstance(t, torch.Tensor)
        }
        # each tensor's owner module and name, resolved once: a streamed unit is assigned and restored per use
        self._slots = {rel: _split(self.module, rel) for rel in self._placeholders}
        self._prefix = prefix
        self._depth = 0
        self._held = False
        #: the unit's tensors stay in the module between calls (:meth:`pin`): a use costs nothing
        self.pinned = False
        self.pinned_uses = 0
        self._patch = add_hook(self.module, self)

    def pin(self, tensors: dict[str, torch.Tensor]) -> None:
        """Keep ``tensors`` (the unit, kept by the cache for as long as it is pinned) in the module: later calls
        neither fetch, nor assign, nor release. Only between calls."""
        assert self._depth == 0, "pin between calls only"
        assign_unit(self.module, tensors, self._prefix, self._slots)
        self.pinned = True

    def unpin(self) -> None:
        """Back to fetching per call: the meta placeholders return (the cache may drop the unit after this)."""
        if self.pinned:
            self.pinned = False
            self._restore()

    def pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._depth += 1
        if self.pinned:
            self.pinned_uses += self._depth == 1
            return None
        if self._depth > 1:  # re-entrant call: tensors are already in place
            return None
        # torch runs always_call forward hooks even when a pre-hook raises, so _post cleans up both ways.
        tensors = self._acquire(self.name)
        self._held = True
        assign_unit(self.module, tensors, self._prefix, self._slots)
        return None

    def post_forward(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        self._depth -= 1
        if self._depth == 0 and not self.pinned:
            self._restore()
            if self._held:
                self._held = False
                self._release(self.name)
        return None

    def _restore(self) -> None:
        for rel, placeholder in self._placeholders.items():
            owner, attr = self._slots[rel]
            if attr in owner._parameters:
                owner._parameters[attr] = placeholder
            else:
                owner._buffers[attr] = placeholder

    def remove(self) -> None:
        self._patch.remove()
        self._restore()
