"""What a server hosts: the storage it reads, and each model's manifest bytes (verbatim) and signature."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..exceptions import ConfigurationError
from ..format import join_key
from ..storage import StorageBackend, open_storage
from ..storage.catalog import discover_stored
from .handler import Hosted


async def load_hosted(storage: StorageBackend, prefix: str) -> dict[str, Hosted]:
    """``{model name: Hosted}`` for every manifest under ``prefix``, with the stored bytes kept exactly as
    written (a signature is over those bytes, so the server must never re-serialize them).

    Raises:
        ConfigurationError: no manifest under ``prefix``.
        ManifestError: a manifest is malformed, or two name the same model.
    """
    found = await discover_stored(storage, prefix)
    if not found:
        raise ConfigurationError(f"no chunked model (manifest.json) under {storage.location}/{prefix}")
    hosted: dict[str, Hosted] = {}
    for name, stored in found.items():
        # the bytes we serve are the bytes we validated (and the ones a signature covers)
        hosted[name] = Hosted(stored.prefix, stored.manifest, stored.data, stored.signature)
    return hosted


def resolve_storage(source: Any, chunks_dir: Any, storage_backend: StorageBackend | None,
                    prefix: str) -> tuple[StorageBackend, str]:
    """(backend, key prefix) from the constructor's three spellings of "where the models are"."""
    given = [x for x in (source, chunks_dir, storage_backend) if x is not None]
    if len(given) > 1:
        raise ConfigurationError("pass only one of source, chunks_dir, storage_backend")
    if not given:
        raise ConfigurationError("WeightServer needs a chunk directory or a storage backend (source=...)")
    location = given[0]
    if isinstance(location, StorageBackend):
        storage, extra = location, ""
    else:
        storage, extra = open_storage(str(Path(location)) if isinstance(location, os.PathLike) else location)
    return storage, (join_key(extra, prefix.strip("/")).strip("/") if prefix else extra)


__all__ = ["load_hosted", "resolve_storage"]
