"""Storage backends: where chunked models live.

Public surface: :class:`StorageBackend` (the interface), :class:`FilesystemBackend` (default),
:class:`MemoryBackend` (for tests), :class:`S3Backend` (``pip install surfing-weights[s3]``),
:func:`open_storage` which turns a location (path or ``s3://bucket/prefix``, reached with :class:`S3Options`)
into a backend, and
:func:`discover_models` / :func:`pick_model` (:mod:`.catalog`: which models a storage holds).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from .base import StorageBackend, normalize_key
from .catalog import discover_models, pick_model
from .filesystem import FilesystemBackend
from .layouts import present, register_layout
from .memory import MemoryBackend


def __getattr__(name: str):
    if name == "S3Backend":  # boto3 is optional
        from .s3 import S3Backend

        return S3Backend
    raise AttributeError(name)


@dataclass(frozen=True)
class S3Options:
    """How to reach an S3-compatible store (every field optional: boto3's defaults, environment and profiles
    fill the rest — ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``…).

    ``max_attempts``: botocore's attempts per request. Servers and the chunker keep botocore's retries (3); a
    client passes 1, because its own retry layer (``client.retry``) is the one that retries.
    """

    endpoint_url: str | None = None
    region_name: str | None = None
    aws_access_key_id: str | None = None
    aws_secret_access_key: str | None = None
    aws_session_token: str | None = None
    profile_name: str | None = None
    max_attempts: int = 3

    def backend(self, bucket: str, prefix: str = "") -> StorageBackend:
        from .s3 import S3Backend

        return S3Backend(bucket, prefix=prefix, **dataclasses.asdict(self))


def open_storage(location: str | os.PathLike[str] | StorageBackend,
                 s3: S3Options | None = None) -> tuple[StorageBackend, str]:
    """Return (backend, prefix) for a location: a StorageBackend, a directory, or ``s3://bucket/prefix``
    (reached with ``s3``, default :class:`S3Options()`). Every location a user names is opened here.

    A directory is presented through the storage layout adapters (:mod:`.layouts`): a folder of Hugging Face
    checkpoints reads as chunked models (served as they are, :mod:`streaming_weights.checkpoint`)."""
    if isinstance(location, StorageBackend):
        return location, ""
    location = os.fspath(location)
    if location.startswith("s3://"):
        bucket, _, prefix = location[5:].partition("/")
        return present((s3 or S3Options()).backend(bucket)), prefix.strip("/")
    return present(FilesystemBackend(location)), ""


__all__ = ["FilesystemBackend", "MemoryBackend", "S3Backend", "S3Options", "StorageBackend", "discover_models",
           "normalize_key", "open_storage", "pick_model", "register_layout"]
