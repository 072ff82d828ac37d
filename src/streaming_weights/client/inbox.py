"""Routes the frame reader's events to the client's in-flight requests (no I/O).

:class:`Inbox` turns :mod:`streaming_weights.protocol.frames` events into protocol messages: it points
the reader at a 16-byte header buffer when a message starts, then, for a DATA message, at the exact
slice of the request's receive buffer its offset names, so payload bytes land where they belong with no
copy. RESULT/ERROR bodies are small JSON and are collected from scratch. Bytes for requests nobody waits
for any more (cancelled, timed out) are discarded.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Iterable

from .. import protocol as proto
from ..exceptions import IntegrityError, ProtocolError
from ..format.manifest import LIMITS
from ..protocol import frames

logger = logging.getLogger("streaming_weights.client.transport")

#: A reply of unknown size (a manifest, its signature) announcing more than the manifest limit is refused
#: before it is received: a hostile server cannot make us allocate it.
MAX_UNSIZED_BLOB = LIMITS.max_manifest_bytes
#: Received bytes are hashed in pieces of this size, each while it is still in the core's 2 MiB L2 cache:
#: client CPU per 128 MiB fetch (pinned, loaded box, two rounds) 67/81 ms with 1 MiB pieces, 84/86 ms with
#: 4 MiB, 86/82 ms with 16 MiB (issue 26).
_HASH_BATCH = 1 << 20


def usable_cpus() -> int:
    """CPUs the calling thread may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class Pending:
    """One in-flight request: where its blob goes and how much of it arrived."""

    request_id: int
    op: proto.Op
    future: asyncio.Future | None
    expected_size: int | None = None  # units: the manifest's size; others: announced by RESULT
    buffer: bytearray | None = None
    view: memoryview | None = None
    size: int | None = None
    received: int = 0
    body: dict[str, Any] = field(default_factory=dict)
    # The unit's verifier (BLAKE3, or its fingerprint: ``fingerprint.Verifier``) fed the received prefix while
    # bytes keep arriving, so verification overlaps the transfer instead of following it: on a worker thread
    # (``hash_pool``), or inline when it is None.
    hasher: Any = None
    hashed: int = 0
    hash_future: concurrent.futures.Future | None = None
    hash_pool: concurrent.futures.Executor | None = None

    def feed_hash(self, final: bool) -> None:
        if self.hasher is None or self.buffer is None:
            return
        if self.received - self.hashed >= _HASH_BATCH or (final and self.received > self.hashed):
            piece = memoryview(self.buffer)[self.hashed : self.received]
            if self.hash_pool is None:
                self.hasher.update(piece)  # here, right after the bytes landed (see WebSocketSource)
            else:
                self.hash_future = self.hash_pool.submit(self.hasher.update, piece)
            self.hashed = self.received

    def fail(self, exc: BaseException) -> None:
        if self.future is not None and not self.future.done():
            self.future.set_exception(exc)

    def finish(self) -> None:
        # The result is None, not ``self``: until the awaiting task next suspends, asyncio's wake-up
        # handle keeps the future alive, and a result pointing here would keep the unit buffer alive
        # with it (a buffer given back to the pool in that step was refused, and the next fetch
        # faulted a fresh one in).
        if self.future is not None and not self.future.done():
            self.future.set_result(None)


class Phase(enum.Enum):
    IDLE = "idle"  # between messages
    HEADER = "header"  # reading the 16-byte protocol header
    DATA = "data"  # DATA payload landing in a request's buffer
    FULL = "full"  # that buffer is full: any further payload overruns the blob
    DISCARD = "discard"  # DATA nobody waits for
    BODY = "body"  # a RESULT/ERROR JSON body


