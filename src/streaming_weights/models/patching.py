"""The one way this package attaches behaviour to transformers' modules and models.

Two verbs, each reversible through the :class:`Patch` it returns:

* :func:`add_hook` puts a :class:`ModuleHook` around a module's forward: ``pre_forward`` runs before it and
  may replace the call's arguments; ``post_forward`` runs after it — also when the forward (or a
  ``pre_forward``) raised, so a hook always cleans up — and may replace the output. Hooks on one module run
  in the order they were added. They live on torch's own hook lists (keyword-argument calls, nested modules
  and ``torch.no_grad`` behave exactly as without them), in the shape of accelerate's ``ModelHook``.
* :func:`patch_method` replaces one *instance's* method by a wrapper of the original (``forward`` of a
  streamed embedding, ``generate`` of a model on a device, ``_get_candidate_generator`` while drafts are
  counted). The class is never touched; removing the patch restores the instance as it was.

Every patch of a model in this package goes through here (``tests/test_structure.py`` checks it): units
(:mod:`.hooks`), row-sharded edges (:mod:`.edges`), routed experts (:mod:`.experts`), device placement
(:mod:`.placement`), draft counting (:mod:`.generation`) and the engine's inference scopes.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn


class ModuleHook:
    """Behaviour around one module's forward. Subclasses override what they need."""

    def pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Before the forward; return ``(args, kwargs)`` to replace the call's arguments, or ``None``."""
        return None

    def post_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        """After the forward, and after a failed forward (``output`` is then ``None`` and is not used);
        return the output to use (``None`` keeps it)."""
        return None


class FunctionHook(ModuleHook):
    """A :class:`ModuleHook` from two plain functions (either may be ``None``)."""

    def __init__(self, pre: Callable[[nn.Module, tuple, dict], tuple[tuple, dict] | None] | None = None,
                 post: Callable[[nn.Module, tuple, dict, Any], Any] | None = None) -> None:
        self._pre, self._post = pre, post

    def pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        return None if self._pre is None else self._pre(module, args, kwargs)

    def post_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        return None if self._post is None else self._post(module, args, kwargs, output)


class Patch:
    """Undoes one :func:`add_hook` or :func:`patch_method` (idempotent)."""

    def __init__(self, undo: Callable[[], None]) -> None:
        self._undo: Callable[[], None] | None = undo

    def remove(self) -> None:
        if self._undo is not None:
            undo, self._undo = self._undo, None
            undo()


def add_hook(module: nn.Module, hook: ModuleHook) -> Patch:
    """Run ``hook`` around every call of ``module`` (see the module docstring). Returns its :class:`Patch`."""
    handles = [module.register_forward_pre_hook(hook.pre_forward, with_kwargs=True),
               module.register_forward_hook(hook.post_forward, with_kwargs=True, always_call=True)]

    def undo() -> None:
        for h in handles:
            h.remove()

    return Patch(undo)


def patch_method(obj: Any, name: str, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]) -> Patch:
    """Replace ``obj.name`` on this instance only by ``wrap(original bound method)``. Returns its :class:`Patch`;
    removing it restores what the instance had (its own attribute, or the class's method)."""
    had = name in obj.__dict__
    previous = obj.__dict__.get(name)
    obj.__dict__[name] = wrap(getattr(obj, name))

    def undo() -> None:
        if had:
            obj.__dict__[name] = previous
        else:
            obj.__dict__.pop(name, None)

    return Patch(undo)


__all__ = ["FunctionHook", "ModuleHook", "Patch", "add_hook", "patch_method"]
