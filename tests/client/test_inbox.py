"""The client's message router over the frame reader, fed crafted frames (no sockets)."""

from __future__ import annotations

import asyncio

import pytest

from streaming_weights import protocol as proto
from streaming_weights.exceptions import IntegrityError, NotFoundError, ProtocolError
from streaming_weights.protocol.frames import FrameReader, Opcode, Ping, encode_frame
from streaming_weights.client.inbox import Inbox, Pending


def frames_of(msg: bytes, pieces: int = 1) -> bytes:
    """One protocol message as ``pieces`` WebSocket frames (fragmented when > 1)."""
    step = max(1, -(-len(msg) // pieces))
    chunks = [msg[i : i + step] for i in range(0, len(msg), step)] or [b""]
    out = b""
    for i, c in enumerate(chunks):
        out += encode_frame(Opcode.BINARY if i == 0 else Opcode.CONT, c, fin=i == len(chunks) - 1)
    return out


def feed(inbox: Inbox, data: bytes, step: int = 3) -> list:
    control, pos = [], 0
    while pos < len(data):
        buf = inbox.reader.get_buffer(-1)
        n = min(len(buf), step, len(data) - pos)
        buf[:n] = data[pos : pos + n]
        pos += n
        control += inbox.handle(inbox.reader.buffer_updated(n))
    return control


async def pending(inbox: Inbox, rid: int, size: int | None, op=proto.Op.GET_UNIT) -> Pending:
    p = Pending(rid, op, asyncio.get_running_loop().create_future(), expected_size=size,
                buffer=bytearray(size) if size is not None else None)
    inbox.pending[rid] = p
    return p


async def test_blob_lands_in_the_request_buffer_across_fragments_and_interleaving():
    inbox = Inbox(FrameReader())
    a, b = await pending(inbox, 1, 40), await pending(inbox, 2, 10)
    blob_a, blob_b = bytes(range(40)), b"0123456789"
    wire = (frames_of(proto.encode(proto.Result(1, {"size": 40})))
            + frames_of(proto.encode(proto.Result(2, {"size": 10})), pieces=3)
            + frames_of(proto.encode_data(1, 0, blob_a[:25]), pieces=4)
            + encode_frame(Opcode.PING, b"p")
            + frames_of(proto.encode_data(2, 0, blob_b))
            + frames_of(proto.encode_data(1, 25, blob_a[25:]), pieces=2))
    assert feed(inbox, wire) == [Ping(b"p")]
    assert await a.future is None and await b.future is None  # the result never refers to the request
    assert a.buffer == blob_a and b.buffer == blob_b
    assert not inbox.pending


async def test_errors_results_and_discarded_bytes():
    inbox = Inbox(FrameReader())
    p = await pending(inbox, 1, 8)
    feed(inbox, frames_of(proto.encode(proto.Error(1, "not_found", "no such unit"))))
    with pytest.raises(NotFoundError, match="no such unit"):
        await p.future
    wrong = await pending(inbox, 2, 8)
    feed(inbox, frames_of(proto.encode(proto.Result(2, {"size": 9}))))
    with pytest.raises(IntegrityError, match="announced 9 bytes"):
        await wrong.future
    ping = await pending(inbox, 3, None, proto.Op.PING)
    feed(inbox, frames_of(proto.encode_data(99, 0, b"nobody waits")) + frames_of(proto.encode(proto.Result(3, {"pong": True}))))
    await ping.future
    assert ping.body == {"pong": True}


async def test_forgotten_request_gets_no_more_bytes():
    inbox = Inbox(FrameReader())
    p = await pending(inbox, 1, 20)
    first = frames_of(proto.encode(proto.Result(1, {"size": 20}))) + encode_frame(Opcode.BINARY, proto.encode_data(1, 0, b"A" * 10), fin=False)
    feed(inbox, first, step=len(first))
    assert inbox.forget(1) is p
    feed(inbox, encode_frame(Opcode.CONT, b"B" * 10) + frames_of(proto.encode_data(1, 10, b"C" * 10)))
    assert bytes(p.buffer) == b"A" * 10 + b"\0" * 10 and not p.future.done()


@pytest.mark.parametrize("wire,match", [
    (frames_of(proto.encode_data(1, 0, b"x")), "before its RESULT"),
    (frames_of(proto.encode(proto.Result(1, {"size": 4}))) + frames_of(proto.encode_data(1, 2, b"xx")), "expected 0"),
    (frames_of(proto.encode(proto.Result(1, {"size": 4}))) + frames_of(proto.encode_data(1, 0, b"xxxxx")), "overruns"),
    (frames_of(b"\x01\x03"), "shorter than the protocol header"),
    (encode_frame(Opcode.TEXT, b"hello"), "text message"),
    (frames_of(proto.encode(proto.Result(1, {}))), "lacks a valid 'size'"),
])
async def test_malformed_messages_raise(wire, match):
    inbox = Inbox(FrameReader())
    await pending(inbox, 1, 4)
    with pytest.raises(ProtocolError, match=match):
        feed(inbox, wire)
