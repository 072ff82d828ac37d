"""Storage backends: where chunked models live.

Public surface: :class:`StorageBackend` (the interface), :class:`FilesystemBackend` (default),
:class:`MemoryBackend` (for tests), :class:`S3Backend` (``pip install surfing-weights[s3]``),
:func:`open_storage` which turns a location (path or ``s3://bucket/prefix``) into a backend, and
:func:`discover_models` / :func:`pick_model` (:mod:`.catalog`: which models a storage holds).
"""

from __future__ import annotations

from .base import StorageBackend, normalize_key
from .catalog import discover_models, pick_model
from .filesystem import FilesystemBackend
from .memory import MemoryBackend


def __getattr__(name: str):
    if name == "S3Backend":  # boto3 is optional
        from .s3 import S3Backend

        return S3Backend
    raise AttributeError(name)


def open_storage(location: str | StorageBackend) -> tuple[StorageBackend, str]:
    """Return (backend, prefix) for a location: a StorageBackend, a directory, or ``s3://bucket/prefix``."""
    if isinstance(location, StorageBackend):
        return location, ""
    if isinstance(location, str) and location.startswith("s3://"):
        from .s3 import S3Backend

        bucket, _, prefix = location[5:].partition("/")
        return S3Backend(bucket), prefix.strip("/")
    return FilesystemBackend(location), ""


__all__ = ["FilesystemBackend", "MemoryBackend", "S3Backend", "StorageBackend", "discover_models", "normalize_key",
           "open_storage", "pick_model"]
