"""Small helpers from the original project's API."""

from __future__ import annotations

import hashlib
import os


def calculate_chunk_hash(path: str | os.PathLike[str]) -> str:
    """sha256 hex digest of a file (the manifest's identity hash; same as ``sha256sum``)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
