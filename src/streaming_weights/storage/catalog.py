"""Which chunked models a storage holds: find their manifests, resolve a requested model name.

Shared by the server (what it hosts) and the storage-backed client source (what it reads), so neither
has to import the other.
"""

from __future__ import annotations

from typing import NamedTuple

from ..exceptions import ManifestError, NotFoundError
from ..format import MANIFEST_FILE, Manifest, join_key
from ..format.names import SIGNATURE_FILE
from .base import StorageBackend


class StoredModel(NamedTuple):
    """One model found in a storage: its directory prefix, parsed manifest, the manifest's exact stored bytes
    and its detached signature (``None`` when unsigned)."""

    prefix: str
    manifest: Manifest
    data: bytes
    signature: bytes | None


async def discover_stored(storage: StorageBackend, prefix: str = "") -> dict[str, StoredModel]:
    """Find every ``manifest.json`` under ``prefix``, reading each manifest (and a signature the listing
    shows) exactly once: ``{model name: StoredModel}``.

    Raises:
        ManifestError: a manifest is malformed, or two manifests name the same model.
    """
    found: dict[str, StoredModel] = {}
    listed = set(await storage.list(prefix))
    top = join_key(prefix, MANIFEST_FILE)
    for key in sorted(k for k in listed if k == top or k.endswith("/" + MANIFEST_FILE)):
        model_prefix = key[: -len(MANIFEST_FILE)].rstrip("/")
        data = bytes(await storage.load(key))
        try:
            manifest = Manifest.from_bytes(data)
        except ManifestError as exc:
            raise type(exc)(f"{storage.location}/{key}: {exc}") from exc  # keep ManifestLimitError specific
        if manifest.name in found:
            raise ManifestError(f"two models named {manifest.name!r} under {storage.location}: "
                                f"{found[manifest.name].prefix!r} and {model_prefix!r}")
        sig_key = join_key(model_prefix, SIGNATURE_FILE)
        signature = bytes(await storage.load(sig_key)) if sig_key in listed else None
        found[manifest.name] = StoredModel(model_prefix, manifest, data, signature)
    return found


async def discover_models(storage: StorageBackend, prefix: str = "") -> dict[str, tuple[str, Manifest]]:
    """Find every ``manifest.json`` under ``prefix``: ``{model name: (model dir prefix, manifest)}``.

    Raises:
        ManifestError: a manifest is malformed, or two manifests name the same model.
    """
    return {name: (m.prefix, m.manifest) for name, m in (await discover_stored(storage, prefix)).items()}


def pick_model(models: dict[str, object], name: str | None, where: str) -> str:
    """Resolve a requested model name against the hosted ones (one hosted model serves ``None``).

    Raises:
        NotFoundError: ``name`` is not hosted, or it is None and several models are.
    """
    if name is None:
        if len(models) == 1:
            return next(iter(models))
        raise NotFoundError(f"{where} hosts {len(models)} models; pass model_name= one of {sorted(models)}")
    if name in models:
        return name
    raise NotFoundError(f"{where} does not host model {name!r}; it hosts {sorted(models)}")


__all__ = ["StoredModel", "discover_models", "discover_stored", "pick_model"]
