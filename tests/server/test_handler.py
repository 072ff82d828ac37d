"""The server's sans-I/O request handler: bytes in, a plan out (no sockets, no storage)."""

from __future__ import annotations

from tests.support.servers import build_model

from streaming_weights import protocol as proto
from streaming_weights.server.handler import Answer, Cancel, Hosted, Reject, RequestHandler
from streaming_weights.storage import MemoryBackend


def handler(max_inflight: int = 4) -> tuple[RequestHandler, Hosted]:
    storage = MemoryBackend()
    manifest = build_model(storage, "m", {"resident": 500, "layer.0": 800}, prefix="models/m", files={"t.json": b"{}"})
    hosted = Hosted("models/m", manifest, manifest.to_bytes())
    return RequestHandler({"m": hosted}, max_inflight=max_inflight), hosted


def req(rid: int, op: proto.Op, model: str | None = None, name: str | None = None) -> bytes:
    return proto.encode(proto.Request(rid, op, model, name))


def test_plans_for_each_op():
    h, hosted = handler()
    assert h.plan(req(1, proto.Op.PING), ()) == Answer(1, proto.Op.PING, body={"pong": True, "version": 1})
    assert h.plan(req(2, proto.Op.LIST_MODELS), ()).body == {"models": ["m"]}
    assert h.plan(req(3, proto.Op.GET_MANIFEST), ()).data == hosted.manifest_bytes  # the only model
    unit = h.plan(req(4, proto.Op.GET_UNIT, "m", "layer.0"), ())
    assert unit.entry == hosted.manifest.unit("layer.0") and unit.key == "models/m/" + unit.entry.path
    assert h.plan(req(5, proto.Op.GET_FILE, None, "t.json"), ()).entry == hosted.manifest.file("t.json")
    assert h.plan(proto.encode(proto.Cancel(4)), {4}) == Cancel(4)


def test_request_errors_become_error_answers():
    h, _ = handler()
    assert h.plan(req(1, proto.Op.GET_UNIT, "m", "../../etc/passwd"), ()).error[0] == "bad_request"
    assert h.plan(req(2, proto.Op.GET_UNIT, "m", "layer.9"), ()).error == ("not_found", "model 'm' has no unit 'layer.9'")
    assert h.plan(req(3, proto.Op.GET_MANIFEST, "other"), ()).error[0] == "not_found"


def test_rejections_outside_requests():
    h, _ = handler(max_inflight=2)
    text = h.plan("hello", ())
    assert isinstance(text, Reject) and text.reason == "protocol" and text.request_id == 0
    short = h.plan(b"\x01\x01", ())
    assert isinstance(short, Reject) and short.code == "bad_request" and short.request_id == 0
    bad_version = h.plan(b"\x09" + req(7, proto.Op.PING)[1:], ())
    assert isinstance(bad_version, Reject) and bad_version.request_id == 7
    assert h.plan(proto.encode(proto.Result(3, {})), ()).reason == "protocol"
    assert h.plan(req(5, proto.Op.PING), {5}).reason == "duplicate"
    busy = h.plan(req(6, proto.Op.PING), {1, 2})
    assert busy.code == "busy" and busy.reason == "busy" and busy.op is proto.Op.PING
