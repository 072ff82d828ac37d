"""What the server answers, decided without I/O: one inbound message in, one :data:`Plan` out.

:class:`RequestHandler` validates a client message against the hosted manifests (protocol shape,
in-flight limits, model, unit/file name rule, manifest membership) and returns the plan the asyncio
pump in :mod:`.server` executes: send a RESULT, send an in-memory blob, stream a stored blob, send an
ERROR, or cancel a running request. Nothing here reads storage or touches a socket, so every decision
is testable with plain bytes.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Union

from .. import protocol as proto
from ..exceptions import BadRequestError, ManifestError, NotFoundError, ProtocolError, RemoteError
from ..format import Manifest, check_name, join_key
from ..format.manifest import BlobEntry
from ..storage.catalog import pick_model
from .access import OPEN, Grant


@dataclass
class Hosted:
    """One hosted model: where it lives in the storage, its manifest, and the stored bytes served verbatim
    for GET_MANIFEST (so a signature over them still verifies) with their signature, if any."""

    prefix: str
    manifest: Manifest
    manifest_bytes: bytes
    signature: bytes | None = None


@dataclass(frozen=True)
class Cancel:
    """Stop the running request ``request_id`` (no reply)."""

    request_id: int


@dataclass(frozen=True)
class Reject:
    """Answer ERROR at once, outside any request (``reason``: ``protocol``, ``busy`` or ``duplicate``)."""

    request_id: int
    code: str
    message: str
    reason: str
    op: proto.Op | None = None


@dataclass(frozen=True)
class Answer:
    """A request to serve: exactly one of ``body`` (RESULT), ``data`` (blob in memory),
    ``entry`` (stored blob at ``key``) or ``error`` (code, message) is set."""

    request_id: int
    op: proto.Op
    body: dict[str, Any] | None = None
    data: bytes | None = None
    entry: BlobEntry | None = None
    key: str = ""
    model: str = ""
    error: tuple[str, str] | None = field(default=None)
    #: The answer depends on which models the storage holds now: ``"manifest"`` (re-read ``model``'s
    #: manifest) or ``"scan"`` (an unknown model name, or list_models: discover the storage's models), then
    #: answer ``request`` again with :meth:`RequestHandler.answer`. Empty: final.
    refresh: str = field(default="", compare=False)
    request: proto.Request | None = field(default=None, repr=False, compare=False)


Plan = Union[Cancel, Reject, Answer]


def error_reply(exc: BaseException) -> tuple[str, str, bool]:
    """(code, message, expected) for an exception raised while serving; ``expected`` False means a server bug
    or storage failure worth a log line with details."""
    if isinstance(exc, RemoteError):
        return proto.code_for_exception(exc), str(exc), exc.code != proto.ErrorCode.INTERNAL.value
    return proto.ErrorCode.INTERNAL.value, f"internal server error: {type(exc).__name__}: {exc}", False


class RequestHandler:
    """Turns client messages into plans, given the hosted models and the per-connection limit."""

    def __init__(self, models: dict[str, Hosted], *, max_inflight: int) -> None:
        self.models = models
        self.max_inflight = max_inflight

    def plan(self, raw: bytes | str, inflight: Collection[int], grant: Grant = OPEN) -> Plan:
        """The plan for one inbound WebSocket message; ``inflight`` are the connection's running request ids,
        ``grant`` the models its token may read (the others look exactly like models that do not exist)."""
        bad = proto.ErrorCode.BAD_REQUEST.value
        if isinstance(raw, str):
            return Reject(0, bad, "text messages are not part of the protocol; send binary", "protocol")
        try:
            msg = proto.decode(raw)
        except ProtocolError as exc:
            rid = proto.HEADER.unpack_from(raw, 0)[3] if len(raw) >= proto.HEADER_SIZE else 0
            return Reject(rid, bad, f"malformed message: {exc}", "protocol")
        if isinstance(msg, proto.Cancel):
            return Cancel(msg.request_id)
        if not isinstance(msg, proto.Request):
            return Reject(msg.request_id, bad, f"clients may not send {type(msg).__name__} messages", "protocol")
        if msg.request_id in inflight:
            return Reject(msg.request_id, bad, f"request id {msg.request_id} is already in flight", "duplicate")
        if len(inflight) >= self.max_inflight:
            return Reject(msg.request_id, proto.ErrorCode.BUSY.value,
                          f"more than {self.max_inflight} requests in flight on one connection; wait for some to finish",
                          "busy", msg.op)
        return self.answer(msg, grant, refresh=True)

    def answer(self, req: proto.Request, grant: Grant = OPEN, *, refresh: bool = False) -> Answer:
        """The answer to one valid request. ``refresh``: mark answers that depend on what the storage holds
        now (see :attr:`Answer.refresh`) so the server can bring its catalog up to date and ask again."""
        try:
            return self._answer(req, grant, refresh)
        except RemoteError as exc:
            return Answer(req.request_id, req.op, error=(proto.code_for_exception(exc), str(exc)))

    def _answer(self, req: proto.Request, grant: Grant, refresh: bool) -> Answer:
        rid, op = req.request_id, req.op
        if op is proto.Op.PING:
            return Answer(rid, op, body={"pong": True, "version": proto.PROTOCOL_VERSION})
        visible = grant.visible(self.models)
        if op is proto.Op.LIST_MODELS:
            return Answer(rid, op, body={"models": sorted(visible)}, refresh="scan" if refresh else "", request=req)
        try:
            hosted = visible[pick_model(visible, req.model, "this server")]
        except NotFoundError as exc:
            if not refresh:
                raise
            return Answer(rid, op, error=(exc.code, str(exc)), refresh="scan", request=req)
        name = hosted.manifest.name
        if op is proto.Op.GET_MANIFEST:
            return Answer(rid, op, data=hosted.manifest_bytes, model=name, refresh="manifest" if refresh else "",
                          request=req)
        if op is proto.Op.GET_SIGNATURE:
            if hosted.signature is None:
                raise NotFoundError(f"model {name!r} is not signed (no manifest.json.sig)")
            return Answer(rid, op, data=hosted.signature, model=name)
        assert req.name is not None  # decode() guarantees it for get_unit / get_file
        what = "unit" if op is proto.Op.GET_UNIT else "file"
        try:
            check_name(req.name, f"{what} name")
        except ManifestError as exc:
            raise BadRequestError(str(exc)) from None
        try:
            entry = hosted.manifest.unit(req.name) if what == "unit" else hosted.manifest.file(req.name)
        except ManifestError:
            raise NotFoundError(f"model {name!r} has no {what} {req.name!r}") from None
        return Answer(rid, op, entry=entry, key=join_key(hosted.prefix, entry.path), model=name)


__all__ = ["Answer", "Cancel", "Hosted", "Plan", "Reject", "RequestHandler", "error_reply"]
