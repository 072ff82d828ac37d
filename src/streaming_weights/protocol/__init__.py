"""The weight-server wire protocol (v1, docs/protocol.md), sans-I/O.

Public surface: :mod:`.messages` (the application messages and their byte encoding: ``encode``,
``decode``, ``Request``, ``Result``, ``Data``, ``Error``…, re-exported here so ``proto.encode(...)``
works) and :mod:`.frames` (the client's WebSocket frame reader, ``FrameReader``). Nothing here
touches a socket.
"""

from __future__ import annotations

from . import frames
from .messages import (
    BLOB_OPS,
    DEFAULT_CHUNK_BYTES,
    HEADER,
    HEADER_SIZE,
    MAX_JSON_BODY,
    MAX_REQUEST_ID,
    PROTOCOL_VERSION,
    Cancel,
    Data,
    Error,
    ErrorCode,
    Kind,
    Message,
    Op,
    Request,
    Result,
    code_for_exception,
    decode,
    encode,
    encode_data,
    encode_header,
    error_from_code,
    parse_header,
)

__all__ = [
    "BLOB_OPS", "DEFAULT_CHUNK_BYTES", "HEADER", "HEADER_SIZE", "MAX_JSON_BODY", "MAX_REQUEST_ID", "PROTOCOL_VERSION",
    "Cancel", "Data", "Error", "ErrorCode", "Kind", "Message", "Op", "Request", "Result",
    "code_for_exception", "decode", "encode", "encode_data", "encode_header", "error_from_code", "frames",
    "parse_header",
]
