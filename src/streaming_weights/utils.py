"""Small helpers from the original project's API."""

from __future__ import annotations

import os

from .format.hashing import sha256_file


def calculate_chunk_hash(path: str | os.PathLike[str]) -> str:
    """sha256 hex digest of a file (the manifest's identity hash; same as ``sha256sum``)."""
    return sha256_file(path)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
