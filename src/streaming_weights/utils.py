"""Small helpers from the original project's API."""

from __future__ import annotations

import os

from .format.hashing import sha256_file


def calculate_chunk_hash(path: str | os.PathLike[str]) -> str:
    """sha256 hex digest of a file (the manifest's identity hash; same as ``sha256sum``)."""
    return sha256_file(path)

