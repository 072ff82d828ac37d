"""What a server hosts: the storage it reads, and each model's manifest bytes (verbatim) and signature."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..exceptions import ConfigurationError, ManifestError
from ..format import Manifest, join_key
from ..format.signing import read_signed_manifest
from ..storage import StorageBackend, open_storage
from ..storage.catalog import discover_models
from .handler import Hosted


async def load_hosted(storage: StorageBackend, prefix: str) -> dict[str, Hosted]:
    """``{model name: Hosted}`` for every manifest under ``prefix``, with the stored bytes kept exactly as
    written (a signature is over those bytes, so the server must never re-serialize them).

    Raises:
        ConfigurationError: no manifest under ``prefix``.
        ManifestError: a manifest is malformed, or changed while it was being loaded.
    """
    found = await discover_models(storage, prefix)
    if not found:
        raise ConfigurationError(f"no chunked model (manifest.json) under {storage.location}/{prefix}")
    hosted: dict[str, Hosted] = {}
    for name, (model_prefix, _) in found.items():
        data, signature = await read_signed_manifest(storage, model_prefix)
        manifest = Manifest.from_bytes(data)  # the bytes we serve are the bytes we validated
        if manifest.name != name:
            raise ManifestError(f"{storage.location}/{model_prefix}: manifest changed while loading; try again")
        hosted[name] = Hosted(model_prefix, manifest, data, signature)
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
