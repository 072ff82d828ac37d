"""Sans-I/O reader of server-to-client WebSocket frames (RFC 6455 §5), built for zero-copy receives.

:class:`FrameReader` follows :class:`asyncio.BufferedProtocol`'s shape: :meth:`~FrameReader.get_buffer`
says where the next bytes go, :meth:`~FrameReader.buffer_updated` says how many landed there and returns
the :data:`Event` s they complete. It never touches a socket, so tests drive it with crafted bytes.

The payload of a data message goes wherever the caller points it: after :class:`MessageStart` (or a
:class:`DestinationFilled`) the caller calls :meth:`~FrameReader.direct` with a writable memoryview, and
the next payload bytes are read *into that view* (for DATA, the unit's own receive buffer), across frame
boundaries and interleaved control frames. Without a destination the bytes land in a scratch buffer
and are handed over as :class:`Payload` events (valid until the next ``get_buffer``).

Where the bytes expected next are few (a frame header, its length, a protocol header, the tail of a frame),
:meth:`~FrameReader.get_buffer` offers a :data:`READ_AHEAD`-byte side buffer instead, and
:meth:`~FrameReader.buffer_updated` copies what arrived there on to where each byte belongs. One receive
then takes a message's headers and the start of its payload: a 1 MiB DATA message costs the event loop two
wake-ups instead of four (2-byte header, 8-byte length, 16-byte protocol header, payload).
:meth:`~FrameReader.buffer_updated` therefore yields its events one at a time: a :meth:`~FrameReader.direct`
made in reaction to one applies to the bytes after it, wherever they arrived.

Checked here, so the caller never sees a malformed frame: reserved bits (no extension is negotiated),
masking (a server must not mask), opcodes, control-frame rules (final, at most 125 bytes, close payload
shape), continuation order, and a frame-size limit. Violations raise :class:`ProtocolError`; the
connection cannot be trusted after one.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Iterator, Union

from ..exceptions import ProtocolError

#: Largest frame payload accepted by default (a 64-bit length can claim anything).
DEFAULT_MAX_FRAME = 1 << 31
_SCRATCH = 256 * 1024
#: A receive that would take fewer bytes than this reads up to this many into a side buffer (module docstring).
#: SmolLM2 at a 660 MB cap, 8 tokens: 11.7k receives (8.3k of them 2-31 bytes) without it.
READ_AHEAD = 64 * 1024
_MAX_CONTROL = 125


class Opcode(enum.IntEnum):
    CONT = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


_DATA_OPCODES = (Opcode.TEXT, Opcode.BINARY)


class Stage(enum.Enum):
    HEADER = "header"  # the 2-byte frame header
    LENGTH = "length"  # the 2- or 8-byte extended payload length
    CONTROL = "control"  # a control frame's payload
    PAYLOAD = "payload"  # a data frame's payload
    CLOSED = "closed"  # a close frame was received: nothing may follow


@dataclass(frozen=True)
class MessageStart:
    """The first frame of a data message arrived (``fin``: it is also the last)."""

    opcode: Opcode
    fin: bool


@dataclass(frozen=True)
class Payload:
    """Payload bytes of the current message; ``data`` views where they landed (the destination or scratch)."""

    data: memoryview


@dataclass(frozen=True)
class DestinationFilled:
    """The view given to :meth:`FrameReader.direct` is full; later bytes go to scratch until the next one."""


@dataclass(frozen=True)
class MessageEnd:
    """The final frame of the current data message is complete."""


@dataclass(frozen=True)
class Ping:
    payload: bytes


@dataclass(frozen=True)
class Pong:
    payload: bytes


@dataclass(frozen=True)
class Close:
    """A close frame: ``code`` None when it carried no status code (1005 on the wire's terms)."""

    code: int | None
    reason: str


Event = Union[MessageStart, Payload, DestinationFilled, MessageEnd, Ping, Pong, Close]


class FrameReader:
    """Incremental parser of the frames a server sends (unmasked); see the module docstring.

    Args:
        max_frame_bytes: largest payload of one frame; a larger announced length raises ProtocolError.
    """

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame_bytes = max_frame_bytes
        self.stage = Stage.HEADER
        self._head = bytearray(10)
        self._head_view = memoryview(self._head)
        self._scratch = memoryview(bytearray(_SCRATCH))
        self._region: memoryview = self._head_view[:2]  # where HEADER/LENGTH/CONTROL bytes go
        self._got = 0
        self._fin = True
        self._opcode = Opcode.CONT
        self._frame_left = 0  # payload bytes of the current data frame not read yet
        self._in_message = False
        self._dest: memoryview | None = None
        self._dest_pos = 0
        self._ahead = memoryview(bytearray(READ_AHEAD))
        self._ahead_given = False  # the last get_buffer offered the read-ahead buffer

    # ------------------------------------------------------------------------------------- caller API
    @property
    def in_message(self) -> bool:
        return self._in_message

    def direct(self, view: memoryview | None) -> None:
        """Read the current message's next payload bytes into ``view`` (None: into scratch)."""
        if view is not None and (not self._in_message or len(view) == 0):
            raise ProtocolError("a payload destination needs a data message in progress and room for bytes")
        self._dest, self._dest_pos = view, 0

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Where the next received bytes must be written (never empty): where they belong, or the read-ahead
        buffer when that is fewer than :data:`READ_AHEAD` bytes."""
        view = self._view()
        self._ahead_given = len(view) < READ_AHEAD and self.stage is not Stage.CLOSED
        return self._ahead if self._ahead_given else view

    def buffer_updated(self, nbytes: int) -> Iterator[Event]:
        """``nbytes`` were written into the last :meth:`get_buffer` view; yield the events they complete,
        one at a time (react to each before taking the next: see :meth:`direct`)."""
        if self._ahead_given:
            self._ahead_given = False
            yield from self.feed(self._ahead[: max(0, nbytes)])
        else:
            yield from self._landed(nbytes)

    def certain(self) -> int:
        """Bytes certain to arrive next before anything else: the rest of the current frame's payload where it
        goes to a destination in one piece (0 otherwise: a header, or bytes bound for scratch)."""
        if self.stage is Stage.PAYLOAD and self._dest is not None:
            return min(self._frame_left, len(self._dest) - self._dest_pos)
        return 0

    def _view(self) -> memoryview:
        """Where the next bytes belong (never empty)."""
        if self.stage is Stage.PAYLOAD:
            if self._dest is not None:
                return self._dest[self._dest_pos : self._dest_pos + self._frame_left]
            return self._scratch[: min(self._frame_left, _SCRATCH)]
        if self.stage is Stage.CLOSED:
            return self._scratch
        return self._region[self._got :]

    def _landed(self, nbytes: int) -> list[Event]:
        """``nbytes`` were written into :meth:`_view`; the events they complete."""
        events: list[Event] = []
        if nbytes <= 0:
            return events
        if self.stage is Stage.CLOSED:
            raise ProtocolError("the server sent data after its close frame")
        if self.stage is Stage.PAYLOAD:
            self._payload(nbytes, events)
            return events
        self._got += nbytes
        if self._got == len(self._region):
            self._region_done(events)
        return events

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[Event]:
        """Push bytes that did not arrive through :meth:`get_buffer` (copies them in).

        A generator: it reads on only after the caller handled the events yielded so far, so a
        :meth:`direct` call made in reaction to an event applies to the bytes that follow it.
        """
        src = memoryview(data)
        while src:
            dest = self._view()
            n = min(len(dest), len(src))
            dest[:n] = src[:n]
            src = src[n:]
            yield from self._landed(n)

    # ------------------------------------------------------------------------------------- parsing
    def _expect(self, stage: Stage, region: memoryview) -> None:
        self.stage, self._region, self._got = stage, region, 0

    def _region_done(self, events: list[Event]) -> None:
        if self.stage is Stage.HEADER:
            self._frame_header(events)
        elif self.stage is Stage.LENGTH:
            fmt = ">H" if len(self._region) == 2 else ">Q"
            length = struct.unpack(fmt, self._region)[0]
            if fmt == ">H" and length < 126 or fmt == ">Q" and length < 1 << 16:
                raise ProtocolError("frame length is not minimally encoded")
            self._frame_body(length, events)
        else:  # CONTROL
            self._control(bytes(self._region), events)

    def _frame_header(self, events: list[Event]) -> None:
        b0, b1 = self._head[0], self._head[1]
        if b0 & 0x70:
            raise ProtocolError("server frame has reserved bits set (no extension was negotiated)")
        if b1 & 0x80:
            raise ProtocolError("server frames must not be masked")
        try:
            self._opcode = Opcode(b0 & 0x0F)
        except ValueError:
            raise ProtocolError(f"unknown opcode {b0 & 0x0F:#x}") from None
        self._fin = bool(b0 & 0x80)
        length = b1 & 0x7F
        if length >= 126:
            size = 2 if length == 126 else 8
            self._expect(Stage.LENGTH, self._head_view[2 : 2 + size])
            return
        self._frame_body(length, events)

    def _frame_body(self, length: int, events: list[Event]) -> None:
        """The header of a frame with a ``length``-byte payload is complete."""
        if length > self.max_frame_bytes:
            raise ProtocolError(f"frame of {length} bytes exceeds the {self.max_frame_bytes}-byte limit")
        op = self._opcode
        if op >= Opcode.CLOSE:
            if not self._fin or length > _MAX_CONTROL:
                raise ProtocolError("control frames must be final and at most 125 bytes")
            if length == 0:
                self._control(b"", events)
            else:
                self._expect(Stage.CONTROL, memoryview(bytearray(length)))
            return
        if op is Opcode.CONT:
            if not self._in_message:
                raise ProtocolError("continuation frame without a message to continue")
        elif self._in_message:
            raise ProtocolError("new data message before the previous one finished")
        else:
            self._in_message, self._dest = True, None
            events.append(MessageStart(op, self._fin))
        self._frame_left = length
        self.stage = Stage.PAYLOAD
        self._frame_done_if_empty(events)

    def _payload(self, nbytes: int, events: list[Event]) -> None:
        if self._dest is not None:
            data = self._dest[self._dest_pos : self._dest_pos + nbytes]
            self._dest_pos += nbytes
        else:
            data = self._scratch[:nbytes]
        self._frame_left -= nbytes
        events.append(Payload(data))
        if self._dest is not None and self._dest_pos == len(self._dest):
            self._dest = None
            events.append(DestinationFilled())
        self._frame_done_if_empty(events)

    def _frame_done_if_empty(self, events: list[Event]) -> None:
        if self._frame_left:
            return
        if self._fin:
            self._in_message, self._dest = False, None
            events.append(MessageEnd())
        self._expect(Stage.HEADER, self._head_view[:2])

    def _control(self, payload: bytes, events: list[Event]) -> None:
        self._expect(Stage.HEADER, self._head_view[:2])
        if self._opcode is Opcode.PING:
            events.append(Ping(payload))
        elif self._opcode is Opcode.PONG:
            events.append(Pong(payload))
        else:
            events.append(_parse_close(payload))
            self.stage = Stage.CLOSED


def _parse_close(payload: bytes) -> Close:
    if not payload:
        return Close(None, "")
    if len(payload) == 1:
        raise ProtocolError("close frame payload of 1 byte (a status code needs 2)")
    code = struct.unpack(">H", payload[:2])[0]
    if code < 1000 or code in (1004, 1005, 1006, 1015) or 1016 <= code < 3000 or code >= 5000:
        raise ProtocolError(f"invalid close code {code}")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("close reason is not valid UTF-8") from None
    return Close(code, reason)


def encode_frame(opcode: Opcode, payload: bytes = b"", *, fin: bool = True) -> bytes:
    """One unmasked frame (RFC 6455 §5.2), as a server sends it."""
    return _header((0x80 if fin else 0) | opcode, len(payload)) + payload


def binary_frame_header(n: int) -> bytes:
    """Header of a final, unmasked binary frame with an ``n``-byte payload (the payload follows it)."""
    return _header(0x80 | Opcode.BINARY, n)


def _header(b0: int, n: int) -> bytes:
    if n < 126:
        return struct.pack("!BB", b0, n)
    if n < 1 << 16:
        return struct.pack("!BBH", b0, 126, n)
    return struct.pack("!BBQ", b0, 127, n)


__all__ = [
    "DEFAULT_MAX_FRAME", "READ_AHEAD", "Close", "DestinationFilled", "Event", "FrameReader", "MessageEnd", "MessageStart",
    "Opcode", "Payload", "Ping", "Pong", "Stage", "binary_frame_header", "encode_frame",
]
