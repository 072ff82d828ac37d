"""Which chunked models a storage holds: find their manifests, resolve a requested model name.

Shared by the server (what it hosts) and the storage-backed client source (what it reads), so neither
has to import the other.
"""

from __future__ import annotations

from ..exceptions import ManifestError, NotFoundError
from ..format import MANIFEST_FILE, Manifest, join_key
from .base import StorageBackend


async def discover_models(storage: StorageBackend, prefix: str = "") -> dict[str, tuple[str, Manifest]]:
    """Find every ``manifest.json`` under ``prefix``: ``{model name: (model dir prefix, manifest)}``.

    Raises:
        ManifestError: a manifest is malformed, or two manifests name the same model.
    """
    found: dict[str, tuple[str, Manifest]] = {}
    top = join_key(prefix, MANIFEST_FILE)
    keys = [k for k in await storage.list(prefix) if k == top or k.endswith("/" + MANIFEST_FILE)]
    for key in keys:
        model_prefix = key[: -len(MANIFEST_FILE)].rstrip("/")
        try:
            manifest = Manifest.from_bytes(await storage.load(key))
        except ManifestError as exc:
            raise type(exc)(f"{storage.location}/{key}: {exc}") from exc  # keep ManifestLimitError specific
        if manifest.name in found:
            raise ManifestError(f"two models named {manifest.name!r} under {storage.location}: "
                                f"{found[manifest.name][0]!r} and {model_prefix!r}")
        found[manifest.name] = (model_prefix, manifest)
    return found


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


__all__ = ["discover_models", "pick_model"]
