"""How the weight server sends one blob as DATA messages: from memory, from a local file, or in ranged reads.

Three sources, one wire format (a RESULT announcing the size, then DATA messages of at most
``chunk_bytes`` in offset order):

* bytes in memory (the byte cache, a manifest): frames written with ``sendmsg`` straight from views of
  them (:class:`~.sending.DirectWriter`);
* a blob of a local chunk directory too big for the cache: ``sendfile`` from the file, so the kernel
  sends page-cache pages without a copy on the server's core (:meth:`~.sending.DirectWriter.write_file`);
* any other storage (S3, a checkpoint served on the fly, TLS connections to a local directory): ranged
  reads of ``chunk_bytes``, the next one read while the current one is sent.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from websockets.protocol import State

from .. import protocol as proto
from ..exceptions import InvalidKeyError, KeyNotFoundError, NotFoundError, RemoteError, StorageError
from ..format.manifest import BlobEntry
from ..protocol.frames import binary_frame_header
from ..storage.fileread import advise
from ..storage.filesystem import FilesystemBackend

if TYPE_CHECKING:
    from .server import WeightServer, _Conn


class BlobSender:
    """Sends blobs for ``server`` (its storage, cache, metrics, ``chunk_bytes`` and ``pacer``)."""

    def __init__(self, server: WeightServer) -> None:
        self.server = server

    async def send_data(self, conn: _Conn, rid: int, offset: int, piece: bytes | memoryview,
                        file: tuple[int, int] | None = None) -> None:
        """One DATA message as a single unmasked binary frame written straight to the socket: ``piece``,
        or (``file`` = (fd, length)) ``length`` bytes of that file from ``offset``.

        Equivalent to ``ws.send(proto.encode_data(...))`` on the wire, without its copies (header
        concatenation, frame serialization, the transport's buffer: see :mod:`.sending`). websockets'
        ``send_context`` still checks the connection state and applies flow control (drain) afterwards.
        """
        head = proto.encode_header(proto.Kind.DATA, rid, offset)
        size = file[1] if file is not None else len(piece)
        if self.server.pacer is not None:
            await self.server.pacer.take(len(head) + size)
        async with conn.send_lock:
            ws = conn.ws
            if file is not None and (ws.send_in_progress is not None or conn.writer is None):
                piece, file = os.pread(file[0], size, offset), None
            if ws.send_in_progress is not None or conn.writer is None:  # never the case here; keep websockets' invariants
                await ws.send(head + piece)
                return
            is_open = lambda: ws.protocol.state is State.OPEN  # noqa: E731
            async with ws.send_context():
                frame_head = binary_frame_header(len(head) + size) + head
                if file is None:
                    await conn.writer.write((frame_head, piece), is_open)
                else:
                    await conn.writer.write_file(frame_head, file[0], offset, size, is_open)
        self.server.metrics.bytes_sent.inc(size)

    async def send_bytes(self, conn: _Conn, rid: int, data: bytes) -> None:
        await self.server._send(conn, proto.encode(proto.Result(rid, {"size": len(data)})))
        view = memoryview(data)
        for off in range(0, len(data), self.server.chunk_bytes):
            await self.send_data(conn, rid, off, view[off : off + self.server.chunk_bytes])

    async def send_blob(self, conn: _Conn, rid: int, model: str, entry: BlobEntry, key: str) -> None:
        server = self.server
        if server.cache.cacheable(entry.bytes):
            data, hit = await server.cache.get_or_load(key, lambda: self.read(model, entry, key, 0, entry.bytes))
            (server.metrics.cache_hits if hit else server.metrics.cache_misses).inc()
            server.metrics.cache_bytes.set(server.cache.bytes)
            await self.send_bytes(conn, rid, data)
            return
        path = self._local_path(key)
        if path is not None and conn.writer is not None and conn.writer.direct:
            await self._send_file(conn, rid, model, entry, path)
        else:
            await self._send_ranges(conn, rid, model, entry, key)

    def _local_path(self, key: str) -> Path | None:
        storage = self.server.storage
        if not isinstance(storage, FilesystemBackend):
            return None
        try:
            return storage.path(key)
        except InvalidKeyError:
            return None  # the ranged read reports it

    async def _send_file(self, conn: _Conn, rid: int, model: str, entry: BlobEntry, path: Path) -> None:
        """Too big for the cache, in a local directory: ``sendfile`` it one DATA message at a time."""
        try:
            f = open(path, "rb", buffering=0)
        except FileNotFoundError:
            raise NotFoundError(f"{entry.path} of model {model!r} is listed in the manifest but missing from storage") from None
        except OSError as exc:
            raise RemoteError(f"storage error reading {entry.path}: {exc}", code="internal") from exc
        with f:
            fd = f.fileno()
            if os.fstat(fd).st_size < entry.bytes:
                raise RemoteError(f"{entry.path} in storage is shorter than the manifest's {entry.bytes} bytes (truncated?)", code="internal")
            advise(fd, 0, 0, "POSIX_FADV_SEQUENTIAL")
            self._count_read(model, entry, entry.bytes)
            await self.server._send(conn, proto.encode(proto.Result(rid, {"size": entry.bytes})))
            step = self.server.chunk_bytes
            for off in range(0, entry.bytes, step):
                # sendfile runs on the event loop: have the kernel read the next pieces in the background
                # meanwhile, so it finds them cached rather than waiting for the disk on the loop.
                advise(fd, off + step, 2 * step, "POSIX_FADV_WILLNEED")
                await self.send_data(conn, rid, off, b"", file=(fd, min(step, entry.bytes - off)))

    async def _send_ranges(self, conn: _Conn, rid: int, model: str, entry: BlobEntry, key: str) -> None:
        """Stream in ranged reads; read-ahead of one chunk overlaps storage latency with the send while
        holding at most two chunks for this request."""
        size, step = entry.bytes, self.server.chunk_bytes
        first = await self.read(model, entry, key, 0, min(step, size)) if size else b""
        await self.server._send(conn, proto.encode(proto.Result(rid, {"size": size})))
        off, piece = 0, first
        while off < size:
            nxt = off + len(piece)
            ahead = asyncio.ensure_future(self.read(model, entry, key, nxt, min(step, size - nxt))) if nxt < size else None
            try:
                await self.send_data(conn, rid, off, piece)
                piece = await ahead if ahead is not None else b""
            except BaseException:
                if ahead is not None:
                    ahead.cancel()
                raise
            off = nxt

    async def read(self, model: str, entry: BlobEntry, key: str, start: int, length: int) -> bytes:
        try:
            data = await self.server.storage.read_range(key, start, length)
        except KeyNotFoundError:
            raise NotFoundError(f"{entry.path} of model {model!r} is listed in the manifest but missing from storage") from None
        except StorageError as exc:
            raise RemoteError(f"storage error reading {entry.path}: {exc}", code="internal") from exc
        self._count_read(model, entry, len(data))
        if len(data) != length:
            raise RemoteError(f"{entry.path} in storage is shorter than the manifest's {entry.bytes} bytes (truncated?)", code="internal")
        return data

    def _count_read(self, model: str, entry: BlobEntry, nbytes: int) -> None:
        metrics: Any = self.server.metrics
        metrics.storage_reads.labels(model, entry.path).inc()
        metrics.storage_read_bytes.labels(model, entry.path).inc(nbytes)


__all__ = ["BlobSender"]
