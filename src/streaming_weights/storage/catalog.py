"""Which chunked models a storage holds: find their manifests, resolve a requested model name.

Shared by the server (what it hosts) and the storage-backed client source (what it reads), so neither
has to import the other.
"""

from __future__ import annotations

from typing import NamedTuple

from ..exceptions import KeyNotFoundError, ManifestError, NotFoundError
from ..format import MANIFEST_FILE, Manifest, join_key
from ..format.modelnames import aliases, requested_bases
from ..format.names import SIGNATURE_FILE
from .base import StorageBackend


class StoredModel(NamedTuple):
    """One model found in a storage: its directory prefix, parsed manifest, the manifest's exact stored bytes
    and its detached signature (``None`` when unsigned)."""

    prefix: str
    manifest: Manifest
    data: bytes
    signature: bytes | None


async def read_stored(storage: StorageBackend, model_prefix: str, *, signed: bool | None = None) -> StoredModel:
    """The model whose ``manifest.json`` is under ``model_prefix``: read, parsed and with its signature.

    ``signed``: whether a listing showed ``manifest.json.sig`` (``None``: ask the storage).

    Raises:
        KeyNotFoundError: no manifest there.
        ManifestError / ManifestLimitError: a malformed manifest (the message names where it is).
    """
    key = join_key(model_prefix, MANIFEST_FILE)
    data = bytes(await storage.load(key))
    try:
        manifest = Manifest.from_bytes(data)
    except ManifestError as exc:
        raise type(exc)(f"{storage.location}/{key}: {exc}") from exc  # keep ManifestLimitError specific
    sig_key = join_key(model_prefix, SIGNATURE_FILE)
    if signed is None:
        signed = await storage.exists(sig_key)
    try:
        signature = bytes(await storage.load(sig_key)) if signed else None
    except KeyNotFoundError:  # removed since it was listed
        signature = None
    return StoredModel(model_prefix, manifest, data, signature)


async def manifest_prefixes(storage: StorageBackend, prefix: str = "") -> tuple[list[str], set[str]]:
    """(model directory prefixes holding a ``manifest.json`` under ``prefix``, sorted; every listed key)."""
    listed = set(await storage.list(prefix))
    top = join_key(prefix, MANIFEST_FILE)
    keys = sorted(k for k in listed if k == top or k.endswith("/" + MANIFEST_FILE))
    return [k[: -len(MANIFEST_FILE)].rstrip("/") for k in keys], listed


async def discover_stored(storage: StorageBackend, prefix: str = "") -> dict[str, StoredModel]:
    """Find every ``manifest.json`` under ``prefix``, reading each manifest (and a signature the listing
    shows) exactly once: ``{model name: StoredModel}``.

    Raises:
        ManifestError: a manifest is malformed, or two manifests name the same model.
    """
    found: dict[str, StoredModel] = {}
    prefixes, listed = await manifest_prefixes(storage, prefix)
    for model_prefix in prefixes:
        stored = await read_stored(storage, model_prefix, signed=join_key(model_prefix, SIGNATURE_FILE) in listed)
        name = stored.manifest.name
        if name in found:
            raise ManifestError(f"two models named {name!r} under {storage.location}: "
                                f"{found[name].prefix!r} and {model_prefix!r}")
        found[name] = stored
    return found


async def discover_models(storage: StorageBackend, prefix: str = "") -> dict[str, tuple[str, Manifest]]:
    """Find every ``manifest.json`` under ``prefix``: ``{model name: (model dir prefix, manifest)}``.

    Raises:
        ManifestError: a manifest is malformed, or two manifests name the same model.
    """
    return {name: (m.prefix, m.manifest) for name, m in (await discover_stored(storage, prefix)).items()}


def _manifest(entry: object) -> Manifest | None:
    """The manifest of a catalog entry (a :class:`StoredModel`, a server's ``Hosted``, a (prefix, manifest) pair)."""
    found = getattr(entry, "manifest", None)
    if found is None and isinstance(entry, tuple) and len(entry) == 2:
        found = entry[1]
    return found if isinstance(found, Manifest) else None


def pick_model(models: dict[str, object], name: str | None, where: str) -> str:
    """Resolve a requested model name against the hosted ones (``{name: entry with a manifest}``).

    ``name`` may be the model's name, the source id recorded when it was chunked (the hub id or absolute
    path given to the chunker), or, when only one model answers to it, a base name: the last component of
    a path or ``org/name`` hub id, a GGUF file's name with or without its quantization tag
    (:func:`~streaming_weights.format.modelnames.aliases`). ``None`` picks the only hosted model.

    Raises:
        NotFoundError: ``name`` names no hosted model, names several (the message lists them), or it is
            None and several models are hosted.
    """
    if name is None:
        if len(models) == 1:
            return next(iter(models))
        raise NotFoundError(f"{where} hosts {len(models)} models; pass model_name= one of {sorted(models)}")
    if name in models:
        return name
    manifests = {key: _manifest(entry) for key, entry in models.items()}
    by_source = sorted(k for k, m in manifests.items() if m is not None and m.source and m.source == name.rstrip("/"))
    wanted = requested_bases(name)
    by_base = by_source or sorted(k for k, m in manifests.items()
                                  if wanted & (aliases(m.name, m.source) if m is not None else {k}))
    if len(by_base) == 1:
        return by_base[0]
    if by_base:
        raise NotFoundError(f"{name!r} is ambiguous on {where}: it may name any of {by_base}; pass the exact "
                            "model name")
    raise NotFoundError(f"{where} does not host model {name!r}; it hosts {sorted(models)}")


__all__ = ["StoredModel", "discover_models", "discover_stored", "manifest_prefixes", "pick_model", "read_stored"]
