"""The server's byte-bounded LRU of blobs read from storage, with single-flight fills."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Awaitable, Callable


class ByteLRU:
    """Keep recently served blobs up to ``capacity_bytes``; concurrent misses on one key share one load.

    Objects larger than ``max_item_bytes`` are never cached (the server streams those from storage in
    pieces instead of holding them whole). ``capacity_bytes == 0`` disables caching.
    """

    def __init__(self, capacity_bytes: int, *, max_item_bytes: int | None = None) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"cache capacity must be >= 0, got {capacity_bytes}")
        self.capacity = capacity_bytes
        self.max_item_bytes = capacity_bytes if max_item_bytes is None else min(max_item_bytes, capacity_bytes)
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._loading: dict[str, asyncio.Future[bytes]] = {}
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def cacheable(self, size: int) -> bool:
        return 0 <= size <= self.max_item_bytes

    def get(self, key: str) -> bytes | None:
        data = self._items.get(key)
        if data is not None:
            self._items.move_to_end(key)
        return data

    def put(self, key: str, data: bytes) -> None:
        if not self.cacheable(len(data)):
            return
        old = self._items.pop(key, None)
        if old is not None:
            self.bytes -= len(old)
        while self._items and self.bytes + len(data) > self.capacity:
            _, evicted = self._items.popitem(last=False)
            self.bytes -= len(evicted)
            self.evictions += 1
        self._items[key] = data
        self.bytes += len(data)

    async def get_or_load(self, key: str, load: Callable[[], Awaitable[bytes]]) -> tuple[bytes, bool]:
        """Return (data, hit). On a miss, ``load`` runs once however many callers wait for ``key``."""
        while True:
            data = self.get(key)
            if data is not None:
                self.hits += 1
                return data, True
            pending = self._loading.get(key)
            if pending is None:
                break
            try:
                data = await asyncio.shield(pending)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if pending.cancelled() and task is not None and not task.cancelling():
                    continue  # the loading caller was cancelled, not us: load it ourselves
                raise
            self.hits += 1  # served without another storage read
            return data, True
        self.misses += 1
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._loading[key] = fut
        try:
            data = await load()
        except asyncio.CancelledError:
            fut.cancel()
            raise
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # mark retrieved: waiters (if any) re-raise it themselves
            raise
        finally:
            self._loading.pop(key, None)
        self.put(key, data)
        fut.set_result(data)
        return data, False

    def discard(self, keys: list[str]) -> None:
        """Forget ``keys`` (their objects changed in storage)."""
        for key in keys:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= len(old)

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0
