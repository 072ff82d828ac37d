"""The sans-I/O protocol: exact bytes, round trips, and rejection of malformed input (no sockets)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streaming_weights import protocol as proto
from streaming_weights.exceptions import (
    AuthenticationError,
    BadRequestError,
    BusyError,
    NotFoundError,
    ProtocolError,
    RemoteError,
    TooLargeError,
)


def test_header_layout_is_16_bytes_little_endian():
    raw = proto.encode_header(proto.Kind.DATA, 0x01020304, 0x1122334455667788)
    assert raw == bytes([1, 4, 0, 0, 4, 3, 2, 1]) + struct.pack("<Q", 0x1122334455667788)
    assert proto.HEADER_SIZE == 16


def test_request_bytes_are_header_plus_compact_json():
    raw = proto.encode(proto.Request(7, proto.Op.GET_UNIT, "m", "model.layers.0"))
    assert raw[:16] == proto.encode_header(proto.Kind.REQUEST, 7)
    assert raw[16:] == b'{"op":"get_unit","model":"m","name":"model.layers.0"}'


@pytest.mark.parametrize("msg", [
    proto.Request(1, proto.Op.PING),
    proto.Request(2, proto.Op.LIST_MODELS),
    proto.Request(3, proto.Op.GET_MANIFEST, "llama"),
    proto.Request(proto.MAX_REQUEST_ID, proto.Op.GET_FILE, None, "tokenizer.json"),
    proto.Cancel(9),
    proto.Result(4, {"size": 10}),
    proto.Result(5, {"models": ["a", "b"]}),
    proto.Error(6, "not_found", "no such unit"),
    proto.Error(0, "bad_request", "text frames are not allowed"),
])
def test_round_trip(msg):
    assert proto.decode(proto.encode(msg)) == msg


def test_data_is_raw_bytes_and_decodes_zero_copy():
    payload = bytes(range(256)) * 4
    raw = proto.encode(proto.Data(3, 4096, payload))
    assert raw[16:] == payload  # no hex/base64/JSON
    msg = proto.decode(raw)
    assert isinstance(msg, proto.Data) and msg.offset == 4096 and bytes(msg.payload) == payload
    assert isinstance(msg.payload, memoryview) and msg.payload.obj is raw


def test_result_size():
    assert proto.Result(1, {"size": 5}).size == 5
    for bad in ({}, {"size": -1}, {"size": "5"}, {"size": True}):
        assert proto.Result(1, bad).size is None


@pytest.mark.parametrize("raw, why", [
    (b"", "shorter"),
    (b"\x01\x01\x00", "shorter"),
    (struct.pack("<BBHIQ", 2, 1, 0, 1, 0) + b"{}", "version"),
    (struct.pack("<BBHIQ", 1, 99, 0, 1, 0), "kind"),
    (struct.pack("<BBHIQ", 1, 1, 1, 1, 0) + b'{"op":"ping"}', "flags"),
    (struct.pack("<BBHIQ", 1, 1, 0, 1, 5) + b'{"op":"ping"}', "offset"),
    (proto.encode_header(proto.Kind.REQUEST, 1) + b"{not json", "JSON"),
    (proto.encode_header(proto.Kind.REQUEST, 1) + b"[1,2]", "object"),
    (proto.encode_header(proto.Kind.REQUEST, 1) + b"\xff\xfe", "JSON"),
    (proto.encode_header(proto.Kind.REQUEST, 1) + b'{"op":"rm -rf"}', "unknown op"),
    (proto.encode_header(proto.Kind.REQUEST, 1) + b'{"op":"get_unit"}', "needs a 'name'"),
    (proto.encode_header(proto.Kind.REQUEST, 1) + b'{"op":"get_unit","name":3}', "string"),
    (proto.encode_header(proto.Kind.REQUEST, 1) + b'{"op":"ping","x":1}', "unknown request fields"),
    (proto.encode_header(proto.Kind.REQUEST, 0) + b'{"op":"ping"}', "request_id"),
    (proto.encode_header(proto.Kind.CANCEL, 1) + b"x", "body"),
    (proto.encode_header(proto.Kind.ERROR, 1) + b'{"code":1}', "code"),
    (proto.encode_header(proto.Kind.REQUEST, 1) + b'{"op":"ping","name":"' + b"a" * proto.MAX_JSON_BODY + b'"}', "exceeds"),
])
def test_malformed_messages_raise_protocol_error(raw, why):
    with pytest.raises(ProtocolError, match=why):
        proto.decode(raw)


def test_encode_rejects_bad_request_ids():
    for rid in (0, -1, 2**32):
        with pytest.raises(ProtocolError):
            proto.encode(proto.Request(rid, proto.Op.PING))


@pytest.mark.parametrize("code, cls", [
    ("not_found", NotFoundError), ("bad_request", BadRequestError), ("too_large", TooLargeError),
    ("busy", BusyError), ("unauthorized", AuthenticationError),
])
def test_error_codes_map_to_exception_types(code, cls):
    exc = proto.Error(1, code, "msg").to_exception()
    assert type(exc) is cls and str(exc) == "msg"
    if isinstance(exc, RemoteError):
        assert exc.code == code
        assert proto.code_for_exception(exc) == code


def test_unknown_and_internal_codes():
    exc = proto.error_from_code("internal", "boom")
    assert type(exc) is RemoteError and exc.code == "internal"
    assert proto.error_from_code("teapot", "x").code == "teapot"
    assert proto.code_for_exception(ValueError("x")) == "internal"
    assert proto.code_for_exception(AuthenticationError("x")) == "unauthorized"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_decode_or_raise_protocol_error(data):
    try:
        proto.decode(data)
    except ProtocolError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.integers(1, proto.MAX_REQUEST_ID), st.integers(0, 2**64 - 1), st.binary(max_size=2048))
def test_data_round_trip_any_payload(rid, offset, payload):
    msg = proto.decode(proto.encode_data(rid, offset, payload))
    assert (msg.request_id, msg.offset, bytes(msg.payload)) == (rid, offset, payload)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, proto.MAX_REQUEST_ID), st.sampled_from(list(proto.Op)),
       st.one_of(st.none(), st.text(max_size=40)), st.text(min_size=1, max_size=40))
def test_request_round_trip_any_names(rid, op, model, name):
    msg = proto.Request(rid, op, model, name)
    assert proto.decode(proto.encode(msg)) == msg
