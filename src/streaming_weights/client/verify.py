"""Checks every source applies before it hands out bytes: the manifest against the trusted keys / pin
(:func:`trusted_manifest`), then every unit's and file's size and BLAKE3 against that manifest."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..exceptions import (
    IntegrityError,
    KeyNotFoundError,
    ManifestError,
    ModelChangedError,
    NotFoundError,
    RemoteError,
    StreamingWeightsError,
    UnitFormatError,
)
from ..format import Manifest, UnitEntry, blake3_hex, decode_unit
from ..format.manifest import BlobEntry

if TYPE_CHECKING:
    import torch

    from ..format.signing import TrustPolicy
    from .base import UnitSource


def trusted_manifest(data: bytes | bytearray | memoryview, signature: bytes | None, trust: TrustPolicy | None,
                     where: str) -> Manifest:
    """The manifest in ``data`` from ``where``, checked against ``trust`` BEFORE it is parsed or used.

    Raises:
        SignatureError: ``trust`` is set and the bytes are unsigned, wrongly signed, or not the pinned ones.
        ManifestError / ManifestLimitError: the bytes are not a manifest within the limits.
    """
    if trust is not None:
        trust.check(data, signature, where)
    return Manifest.from_bytes(data)


def check_blake3(entry: BlobEntry, hexdigest: str, where: str) -> None:
    """Raise IntegrityError unless ``hexdigest`` is the manifest's BLAKE3 of ``entry``."""
    if hexdigest != entry.blake3:
        raise IntegrityError(
            f"{entry.path} from {where} does not match its manifest hash (corrupted in storage or in transit); "
            "re-chunk the model or check the server's storage"
        )


def verify_blob(entry: BlobEntry, buf: bytes | bytearray | memoryview, where: str) -> None:
    """Raise IntegrityError unless ``buf`` is exactly the manifest's object."""
    if len(buf) != entry.bytes:
        raise IntegrityError(f"{entry.path} from {where}: got {len(buf)} bytes, manifest says {entry.bytes}")
    check_blake3(entry, blake3_hex(buf), where)


def decode_verified(entry: UnitEntry, buf: bytearray, where: str) -> dict[str, torch.Tensor]:
    """Zero-copy decode of a unit whose bytes were already checked against ``entry``'s hash."""
    try:
        return decode_unit(buf, entry.tensors)
    except UnitFormatError as exc:
        raise UnitFormatError(f"{entry.path} from {where}: {exc}") from exc


def verify_and_decode(entry: UnitEntry, buf: bytearray, where: str) -> dict[str, torch.Tensor]:
    """:func:`verify_blob` then :func:`decode_verified` (raises IntegrityError / UnitFormatError)."""
    verify_blob(entry, buf, where)
    return decode_verified(entry, buf, where)


def may_be_stale(exc: BaseException) -> bool:
    """Whether a unit fetch that raised ``exc`` may have met a model re-chunked since its manifest was loaded
    (bytes that do not match it, a unit that is gone, a stored object of another size)."""
    if isinstance(exc, (IntegrityError, UnitFormatError, NotFoundError, KeyNotFoundError)):
        return not isinstance(exc, ModelChangedError)
    return isinstance(exc, RemoteError) and exc.code == "internal"


async def check_unchanged(source: UnitSource, manifest: Manifest, unit: str, exc: BaseException) -> None:
    """After a unit fetch from ``source`` failed with ``exc``: raise :class:`ModelChangedError` (from
    ``exc``) if the model's current manifest there no longer lists ``unit`` as ``manifest`` does, i.e. the
    model was re-chunked since ``manifest`` was loaded. Returns when it did not change, or when the current
    manifest cannot be had (the original error then stands)."""
    if not may_be_stale(exc):
        return
    try:
        current = await source.get_manifest(manifest.name)
    except StreamingWeightsError:
        return
    held = manifest.unit(unit)
    try:
        now: UnitEntry | None = current.unit(unit)
    except ManifestError:
        now = None
    if now is not None and (now.bytes, now.blake3) == (held.bytes, held.blake3):
        return
    what = (f"unit {unit!r} is now {now.bytes} bytes with BLAKE3 {now.blake3[:16]}…, the loaded manifest says "
            f"{held.bytes} bytes with {held.blake3[:16]}…" if now is not None else f"unit {unit!r} is no longer part of it")
    raise ModelChangedError(
        f"model {manifest.name!r} was re-chunked at {source.location} after this client loaded its manifest "
        f"({what}); load the model again (a new model object, or run the command again) to use the new weights"
    ) from exc


__all__ = ["check_blake3", "check_unchanged", "may_be_stale", "decode_verified", "trusted_manifest", "verify_and_decode", "verify_blob"]
