"""The weight-server wire protocol, version 1: message types and their byte encoding (sans-I/O).

Specified byte by byte in ``docs/protocol.md``. Every message is one binary WebSocket message::

    offset  size  field
    0       1     version      (1)
    1       1     kind         (Kind)
    2       2     flags        (0; reserved)
    4       4     request_id   u32, chosen by the client, unique among its in-flight requests
    8       8     offset       u64; DATA: where the body goes in the blob, otherwise 0
    16      ...   body         REQUEST/RESULT/ERROR: UTF-8 JSON object; DATA: raw bytes; CANCEL: empty

All integers are little-endian. Blob bytes (manifests, units, files) travel only in DATA bodies, raw:
never hex, base64 or JSON. A blob response is a RESULT ``{"size": N}`` followed by DATA messages that
together cover ``[0, N)`` in increasing offset order; an ERROR may end a request at any point.

This module never touches sockets: it turns bytes into :class:`Message` objects and back.
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass, field
from typing import Any

from ..exceptions import (
    AuthenticationError,
    BadRequestError,
    BusyError,
    NotFoundError,
    ProtocolError,
    RemoteError,
    TooLargeError,
)

PROTOCOL_VERSION = 1
HEADER = struct.Struct("<BBHIQ")
HEADER_SIZE = HEADER.size  # 16
MAX_REQUEST_ID = 2**32 - 1
#: Default DATA body size: large enough to amortize per-message costs, small enough to interleave requests.
DEFAULT_CHUNK_BYTES = 1 << 20
#: JSON bodies (requests, results, errors) are small; anything larger is refused.
MAX_JSON_BODY = 64 * 1024


class Kind(enum.IntEnum):
    REQUEST = 1  # client -> server
    CANCEL = 2  # client -> server: stop sending request_id (best effort; no reply)
    RESULT = 3  # server -> client
    DATA = 4  # server -> client
    ERROR = 5  # server -> client


class Op(str, enum.Enum):
    PING = "ping"
    LIST_MODELS = "list_models"
    GET_MANIFEST = "get_manifest"
    GET_UNIT = "get_unit"
    GET_FILE = "get_file"
    #: the raw bytes of ``manifest.json.sig`` (``not_found`` when the model is unsigned)
    GET_SIGNATURE = "get_signature"


#: Ops whose RESULT announces a blob streamed in DATA messages.
BLOB_OPS = frozenset({Op.GET_MANIFEST, Op.GET_UNIT, Op.GET_FILE, Op.GET_SIGNATURE})


class ErrorCode(str, enum.Enum):
    NOT_FOUND = "not_found"
    UNAUTHORIZED = "unauthorized"
    BAD_REQUEST = "bad_request"
    TOO_LARGE = "too_large"
    BUSY = "busy"
    INTERNAL = "internal"


_ERROR_TYPES: dict[str, type[Exception]] = {
    ErrorCode.NOT_FOUND.value: NotFoundError,
    ErrorCode.BAD_REQUEST.value: BadRequestError,
    ErrorCode.TOO_LARGE.value: TooLargeError,
    ErrorCode.BUSY.value: BusyError,
}


def error_from_code(code: str, message: str) -> Exception:
    """The exception a client raises for an ERROR response (``RemoteError`` for unknown codes)."""
    if code == ErrorCode.UNAUTHORIZED.value:
        return AuthenticationError(message)
    cls = _ERROR_TYPES.get(code)
    if cls is None:
        return RemoteError(message, code=code)
    return cls(message)  # type: ignore[call-arg]


def code_for_exception(exc: BaseException) -> str:
    """The error code a server sends for an exception raised while answering a request."""
    if isinstance(exc, RemoteError) and exc.code in {c.value for c in ErrorCode}:
        return exc.code
    if isinstance(exc, AuthenticationError):
        return ErrorCode.UNAUTHORIZED.value
    return ErrorCode.INTERNAL.value


# ------------------------------------------------------------------------------------------ messages
@dataclass(frozen=True)
class Request:
    """A client request. ``model`` None means "the only hosted model"; ``name`` is a unit or file name."""

    request_id: int
    op: Op
    model: str | None = None
    name: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"op": self.op.value}
        if self.model is not None:
            out["model"] = self.model
        if self.name is not None:
            out["name"] = self.name
        return out


@dataclass(frozen=True)
class Cancel:
    request_id: int


@dataclass(frozen=True)
class Result:
    """A successful response. Blob ops: ``body == {"size": N}`` and N bytes of DATA follow."""

    request_id: int
    body: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int | None:
        size = self.body.get("size")
        return size if isinstance(size, int) and not isinstance(size, bool) and size >= 0 else None


@dataclass(frozen=True)
class Data:
    request_id: int
    offset: int
    payload: bytes | memoryview


@dataclass(frozen=True)
class Error:
    request_id: int
    code: str
    message: str

    def to_exception(self) -> Exception:
        return error_from_code(self.code, self.message)


Message = Request | Cancel | Result | Data | Error


# ------------------------------------------------------------------------------------------ encoding
def encode_header(kind: Kind, request_id: int, offset: int = 0) -> bytes:
    return HEADER.pack(PROTOCOL_VERSION, kind, 0, request_id, offset)


def _json_body(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def encode(msg: Message) -> bytes:
    """Serialize one message (for DATA, prefer :func:`encode_data` with a memoryview)."""
    if isinstance(msg, Request):
        _check_id(msg.request_id)
        return encode_header(Kind.REQUEST, msg.request_id) + _json_body(msg.to_json())
    if isinstance(msg, Cancel):
        return encode_header(Kind.CANCEL, msg.request_id)
    if isinstance(msg, Result):
        return encode_header(Kind.RESULT, msg.request_id) + _json_body(msg.body)
    if isinstance(msg, Data):
        return encode_data(msg.request_id, msg.offset, msg.payload)
    if isinstance(msg, Error):
        return encode_header(Kind.ERROR, msg.request_id) + _json_body({"code": msg.code, "message": msg.message})
    raise TypeError(f"not a protocol message: {msg!r}")


def encode_data(request_id: int, offset: int, payload: bytes | bytearray | memoryview) -> bytes:
    return encode_header(Kind.DATA, request_id, offset) + payload


def _check_id(request_id: int) -> None:
    if not isinstance(request_id, int) or not 0 < request_id <= MAX_REQUEST_ID:
        raise ProtocolError(f"request_id must be in 1..{MAX_REQUEST_ID}, got {request_id!r}")


def parse_header(data: bytes | bytearray | memoryview) -> tuple[Kind, int, int]:
    """Return (kind, request_id, offset) of a message. Raises ProtocolError."""
    if len(data) < HEADER_SIZE:
        raise ProtocolError(f"message of {len(data)} bytes is shorter than the {HEADER_SIZE}-byte header")
    version, kind, flags, request_id, offset = HEADER.unpack_from(data, 0)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version} is not supported (this side speaks {PROTOCOL_VERSION})")
    try:
        kind = Kind(kind)
    except ValueError:
        raise ProtocolError(f"unknown message kind {kind}") from None
    if flags:
        raise ProtocolError(f"reserved flags set: {flags:#x}")
    return kind, request_id, offset


def _parse_json(body: bytes | bytearray | memoryview, what: str) -> dict[str, Any]:
    if len(body) > MAX_JSON_BODY:
        raise ProtocolError(f"{what} body of {len(body)} bytes exceeds {MAX_JSON_BODY}")
    try:
        obj = json.loads(bytes(body))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"{what} body is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what} body must be a JSON object")
    return obj


def _opt_str(obj: dict[str, Any], key: str) -> str | None:
    val = obj.get(key)
    if val is not None and not isinstance(val, str):
        raise ProtocolError(f"request field {key!r} must be a string")
    return val


def decode(data: bytes | bytearray | memoryview) -> Message:
    """Parse one message. DATA payloads are memoryviews into ``data`` (no copy).

    Raises:
        ProtocolError: anything malformed: short header, bad version/kind, bad JSON, missing fields.
    """
    kind, request_id, offset = parse_header(data)
    body = memoryview(data)[HEADER_SIZE:]
    if kind is Kind.DATA:
        return Data(request_id, offset, body)
    if offset:
        raise ProtocolError(f"{kind.name} message with a non-zero offset")
    if kind is Kind.CANCEL:
        if len(body):
            raise ProtocolError("CANCEL message has a body")
        return Cancel(request_id)
    obj = _parse_json(body, kind.name)
    if kind is Kind.REQUEST:
        _check_id(request_id)
        try:
            op = Op(obj.get("op"))
        except ValueError:
            raise ProtocolError(f"unknown op {obj.get('op')!r}; expected one of {[o.value for o in Op]}") from None
        unknown = set(obj) - {"op", "model", "name"}
        if unknown:
            raise ProtocolError(f"unknown request fields {sorted(unknown)}")
        model, name = _opt_str(obj, "model"), _opt_str(obj, "name")
        if op in (Op.GET_UNIT, Op.GET_FILE) and name is None:
            raise ProtocolError(f"{op.value} needs a 'name'")
        return Request(request_id, op, model, name)
    if kind is Kind.RESULT:
        return Result(request_id, obj)
    code, message = obj.get("code"), obj.get("message", "")
    if not isinstance(code, str) or not isinstance(message, str):
        raise ProtocolError("ERROR body needs string 'code' and 'message'")
    return Error(request_id, code, message)


__all__ = [
    "BLOB_OPS", "DEFAULT_CHUNK_BYTES", "HEADER_SIZE", "MAX_JSON_BODY", "PROTOCOL_VERSION",
    "Cancel", "Data", "Error", "ErrorCode", "Kind", "Message", "Op", "Request", "Result",
    "code_for_exception", "decode", "encode", "encode_data", "encode_header", "error_from_code", "parse_header",
]
