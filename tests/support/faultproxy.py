"""A loopback TCP proxy that injects faults between a client and a server, for reliability tests.

It runs its own asyncio loop on a daemon thread, so synchronous tests (and the client library, which
has its own I/O thread) can use it directly::

    with FaultProxy(upstream_port) as proxy:         # listens on 127.0.0.1:proxy.port
        proxy.cut_after(8 << 20)                     # next connection: drop after 8 MiB server->client
        proxy.corrupt_at(5 << 20)                    # flip one byte at that server->client offset
        proxy.delay = 2.0                            # hold every server->client chunk this long
        proxy.pause()  / proxy.resume()              # stop / restart relaying server->client bytes
        proxy.on_bytes(8 << 20, callback)            # call callback() once that many bytes were relayed

Offsets count server->client bytes over the proxy's whole life (``proxy.relayed``), across connections,
so a test can say "kill the server 8 MiB into the stream" without knowing how connections are reused.
A fault armed with ``cut_after``/``corrupt_at`` fires once. If the upstream refuses a connection, the
client side is closed at once (as if the server were down).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Callable


class FaultProxy:
    def __init__(self, upstream_port: int, *, upstream_host: str = "127.0.0.1", chunk: int = 64 * 1024) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.chunk = chunk
        self.port = 0
        self.relayed = 0  # server->client bytes forwarded so far (all connections)
        self.connections = 0
        self.refused = 0
        self.cuts = 0
        self.corruptions = 0
        self.delay = 0.0
        self._cut_at: int | None = None
        self._corrupt_at: int | None = None
        self._triggers: list[tuple[int, Callable[[], None]]] = []
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._running = asyncio.Event()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------- control
    def cut_after(self, nbytes_from_now: int) -> None:
        """Abort the connection that carries the server->client byte ``relayed + nbytes_from_now``."""
        with self._lock:
            self._cut_at = self.relayed + nbytes_from_now

    def corrupt_at(self, nbytes_from_now: int) -> None:
        """XOR 0xFF into the server->client byte ``relayed + nbytes_from_now`` (once)."""
        with self._lock:
            self._corrupt_at = self.relayed + nbytes_from_now

    def on_bytes(self, nbytes_from_now: int, callback: Callable[[], None]) -> None:
        """Call ``callback()`` (on the proxy thread) once ``nbytes_from_now`` more bytes were relayed;
        relaying of the chunk that crossed the mark is held until the callback returns."""
        with self._lock:
            self._triggers.append((self.relayed + nbytes_from_now, callback))

    def pause(self) -> None:
        self._loop.call_soon_threadsafe(self._running.clear)

    def resume(self) -> None:
        self._loop.call_soon_threadsafe(self._running.set)

    def drop_all(self) -> None:
        """Abort every open connection now."""
        def go() -> None:
            for w in list(self._writers):
                w.transport.abort()
        self._loop.call_soon_threadsafe(go)

    # ------------------------------------------------------------------------------------ lifecycle
    def start(self) -> FaultProxy:
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        self.port = fut.result(10)
        return self

    async def _start(self) -> int:
        self._running.set()
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return self._server.sockets[0].getsockname()[1]

    def close(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            for w in list(self._writers):
                w.transport.abort()
        try:
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------------- relaying
    async def _client(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            sreader, swriter = await asyncio.open_connection(*self.upstream)
        except OSError:
            self.refused += 1
            cwriter.transport.abort()
            return
        self._writers.update((cwriter, swriter))
        up = asyncio.ensure_future(self._pump(creader, swriter, downstream=False))
        down = asyncio.ensure_future(self._pump(sreader, cwriter, downstream=True))
        try:
            await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (up, down):
                t.cancel()
            for w in (cwriter, swriter):
                self._writers.discard(w)
                w.transport.abort()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, downstream: bool) -> None:
        while True:
            data = await reader.read(self.chunk)
            if not data:
                return
            if downstream:
                await self._running.wait()
                if self.delay:
                    await asyncio.sleep(self.delay)
                data, cut = self._apply_faults(data)
                writer.write(data)
                await writer.drain()
                if cut:
                    self.cuts += 1
                    writer.transport.abort()
                    return
            else:
                writer.write(data)
                await writer.drain()

    def _apply_faults(self, data: bytes) -> tuple[bytes, bool]:
        with self._lock:
            start, end = self.relayed, self.relayed + len(data)
            cut = False
            if self._cut_at is not None and start <= self._cut_at < end:
                data = data[: self._cut_at - start]
                end = self._cut_at
                self._cut_at = None
                cut = True
            if self._corrupt_at is not None and start <= self._corrupt_at < end:
                buf = bytearray(data)
                buf[self._corrupt_at - start] ^= 0xFF
                data = bytes(buf)
                self._corrupt_at = None
                self.corruptions += 1
            self.relayed = end
            fire = [cb for at, cb in self._triggers if at < end]
            self._triggers = [(at, cb) for at, cb in self._triggers if at >= end]
        for cb in fire:
            cb()
        return data, cut


__all__ = ["FaultProxy"]