class Inbox:
    """Message-level state of one connection, fed with the events of its :class:`~frames.FrameReader`."""

    def __init__(self, reader: frames.FrameReader) -> None:
        self.reader = reader
        self.pending: dict[int, Pending] = {}
        self.phase = Phase.IDLE
        self._app = bytearray(proto.HEADER_SIZE)
        self._body = bytearray()
        self._target: Pending | None = None

    def handle(self, events: Iterable[frames.Event]) -> list[frames.Event]:
        """Consume data-message events; return the control events (ping, pong, close) for the connection.

        Raises:
            ProtocolError: a malformed or unexpected message (the connection must be dropped).
        """
        control: list[frames.Event] = []
        for ev in events:
            if isinstance(ev, frames.Payload):
                self._payload(ev.data)
            elif isinstance(ev, frames.DestinationFilled):
                self._filled()
            elif isinstance(ev, frames.MessageStart):
                if ev.opcode is not frames.Opcode.BINARY:
                    raise ProtocolError("the server sent a text message; protocol v1 is binary only")
                self.phase = Phase.HEADER
                self.reader.direct(memoryview(self._app))
            elif isinstance(ev, frames.MessageEnd):
                self._message_end()
            else:
                control.append(ev)
        return control

    def forget(self, request_id: int) -> Pending | None:
        """Stop receiving for ``request_id`` (cancelled, timed out): its remaining bytes are discarded, and
        none lands in its buffer any more. Returns the request if it was still pending."""
        p = self.pending.pop(request_id, None)
        if p is not None and self._target is p:
            self._target, self.phase = None, Phase.DISCARD
            if self.reader.in_message:
                self.reader.direct(None)
        return p

    def fail_all(self, exc: BaseException) -> None:
        for p in list(self.pending.values()):
            p.fail(exc)
        self.pending.clear()

    # ---------------------------------------------------------------------------------- events
    def _payload(self, data: memoryview) -> None:
        if self.phase is Phase.DATA and self._target is not None:
            t = self._target
            t.received += len(data)
            done = t.received == t.size
            t.feed_hash(final=done)
            if done:
                self._complete(t)
        elif self.phase is Phase.BODY:
            if len(self._body) + len(data) > proto.MAX_JSON_BODY:
                raise ProtocolError(f"message body exceeds {proto.MAX_JSON_BODY} bytes")
            self._body += data
        elif self.phase is Phase.FULL:
            t = self._target
            raise ProtocolError(f"DATA for request {t.request_id if t else '?'} overruns its {t.size if t else '?'}-byte blob")

    def _filled(self) -> None:
        if self.phase is Phase.HEADER:
            self._header_done()
        elif self.phase is Phase.DATA:
            self.phase = Phase.FULL

    def _header_done(self) -> None:
        kind, rid, offset = proto.parse_header(self._app)
        self._body = bytearray()
        self._target = None
        if kind is not proto.Kind.DATA:
            if offset:
                raise ProtocolError(f"{kind.name} message with a non-zero offset")
            self.phase = Phase.BODY
            return
        p = self.pending.get(rid)
        if p is None:
            self.phase = Phase.DISCARD  # a cancelled or timed-out request: discard its bytes
            return
        if p.view is None or p.size is None:
            raise ProtocolError(f"DATA for request {rid} before its RESULT")
        if offset != p.received:
            raise ProtocolError(f"DATA for request {rid} at offset {offset}, expected {p.received}")
        self._target, self.phase = p, Phase.DATA
        self.reader.direct(p.view[offset:])

    def _message_end(self) -> None:
        phase, self.phase, self._target = self.phase, Phase.IDLE, None
        if phase is Phase.HEADER:
            raise ProtocolError("message shorter than the protocol header")
        if phase is Phase.BODY:
            body, self._body = self._body, bytearray()
            self._dispatch(proto.decode(bytes(self._app) + body))

    def _dispatch(self, msg: proto.Message) -> None:
        p = self.pending.get(msg.request_id)
        if isinstance(msg, proto.Error):
            if p is not None:
                self.pending.pop(msg.request_id, None)
                p.fail(msg.to_exception())
            elif msg.request_id == 0:
                logger.warning("weight server reported: %s: %s", msg.code, msg.message)
            return
        if not isinstance(msg, proto.Result):
            raise ProtocolError(f"unexpected {type(msg).__name__} message from the server")
        if p is not None:
            self._result(p, msg)

    def _result(self, p: Pending, msg: proto.Result) -> None:
        if p.op not in proto.BLOB_OPS:
            p.body = msg.body
            self._complete(p)
            return
        size = msg.size
        if size is None:
            raise ProtocolError(f"RESULT for {p.op.value} lacks a valid 'size'")
        if p.expected_size is not None and size != p.expected_size:
            self.pending.pop(p.request_id, None)
            p.fail(IntegrityError(f"server announced {size} bytes, the manifest says {p.expected_size}"))
            return
        if p.buffer is None:
            if size > MAX_UNSIZED_BLOB:
                self.pending.pop(p.request_id, None)
                p.fail(ProtocolError(f"server announced a {size}-byte {p.op.value} response; refusing"))
                return
            p.buffer = bytearray(size)
        p.view, p.size = memoryview(p.buffer), size
        if size == 0:
            self._complete(p)

    def _complete(self, p: Pending) -> None:
        self.pending.pop(p.request_id, None)
        p.view = None
        p.finish()


__all__ = ["MAX_UNSIZED_BLOB", "Inbox", "Pending", "Phase", "usable_cpus"]
