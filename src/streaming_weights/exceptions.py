"""The one exception tree of streaming_weights.

::

    StreamingWeightsError
    ├── ConfigurationError            bad option / environment value
    │   ├── UnknownOptionError        an option name that does not exist (also TypeError)
    │   └── ContextLengthError        prompt + new tokens beyond the model's positions (max_position_embeddings)
    ├── FormatError                   chunk format problems
    │   ├── ManifestError             missing / malformed / inconsistent manifest.json
    │   │   └── ManifestLimitError    a manifest beyond a hard limit (sizes, counts, depth; also SecurityError)
    │   └── UnitFormatError           a unit file that does not match its manifest entry
    ├── StorageError                  storage backend failures
    │   ├── KeyNotFoundError          the key does not exist
    │   └── InvalidKeyError           key escapes the backend root or is malformed  (also SecurityError)
    ├── SecurityError                 anything refused for safety reasons
    │   ├── UnsafeFormatError         pickle or other code-executing formats
    │   ├── AuthenticationError       missing / wrong token
    │   └── SignatureError            unsigned / wrongly signed / unpinned manifest while trust is configured
    ├── IntegrityError                fetched bytes do not match the manifest's hash
    │   └── ModelChangedError         ... because the model was re-chunked since its manifest was loaded
    ├── WeightServerError             failures reported by or talking to a weight server
    │   ├── ProtocolError             malformed / unexpected messages
    │   ├── RemoteError               typed error response from the server (``code`` attribute)
    │   │   ├── NotFoundError         unknown model / unit
    │   │   ├── BadRequestError
    │   │   ├── TooLargeError
    │   │   └── BusyError             server limits hit
    │   ├── ConnectionFailedError     could not connect after the retries
    │   └── FetchTimeoutError         a request did not complete within timeout_seconds (also TimeoutError)
    ├── CacheError                    unit cache misuse (e.g. a negative size)
    ├── ModelError                    model construction / architecture problems
    │   ├── UnsupportedArchitectureError
    │   ├── SyncCallInEventLoopError  a blocking method called inside a running event loop (also RuntimeError)
    │   └── UnitUnavailableError      a unit could not be fetched or verified after retries
    └── ChunkingError                 the chunker could not read or map a source
"""

from __future__ import annotations


class StreamingWeightsError(Exception):
    """Base class of every error raised by streaming_weights."""


class ConfigurationError(StreamingWeightsError, ValueError):
    pass


class UnknownOptionError(ConfigurationError, TypeError):
    """An option (keyword argument or config field) that does not exist; the message names it."""


class ContextLengthError(ConfigurationError):
    """A request that would run past the model's context: its prompt plus ``max_new_tokens`` exceed
    ``max_position_embeddings`` (checked before anything is planned or fetched)."""


class FormatError(StreamingWeightsError):
    pass


class ManifestError(FormatError):
    pass


class UnitFormatError(FormatError):
    pass




class StorageError(StreamingWeightsError):
    pass


class KeyNotFoundError(StorageError, KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "key not found"


class SecurityError(StreamingWeightsError):
    pass


class InvalidKeyError(StorageError, SecurityError):
    pass


class UnsafeFormatError(SecurityError):
    pass


class AuthenticationError(SecurityError):
    pass


class ManifestLimitError(ManifestError, SecurityError):
    """A manifest declares more than a hard limit allows (refused before anything is allocated for it)."""


class SignatureError(SecurityError):
    """A manifest whose signature (or pinned SHA-256) does not check out against the trusted keys."""


class IntegrityError(StreamingWeightsError):
    pass


class ModelChangedError(IntegrityError):
    """A unit no longer matches the manifest the client loaded because the model was re-chunked (its stored
    manifest changed): load the model again. Never retried: every copy of the unit is the new one."""

    retryable = False


class WeightServerError(StreamingWeightsError):
    pass


class ProtocolError(WeightServerError):
    pass


class RemoteError(WeightServerError):
    """An error response from the server; ``code`` is the protocol's error code."""

    code = "error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class NotFoundError(RemoteError):
    code = "not_found"


class BadRequestError(RemoteError):
    code = "bad_request"


class TooLargeError(RemoteError):
    code = "too_large"


class BusyError(RemoteError):
    code = "busy"


class ConnectionFailedError(WeightServerError, ConnectionError):
    pass


class HandshakeRefusedError(ConnectionFailedError):
    """The weight server answered the WebSocket handshake with an HTTP error: it would answer the same again."""

    retryable = False


class TLSVerificationError(ConnectionFailedError):
    """The server's TLS certificate was rejected (pass ``ca_cert=`` / ``--ca-cert`` for a private CA)."""

    retryable = False


class FetchTimeoutError(WeightServerError, TimeoutError):
    pass


class CacheError(StreamingWeightsError):
    pass


class ModelError(StreamingWeightsError):
    pass


class UnsupportedArchitectureError(ModelError):
    pass


class SyncCallInEventLoopError(ModelError, RuntimeError):
    """A blocking model method was called from inside a running event loop; use its ``_async`` variant."""


class UnitUnavailableError(ModelError):
    pass


class QuantizationError(UnitFormatError):
    """A unit's quantization metadata or companion tensors are malformed (never retried: the bytes
    matched the manifest's hash, so another copy would be the same)."""

    retryable = False


class ChunkingError(StreamingWeightsError):
    pass


class ModelExistsError(ChunkingError):
    """The chunk target already holds another model (or an unreadable manifest); pass ``force=True``."""


class CheckpointError(ChunkingError, StorageError):
    """A Hugging Face checkpoint folder served as it is (no chunk step) cannot be read: a truncated or corrupted
    safetensors file, a header whose ranges overlap or run past the file, a config that does not match the
    tensors, or a file that changed while it was read. It concerns that one model; the others keep serving."""


__all__ = [name for name in dir() if name.endswith("Error")]
