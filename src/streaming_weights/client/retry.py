"""The one retry policy of the client, applied in one place (:class:`RetryingSource`).

Every other layer makes a single attempt per call: the transport (it reconnects on the next call),
``FailoverSource`` (one pass over its servers), the unit cache (none). So the number of attempts an
operation gets is ``max_retries + 1``, never a product of layers, and :meth:`RetryPolicy.deadline`
bounds how long one operation can take: the sync bridge uses it as its timeout.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from typing import Awaitable, Callable, TypeVar

from ..exceptions import (
    AuthenticationError,
    BadRequestError,
    BusyError,
    ConfigurationError,
    ConnectionFailedError,
    FetchTimeoutError,
    IntegrityError,
    KeyNotFoundError,
    NotFoundError,
    ProtocolError,
    RemoteError,
    StreamingWeightsError,
    TooLargeError,
    UnitFormatError,
    UnitUnavailableError,
)
from ..format import Manifest
from .base import FetchedUnit, SourceWrapper, UnitSource
from .verify import check_unchanged

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Errors no retry can fix: the server (or the configuration) would answer the same.
_NEVER = (AuthenticationError, NotFoundError, BadRequestError, TooLargeError, ConfigurationError, KeyNotFoundError)
#: Errors of the connection or a server's momentary state.
_TRANSIENT = (BusyError, ConnectionFailedError, FetchTimeoutError, ProtocolError, ConnectionError, OSError, TimeoutError)
#: Seconds allowed per attempt beyond ``timeout_seconds`` (verifying the last piece, scheduling).
_ATTEMPT_SLACK = 1.0


def is_transient(exc: BaseException, *, unit: bool = False) -> bool:
    """Whether another attempt may succeed where this one raised ``exc``.

    ``unit``: the call fetches a unit, whose integrity failures are retried too (a corrupted copy in a
    cache or in transit is refused, and the next attempt may get good bytes).
    """
    if isinstance(exc, _NEVER) or getattr(type(exc), "retryable", True) is False:  # a property of the class
        return False
    if isinstance(exc, RemoteError) and not isinstance(exc, BusyError):
        return exc.code == "internal"
    if isinstance(exc, _TRANSIENT):
        return True
    return unit and isinstance(exc, (IntegrityError, UnitFormatError, StreamingWeightsError))


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry a transient failure.

    Args:
        max_retries: attempts after the first.
        timeout_seconds: limit of one attempt (passed to the transport as its per-request timeout).
        base_delay, max_delay: exponential backoff between attempts (doubling from ``base_delay``, capped
            at ``max_delay``), with jitter down to half of it.

    Raises:
        ConfigurationError: a negative count or delay, or a non-positive timeout.
    """

    max_retries: int = 3
    timeout_seconds: float = 30.0
    base_delay: float = 0.1
    max_delay: float = 5.0

    def __post_init__(self) -> None:
        if self.max_retries < 0 or self.base_delay < 0 or self.max_delay < 0:
            raise ConfigurationError("max_retries and retry delays must be >= 0")
        if not self.timeout_seconds > 0:
            raise ConfigurationError(f"timeout_seconds must be > 0, got {self.timeout_seconds}")

    def backoff(self, retry: int) -> float:
        """The longest wait before retry number ``retry`` (1-based)."""
        return min(self.max_delay, self.base_delay * 2 ** (retry - 1))

    def delay(self, retry: int) -> float:
        """The (jittered) wait before retry number ``retry``: in ``[backoff/2, backoff]``."""
        cap = self.backoff(retry)
        return random.uniform(cap / 2, cap)

    def deadline(self, attempt_span: int = 1) -> float:
        """The longest one operation can take, all attempts and backoff included.

        ``attempt_span``: servers one attempt may try in turn, each up to ``timeout_seconds``
        (a ``FailoverSource`` over N servers: N).
        """
        attempt = attempt_span * self.timeout_seconds + _ATTEMPT_SLACK
        waits = sum(self.backoff(r) for r in range(1, self.max_retries + 1))
        return (self.max_retries + 1) * attempt + waits


class RetryingSource(SourceWrapper):
    """A :class:`UnitSource` that retries ``source``'s transient failures under ``policy``.

    Auth, not-found and bad-request errors propagate at once, unchanged. After the last attempt a unit
    fetch raises :class:`UnitUnavailableError` (the cause chained); other calls re-raise the last error.
    Wrapping a ``RetryingSource`` wraps its inner source (the retries never multiply).
    """

    def __init__(self, source: UnitSource, policy: RetryPolicy | None = None) -> None:
        while isinstance(source, RetryingSource):
            source = source.source
        super().__init__(source)
        self.policy = policy or RetryPolicy()
        #: Retries made so far (all calls).
        self.retries = 0

    def deadline(self) -> float:
        """:meth:`RetryPolicy.deadline` for this source: what the sync bridge waits at most."""
        return self.policy.deadline(self.attempt_span)

    async def _call(self, what: str, fn: Callable[[], Awaitable[T]], *, unit: bool = False) -> T:
        retry = 0
        while True:
            try:
                return await fn()
            except Exception as exc:
                if not is_transient(exc, unit=unit):
                    raise
                if retry >= self.policy.max_retries:
                    if unit:
                        kind = "failed verification" if isinstance(exc, (IntegrityError, UnitFormatError)) else "could not be fetched"
                        raise UnitUnavailableError(f"{what} {kind} after {retry + 1} attempts: {exc}") from exc
                    raise
                retry += 1
                self.retries += 1
                delay = self.policy.delay(retry)
                log.warning("%s failed (%s); retry %d/%d in %.2fs", what, exc, retry, self.policy.max_retries, delay)
                await asyncio.sleep(delay)

    async def list_models(self) -> list[str]:
        return await self._call("list models", self.source.list_models)

    async def get_manifest(self, model_name: str | None) -> Manifest:
        return await self._call("get manifest", lambda: self.source.get_manifest(model_name))

    async def fetch_unit(self, manifest: Manifest, unit: str) -> FetchedUnit:
        """The unit, retried; a unit that changed because the model was re-chunked since ``manifest`` was
        loaded raises :class:`ModelChangedError` at once (no retry can bring the old bytes back)."""
        async def attempt() -> FetchedUnit:
            try:
                return await self.source.fetch_unit(manifest, unit)
            except Exception as exc:
                await check_unchanged(self.source, manifest, unit, exc)
                raise

        return await self._call(f"unit {unit!r}", attempt, unit=True)

    async def fetch_file(self, manifest: Manifest, name: str) -> bytes:
        return await self._call(f"file {name!r}", lambda: self.source.fetch_file(manifest, name))

    async def __aenter__(self) -> RetryingSource:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


__all__ = ["RetryPolicy", "RetryingSource", "is_transient"]
