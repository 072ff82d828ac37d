"""The sans-I/O frame reader, fed crafted bytes: lengths, fragments, control frames, violations, byte-at-a-time."""

from __future__ import annotations

import struct

import pytest

from streaming_weights.exceptions import ProtocolError
from streaming_weights.protocol import frames
from streaming_weights.protocol.frames import (
    Close,
    DestinationFilled,
    FrameReader,
    MessageEnd,
    MessageStart,
    Opcode,
    Payload,
    Ping,
    Pong,
    Stage,
    encode_frame,
)


def run(reader: FrameReader, data: bytes, *, step: int | None = None, dest: bytearray | None = None) -> tuple[list, bytes]:
    """Feed ``data`` through get_buffer/buffer_updated (``step`` bytes at most per call), as asyncio would.

    With ``dest``, each data message's payload is directed into it (from its start). Returns the events
    (payload events reduced to their length) and the payload bytes seen in scratch.
    """
    events, scratch = [], bytearray()
    pos = 0
    while pos < len(data):
        buf = reader.get_buffer(-1)
        assert len(buf) > 0
        n = min(len(buf), len(data) - pos, step or len(data))
        buf[:n] = data[pos : pos + n]
        pos += n
        for ev in reader.buffer_updated(n):
            if isinstance(ev, MessageStart) and dest is not None:
                reader.direct(memoryview(dest))
            if isinstance(ev, Payload):
                if dest is None:
                    scratch += ev.data
                ev = ("payload", len(ev.data))
            events.append(ev)
    return events, bytes(scratch)


def merged(events: list) -> list:
    """Payload events merged into one total per run, so feeding granularity does not matter."""
    out: list = []
    for ev in events:
        if isinstance(ev, tuple) and out and isinstance(out[-1], tuple):
            out[-1] = ("payload", out[-1][1] + ev[1])
        else:
            out.append(ev)
    return out


SIZES = [0, 5, 125, 126, 65535, 65536, 200_000]


# Byte-at-a-time over 200 KB would be slow and adds nothing over 65536.
@pytest.mark.parametrize("size,step", [(n, s) for n in SIZES for s in (None, 1, 7) if not (s == 1 and n > 70_000)])
def test_lengths_7_16_and_64_bit(size, step):
    payload = bytes(i % 251 for i in range(size))
    frame = encode_frame(Opcode.BINARY, payload)
    assert frame[1] == (size if size < 126 else 126 if size < 1 << 16 else 127)
    events, got = run(FrameReader(), frame, step=step)
    want = [MessageStart(Opcode.BINARY, True)] + ([("payload", size)] if size else []) + [MessageEnd()]
    assert merged(events) == want and got == payload


def test_fragmented_message_with_ping_between_lands_in_one_destination():
    parts = [b"a" * 300, b"b" * 70_000, b"c" * 5]
    data = (encode_frame(Opcode.BINARY, parts[0], fin=False) + encode_frame(Opcode.PING, b"hi")
            + encode_frame(Opcode.CONT, parts[1], fin=False) + encode_frame(Opcode.PONG, b"")
            + encode_frame(Opcode.CONT, parts[2], fin=True))
    for step in (None, 1, 1000):
        dest = bytearray(sum(map(len, parts)))
        events, scratch = run(FrameReader(), data, step=step, dest=dest)
        assert bytes(dest) == b"".join(parts) and scratch == b""
        kinds = [ev for ev in merged(events) if not isinstance(ev, tuple)]
        assert kinds == [MessageStart(Opcode.BINARY, False), Ping(b"hi"), Pong(b""), DestinationFilled(), MessageEnd()]


def test_destination_switch_mid_message_and_overflow_to_scratch():
    reader = FrameReader()
    head, body = bytearray(4), bytearray(3)
    frame = encode_frame(Opcode.BINARY, b"HEADxyzTAIL")
    seen = []
    for ev in reader.feed(frame):  # a generator: direct() applies to the bytes after the event
        seen.append(ev if not isinstance(ev, Payload) else bytes(ev.data))
        if isinstance(ev, MessageStart):
            reader.direct(memoryview(head))
        elif isinstance(ev, DestinationFilled) and not body[0]:
            reader.direct(memoryview(body))
    assert bytes(head) == b"HEAD" and bytes(body) == b"xyz"
    assert seen == [MessageStart(Opcode.BINARY, True), b"HEAD", DestinationFilled(), b"xyz", DestinationFilled(),
                    b"TAIL", MessageEnd()]


def test_close_frames():
    events, _ = run(FrameReader(), encode_frame(Opcode.CLOSE, struct.pack(">H", 1001) + "bye ✓".encode()))
    assert events == [Close(1001, "bye ✓")]
    reader = FrameReader()
    assert run(reader, encode_frame(Opcode.CLOSE))[0] == [Close(None, "")]
    assert reader.stage is Stage.CLOSED
    with pytest.raises(ProtocolError, match="after its close frame"):
        run(reader, encode_frame(Opcode.BINARY, b"x"))
    for bad, match in [(b"\x03", "1 byte"), (struct.pack(">H", 999), "close code"), (struct.pack(">H", 1005), "close code"),
                       (struct.pack(">H", 1000) + b"\xff", "UTF-8")]:
        with pytest.raises(ProtocolError, match=match):
            run(FrameReader(), encode_frame(Opcode.CLOSE, bad))


