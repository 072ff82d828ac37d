"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` with the matching HTTP status."""

from __future__ import annotations

from typing import Any

from ..exceptions import StreamingWeightsError


class ApiError(StreamingWeightsError):
    """A request the API answers with an error body instead of a result.

    Args:
        status: HTTP status (400 invalid parameter, 401 bad token, 404 unknown model, 429 queue full, 5xx).
        message: what went wrong and what to change, for the caller.
        type: OpenAI's error type (``invalid_request_error``, ``authentication_error``, ``server_error``...).
        param: the request field at fault, if any.
        code: OpenAI's machine-readable code (``model_not_found``, ``invalid_api_key``...).
    """

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",  # noqa: A002
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    """A 400 for a parameter the caller must change."""
    return ApiError(400, message, param=param, code=code)


def shutting_down() -> ApiError:
    """A 503 for a request the server will not finish because it is stopping (Ctrl-C / SIGTERM)."""
    return ApiError(503, "the server is shutting down; retry against a running instance", type="server_error",
                    code="server_shutting_down")


def from_exception(exc: BaseException) -> ApiError:
    """Map a failure inside generation to the error a client sees (the message stays, the traceback does not)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, StreamingWeightsError):
        # The weights could not be fetched or verified: the server is alive but cannot answer now.
        return ApiError(503, f"{type(exc).__name__}: {exc}", type="server_error", code="weights_unavailable")
    return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error", code="internal_error")
