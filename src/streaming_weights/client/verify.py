"""Integrity checks every source applies before it hands out bytes: size and BLAKE3 against the manifest."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..exceptions import IntegrityError, UnitFormatError
from ..format import UnitEntry, blake3_hex, decode_unit
from ..format.manifest import BlobEntry

if TYPE_CHECKING:
    import torch


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


__all__ = ["check_blake3", "decode_verified", "verify_and_decode", "verify_blob"]
