"""Storage in a local directory (the default)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import threading
from pathlib import Path
from typing import Iterator

from ..exceptions import InvalidKeyError, KeyNotFoundError, StorageError
from .base import OnPiece, StorageBackend, normalize_key
from .fileread import read_file_into


_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux ``/proc``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    # Elsewhere the only way is to set it and put it back. 0o077 in the meantime errs on the private
    # side for a file another thread creates in that instant; the lock keeps our own writers out.
    with _umask_lock:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode ``open()`` would give a new file: ``0o666`` less the umask."""
    return 0o666 & ~current_umask()


class FilesystemBackend(StorageBackend):
    """Keys are paths under ``base_dir``; nothing outside it is ever read or written.

    Writes go to a temporary file in the same directory, are fsynced, then renamed over the target,
    so readers never see a partial object. Files get the mode any tool would create them with (0644
    under umask 022), so another account (a service running ``surfing serve``) can read them.
    """

    def __init__(self, base_dir: str | os.PathLike[str] = "./chunks") -> None:
        self.base_dir = Path(base_dir).expanduser().resolve()
        self.location = str(self.base_dir)

    def path(self, key: str) -> Path:
        p = (self.base_dir / normalize_key(key)).resolve()
        if p != self.base_dir and self.base_dir not in p.parents:
            raise InvalidKeyError(f"storage key {key!r} resolves outside {self.base_dir} (symlink?)")
        return p

    @contextlib.contextmanager
    def _reading(self, key: str) -> Iterator[None]:
        """Turn the OS's errors reading ``key`` into the storage error tree."""
        try:
            yield
        except FileNotFoundError:
            raise KeyNotFoundError(f"{key!r} not found in {self.base_dir}") from None
        except IsADirectoryError:
            raise KeyNotFoundError(f"{key!r} is a directory in {self.base_dir}") from None
        except OSError as exc:
            raise StorageError(f"cannot read {key!r} from {self.base_dir}: {exc}") from exc

    def _read(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        p = self.path(key)
        with self._reading(key), open(p, "rb", buffering=0) as f:
            if start:
                f.seek(start)
            return f.read() if length is None else f.read(length)

    def _write(self, key: str, data: bytes | bytearray | memoryview) -> None:
        p = self.path(key)
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
            try:
                os.fchmod(fd, default_file_mode())  # mkstemp's 0600 would hide the file from other users
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, p)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise StorageError(f"cannot write {key!r} to {self.base_dir}: {exc}") from exc

    def _list(self, prefix: str) -> list[str]:
        if not self.base_dir.is_dir():
            return []
        out = []
        for root, _dirs, files in os.walk(self.base_dir):
            for fn in files:
                if fn.startswith(".") and fn.endswith(".tmp"):
                    continue
                rel = os.path.relpath(os.path.join(root, fn), self.base_dir).replace(os.sep, "/")
                if rel.startswith(prefix):
                    out.append(rel)
        return sorted(out)

    async def load(self, key: str) -> bytes:
        return await asyncio.to_thread(self._read, key)

    async def read_range(self, key: str, start: int, length: int) -> bytes:
        return await asyncio.to_thread(self._read, key, start, length)

    async def read_into(self, key: str, buf: bytearray | memoryview, *, offset: int = 0,
                        on_piece: OnPiece | None = None) -> int:
        """Fill ``buf`` from ``offset`` at disk speed without filling the page cache (``O_DIRECT`` where
        the filesystem and ``buf``'s alignment allow, see :mod:`.fileread`); ``on_piece`` sees the bytes in
        order while later ones are still being read (a hash). Returns the bytes written."""
        return await asyncio.to_thread(self._read_into, key, memoryview(buf).cast("B"), offset, on_piece)

    def _read_into(self, key: str, view: memoryview, offset: int, on_piece: OnPiece | None) -> int:
        path = self.path(key)
        with self._reading(key):
            return read_file_into(path, view, offset, on_piece=on_piece)

    async def save(self, key: str, data: bytes | bytearray | memoryview) -> None:
        await asyncio.to_thread(self._write, key, data)

    async def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    async def size(self, key: str) -> int:
        try:
            return self.path(key).stat().st_size
        except FileNotFoundError:
            raise KeyNotFoundError(f"{key!r} not found in {self.base_dir}") from None

    async def list(self, prefix: str = "") -> list[str]:
        return await asyncio.to_thread(self._list, prefix)

    async def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)
