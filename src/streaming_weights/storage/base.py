"""The storage interface every backend implements (the original docs' async API plus ranges and sizes)."""

from __future__ import annotations

import asyncio
import posixpath
from abc import ABC, abstractmethod
from collections.abc import Callable

from ..exceptions import InvalidKeyError


def normalize_key(key: str) -> str:
    """Validate a storage key (``model/units/x.safetensors``) and return it normalized.

    Keys are relative, '/'-separated and may not escape the backend's root.

    Raises:
        InvalidKeyError: absolute, empty, backslashes, NUL, or any '..' component.
    """
    if not isinstance(key, str) or not key or "\x00" in key or "\\" in key:
        raise InvalidKeyError(f"invalid storage key {key!r}")
    if key.startswith("/") or any(part in ("..",) for part in key.split("/")):
        raise InvalidKeyError(f"storage key {key!r} escapes the storage root")
    norm = posixpath.normpath(key)
    if norm in (".", "") or norm.startswith("../"):
        raise InvalidKeyError(f"storage key {key!r} escapes the storage root")
    return norm


#: Called with each piece of an object's bytes as it lands, in order (see :meth:`StorageBackend.read_into`).
OnPiece = Callable[[memoryview], object]


async def whole_piece(on_piece: OnPiece | None, buf: bytearray | memoryview, n: int) -> None:
    """Hand ``on_piece`` the first ``n`` bytes of ``buf`` at once, on a worker thread (a hash of a large object
    must not hold up the event loop's other reads)."""
    if on_piece is not None and n:
        await asyncio.to_thread(on_piece, memoryview(buf).cast("B")[:n])


class StorageBackend(ABC):
    """Where chunked models live. All methods are coroutines; keys are relative '/' paths.

    Implementations: :class:`FilesystemBackend`, :class:`MemoryBackend`, :class:`S3Backend`.
    ``save`` must be atomic: a reader sees the old object, the new one, or nothing — never a partial one.
    """

    #: A short description for logs and errors.
    location: str = ""

    @abstractmethod
    async def load(self, key: str) -> bytes:
        """Return the whole object. Raises KeyNotFoundError."""

    @abstractmethod
    async def save(self, key: str, data: bytes | bytearray | memoryview) -> None:
        """Write the object atomically, replacing any previous one."""

    @abstractmethod
    async def exists(self, key: str) -> bool: ...

    @abstractmethod
    async def list(self, prefix: str = "") -> list[str]:
        """All keys starting with ``prefix``, sorted."""

    async def size(self, key: str) -> int:
        return len(await self.load(key))

    async def read_range(self, key: str, start: int, length: int) -> bytes:
        """``length`` bytes from ``start`` (fewer at the end of the object). Backends override this."""
        data = await self.load(key)
        return data[start : start + length]

    async def read_into(self, key: str, buf: bytearray | memoryview, *, offset: int = 0,
                        on_piece: OnPiece | None = None) -> int:
        """Fill ``buf`` with the object's bytes from ``offset``; returns the number of bytes written.

        ``on_piece`` (a hash) sees the bytes written, in order: a backend that reads in order calls it on each
        piece while later ones are still being read; one that does not (this default, ranged reads in parallel)
        calls it once with all of them (:func:`whole_piece`)."""
        data = await self.read_range(key, offset, len(buf))
        memoryview(buf)[: len(data)] = data
        await whole_piece(on_piece, buf, len(data))
        return len(data)

    async def delete(self, key: str) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        """Release connections/pools. Safe to call more than once."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.location!r})"
