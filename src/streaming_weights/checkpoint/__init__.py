"""Hugging Face checkpoint folders served as they are: no chunk step, no second copy (issue 27).

A unit is the chunker's plan over the original safetensors files (:mod:`streaming_weights.chunker.plan`),
its bytes produced on demand by the chunker's own :func:`~streaming_weights.chunker.produce.produce_group`;
hashes are kept in an index outside the folder (:mod:`.index`). A folder of checkpoints is presented to
servers and clients as chunked models by :class:`~.storage.CheckpointStorage`, which
:func:`streaming_weights.storage.open_storage` applies to every directory it opens (the storage layout plugin
:func:`adapt`, declared as an entry point), so ``surfing serve DIR``, ``websocket_uri="path/to/checkpoint"``
and ``surfing sign DIR`` work on checkpoint folders as on chunked ones.

Public surface: :class:`CheckpointStorage`, :class:`CheckpointModel` (lazily), :func:`adapt`,
:func:`open_checkpoints`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..storage.base import StorageBackend
from ..storage.filesystem import FilesystemBackend
from .layout import checkpoint_prefixes
from .storage import CheckpointStorage


def _has_checkpoint(root: Path) -> bool:
    keys = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        keys += [f if rel == "." else f"{rel}/{f}" for f in filenames if f.endswith((".json", ".safetensors"))]
    return bool(checkpoint_prefixes([k.replace(os.sep, "/") for k in keys]))


def adapt(backend: StorageBackend, *, index_root: str | os.PathLike[str] | None = None) -> StorageBackend | None:
    """The storage layout adapter (:mod:`streaming_weights.storage.layouts`): a :class:`CheckpointStorage`
    over a filesystem backend holding at least one checkpoint folder, or over an S3 backend (its listings say
    which prefixes are checkpoints), else ``None``."""
    if type(backend).__name__ == "S3Backend":  # listed lazily: checkpoint folders are found by the listings
        return CheckpointStorage(backend, index_root=index_root)
    if type(backend) is not FilesystemBackend or not _has_checkpoint(backend.base_dir):
        return None
    return CheckpointStorage(backend, index_root=index_root)


def open_checkpoints(location: str | os.PathLike[str], *, index_root: str | os.PathLike[str] | None = None
                     ) -> CheckpointStorage:
    """A :class:`CheckpointStorage` over directory ``location`` with its indexes under ``index_root``."""
    return CheckpointStorage(FilesystemBackend(location), index_root=index_root)


def __getattr__(name: str) -> Any:
    if name == "CheckpointModel":
        from .model import CheckpointModel

        return CheckpointModel
    raise AttributeError(name)


__all__ = ["CheckpointModel", "CheckpointStorage", "adapt", "open_checkpoints"]
