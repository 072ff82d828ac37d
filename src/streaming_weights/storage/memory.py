"""An in-memory backend, shipped for tests and examples (like httpx's MockTransport)."""

from __future__ import annotations

from ..exceptions import KeyNotFoundError
from .base import StorageBackend, normalize_key


class MemoryBackend(StorageBackend):
    """A dict of immutable bytes. ``objects`` may be inspected or corrupted by tests."""

    def __init__(self, objects: dict[str, bytes] | None = None) -> None:
        self.objects: dict[str, bytes] = {normalize_key(k): bytes(v) for k, v in (objects or {}).items()}
        self.location = "memory"
        self.reads = 0

    def _get(self, key: str) -> bytes:
        try:
            return self.objects[normalize_key(key)]
        except KeyError:
            raise KeyNotFoundError(f"{key!r} not found in memory storage") from None

    async def load(self, key: str) -> bytes:
        self.reads += 1
        return self._get(key)

    async def read_range(self, key: str, start: int, length: int) -> bytes:
        self.reads += 1
        return self._get(key)[start : start + length]

    async def size(self, key: str) -> int:
        return len(self._get(key))

    async def save(self, key: str, data: bytes | bytearray | memoryview) -> None:
        self.objects[normalize_key(key)] = bytes(data)

    async def exists(self, key: str) -> bool:
        return normalize_key(key) in self.objects

    async def list(self, prefix: str = "") -> list[str]:
        return sorted(k for k in self.objects if k.startswith(prefix))

    async def delete(self, key: str) -> None:
        self.objects.pop(normalize_key(key), None)
