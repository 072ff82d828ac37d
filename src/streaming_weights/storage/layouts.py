"""Other layouts a storage may hold, presented as chunked models (``manifest.json`` + ``units/``).

A *layout adapter* takes a backend and returns a backend that also shows the models of another layout as
chunked models (or ``None`` when it has nothing to add). :func:`~streaming_weights.storage.open_storage` applies
the adapters to every location it opens, so a server and a client read such models through the same
``StorageBackend`` calls as chunked ones and cannot tell them apart.

Adapters are plugins: registered with :func:`register_layout`, or declared as entry points of the group
``streaming_weights.layouts`` (loaded on first use). The package declares one: Hugging Face checkpoint folders
served as they are (:mod:`streaming_weights.checkpoint`). Storage itself knows nothing of them.
"""

from __future__ import annotations

import logging
from typing import Callable

from .base import StorageBackend

GROUP = "streaming_weights.layouts"
LayoutAdapter = Callable[[StorageBackend], "StorageBackend | None"]

logger = logging.getLogger("streaming_weights.storage")
_adapters: list[LayoutAdapter] = []
_loaded = False


def register_layout(adapter: LayoutAdapter) -> None:
    """Apply ``adapter`` to every location opened from now on (once, however often it is registered)."""
    if adapter not in _adapters:
        _adapters.append(adapter)


def layout_adapters() -> list[LayoutAdapter]:
    """The registered adapters, the ``streaming_weights.layouts`` entry points first loaded."""
    global _loaded
    if not _loaded:
        _loaded = True
        from importlib.metadata import entry_points

        for ep in entry_points(group=GROUP):
            try:
                register_layout(ep.load())
            except Exception as exc:  # noqa: BLE001 - a broken plugin must not stop chunked models from opening
                logger.warning("cannot load storage layout %r (%s): %s", ep.name, ep.value, exc)
    return list(_adapters)


def present(backend: StorageBackend) -> StorageBackend:
    """``backend`` as the first adapter that has something to add presents it (else ``backend`` itself)."""
    for adapter in layout_adapters():
        shown = adapter(backend)
        if shown is not None:
            return shown
    return backend


__all__ = ["GROUP", "LayoutAdapter", "layout_adapters", "present", "register_layout"]