@pytest.mark.parametrize("data,match", [
    (bytes([0x82 | 0x40, 1]) + b"x", "reserved bits"),
    (bytes([0x82, 0x80 | 1]) + b"mask" + b"x", "must not be masked"),
    (bytes([0x83, 0]), "unknown opcode"),
    (bytes([0x09, 0]), "control frames must be final"),
    (bytes([0x89, 126]) + struct.pack(">H", 126) + b"p" * 126, "control frames"),
    (encode_frame(Opcode.CONT, b"x"), "continuation frame without"),
    (encode_frame(Opcode.BINARY, b"x", fin=False) + encode_frame(Opcode.BINARY, b"y"), "before the previous"),
    (bytes([0x82, 126]) + struct.pack(">H", 5) + b"x" * 5, "minimally encoded"),
    (bytes([0x82, 127]) + struct.pack(">Q", 100) + b"x" * 100, "minimally encoded"),
])
def test_violations_raise(data, match):
    with pytest.raises(ProtocolError, match=match):
        run(FrameReader(), data)


def test_oversized_frame_is_refused_from_its_header_alone():
    reader = FrameReader(max_frame_bytes=1 << 20)
    header = bytes([0x82, 127]) + struct.pack(">Q", (1 << 20) + 1)  # no payload needs to arrive
    with pytest.raises(ProtocolError, match="exceeds the 1048576-byte limit"):
        run(reader, header)
    with pytest.raises(ProtocolError, match="exceeds"):
        run(FrameReader(), bytes([0x82, 127]) + struct.pack(">Q", 1 << 63))  # the default limit


def test_direct_needs_a_message_and_room():
    reader = FrameReader()
    with pytest.raises(ProtocolError):
        reader.direct(memoryview(bytearray(4)))
    list(reader.feed(encode_frame(Opcode.BINARY, b"abc", fin=False)))
    with pytest.raises(ProtocolError):
        reader.direct(memoryview(bytearray(0)))
    assert reader.in_message


def test_binary_frame_header_matches_encode_frame():
    for n in (0, 125, 126, 65535, 65536):
        assert frames.binary_frame_header(n) == encode_frame(Opcode.BINARY, b"\0" * n)[: len(frames.binary_frame_header(n))]


def test_few_expected_bytes_are_read_ahead_and_copied_where_they_belong():
    """A header is read with the bytes after it: one receive takes two messages' headers and payloads, each
    payload landing in the destination given in reaction to its MessageStart; a long payload is received in
    place (zero copy)."""
    reader = FrameReader()
    first, second = bytes(range(200)) * 5, b"z" * (frames.READ_AHEAD * 3)
    data = encode_frame(Opcode.BINARY, first) + encode_frame(Opcode.PING, b"p") + encode_frame(Opcode.BINARY, second)
    dests = [bytearray(len(first)), bytearray(len(second))]
    buf = reader.get_buffer(-1)
    assert len(buf) == frames.READ_AHEAD  # a 2-byte header is due: the read-ahead buffer is offered
    n = len(buf)
    buf[:n] = data[:n]
    seen = []
    for ev in reader.buffer_updated(n):
        seen.append(type(ev).__name__)
        if isinstance(ev, MessageStart):
            reader.direct(memoryview(dests[seen.count("MessageStart") - 1]))
    assert bytes(dests[0]) == first and seen[:4] == ["MessageStart", "Payload", "DestinationFilled", "MessageEnd"]
    assert seen[4:6] == ["Ping", "MessageStart"]
    left = len(data) - n
    assert reader.certain() == left  # the rest of the frame's payload, bound for its destination
    view = reader.get_buffer(-1)
    assert len(view) == left and view.obj is dests[1]  # received in place, not through the read-ahead buffer
    view[:] = data[n:]
    assert [type(ev).__name__ for ev in reader.buffer_updated(left)] == ["Payload", "DestinationFilled", "MessageEnd"]
    assert bytes(dests[1]) == second and reader.certain() == 0


def test_read_ahead_refuses_bytes_after_a_close_in_the_same_receive():
    reader = FrameReader()
    data = encode_frame(Opcode.CLOSE, struct.pack(">H", 1000)) + encode_frame(Opcode.BINARY, b"late")
    buf = reader.get_buffer(-1)
    buf[: len(data)] = data
    events = []
    with pytest.raises(ProtocolError, match="after its close frame"):
        for ev in reader.buffer_updated(len(data)):
            events.append(ev)
    assert events == [Close(1000, "")]
