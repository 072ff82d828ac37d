"""A checkpoint folder's files, local or in a storage (``s3://bucket/prefix``): the few blocking operations a
served-as-is checkpoint needs (list, check, fingerprint, read, read a range, open as a chunker source).

Called from worker threads. :class:`StoredFiles` runs the storage's coroutines on the event loop that called
into the checkpoint storage (:data:`CALLER_LOOP`, set by :func:`in_thread`; that loop is free while it waits).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from ..exceptions import CheckpointError, StorageError
from ..format.names import join_key
from .index import fingerprint, stat_print
from .layout import CONFIG_FILE, OTHER_WEIGHTS, checkpoint_files

_MAX_HEADER = 100 << 20

#: the event loop a worker thread's storage calls run on (``asyncio.to_thread`` copies it into the worker)
CALLER_LOOP: ContextVar[asyncio.AbstractEventLoop] = ContextVar("checkpoint_caller_loop")


async def in_thread(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` in a worker thread that may read a stored checkpoint through this loop."""
    CALLER_LOOP.set(asyncio.get_running_loop())
    return await asyncio.to_thread(fn, *args)


class LocalFiles:
    """The files of a local checkpoint folder."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder).resolve()
        self.location = str(self.folder)

    def names(self) -> list[str]:
        return checkpoint_files(self.folder)

    def stats(self, names: list[str]) -> dict[str, tuple[int, int]]:
        return stat_print(self.folder, names)

    def prints(self, names: list[str]) -> dict[str, list[Any]]:
        return fingerprint(self.folder, names)

    def read(self, name: str) -> bytes | None:
        path = self.folder / name
        return path.read_bytes() if path.is_file() else None

    def pread(self, ref: Any, offset: int, length: int) -> bytes:
        with open(self.folder / ref, "rb", buffering=0) as fh:  # a name in the folder (or an absolute path)
            return os.pread(fh.fileno(), length, offset)

    def open_source(self) -> Any:
        from ..chunker.readers import open_source

        return open_source(self.folder)


class StoredFiles:
    """The files under ``prefix`` of a storage (S3), read by range. A file's fingerprint is its size and header
    hash (object stores keep no mtime a client can rely on); the cheap check before a read (listing and sizes) is
    made at most once per ``recheck`` seconds."""

    def __init__(self, storage: Any, prefix: str, *, recheck: float = 2.0) -> None:
        self.storage, self.prefix, self.recheck = storage, prefix.strip("/"), recheck
        self.location = f"{storage.location}/{self.prefix}".rstrip("/")
        self._checked: tuple[float, list[str], dict[str, tuple[int, int]]] | None = None
        self._listed: tuple[float, list[str]] | None = None

    def _run(self, coro: Any) -> Any:
        try:
            return asyncio.run_coroutine_threadsafe(coro, CALLER_LOOP.get()).result()
        except StorageError as exc:
            raise CheckpointError(f"cannot read {self.location}: {exc}") from exc

    def _key(self, name: str) -> str:
        return join_key(self.prefix, name)

    def names(self) -> list[str]:
        now = time.monotonic()
        if self._listed is not None and now - self._listed[0] < self.recheck:
            return self._listed[1]
        keys = self._run(self.storage.list(self.prefix + "/" if self.prefix else ""))
        out = []
        for key in keys:
            rel = key[len(self.prefix) + 1:] if self.prefix else key
            head, _, tail = rel.partition("/")
            if not tail and not head.startswith(".") and not head.endswith(OTHER_WEIGHTS):
                out.append(head)
            elif tail == CONFIG_FILE:
                out.append(rel)
        self._listed = (now, sorted(out))
        return self._listed[1]

    def stats(self, names: list[str]) -> dict[str, tuple[int, int]]:
        now = time.monotonic()
        if self._checked is not None and self._checked[1] == names and now - self._checked[0] < self.recheck:
            return self._checked[2]
        sizes = {n: (self._run(self.storage.size(self._key(n))), 0) for n in names}
        self._checked = (now, list(names), sizes)
        return sizes

    def prints(self, names: list[str]) -> dict[str, list[Any]]:
        out = {}
        for name in sorted(names):
            size = self._run(self.storage.size(self._key(name)))
            if not name.endswith(".safetensors"):
                out[name] = [size, 0, hashlib.sha256(self.read(name) or b"").hexdigest()]
                continue
            head = self.pread(name, 0, 8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 0 or n > min(_MAX_HEADER, size - 8):
                raise CheckpointError(f"{self.location}/{name} is not a safetensors file (its header length runs "
                                      "past the file: truncated or corrupted); upload the checkpoint again")
            out[name] = [size, 0, hashlib.sha256(head + self.pread(name, 8, n)).hexdigest()]
        self._checked = (time.monotonic(), sorted(names), {n: (p[0], 0) for n, p in out.items()})
        return out

    def read(self, name: str) -> bytes | None:
        from ..exceptions import KeyNotFoundError

        try:
            return bytes(asyncio.run_coroutine_threadsafe(self.storage.load(self._key(name)), CALLER_LOOP.get()).result())
        except KeyNotFoundError:
            return None
        except StorageError as exc:
            raise CheckpointError(f"cannot read {self.location}/{name}: {exc}") from exc

    def pread(self, ref: Any, offset: int, length: int) -> bytes:
        return bytes(self._run(self.storage.read_range(self._key(ref), offset, length)))

    def open_source(self) -> Any:
        from .remote import StoredSafetensorsSource

        return StoredSafetensorsSource(self)


__all__ = ["CALLER_LOOP", "LocalFiles", "StoredFiles", "in_thread"]
