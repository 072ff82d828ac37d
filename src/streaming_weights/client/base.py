"""The interface the streaming engine fetches through: :class:`UnitSource` and :class:`FetchedUnit`.

Implementations: ``storage_source.StorageSource`` (a chunk directory or S3, no server),
``transport.WebSocketSource`` (a weight server), ``failover.FailoverSource`` (several servers) and
``retry.RetryingSource`` (retries any of them). Every implementation verifies a unit against the
manifest's BLAKE3 hash before decoding it, and decodes zero-copy (tensors view the receive buffer).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..format import Manifest
from .buffers import BufferPool
from .fingerprint import Fingerprints

if TYPE_CHECKING:
    import torch


@dataclass
class FetchedUnit:
    """A verified unit: ``tensors`` are views into ``buffer`` (which they keep alive)."""

    name: str
    tensors: dict[str, torch.Tensor]
    nbytes: int
    fetch_seconds: float = 0.0
    buffer: bytearray | None = field(default=None, repr=False)

    def recycle(self, pool: BufferPool | None) -> None:
        """Done with this unit: its tensors go, and its buffer is offered to ``pool`` for the next fetch (taken
        only once no tensor views it any more, :meth:`.BufferPool.give`)."""
        buf, self.buffer, self.tensors = self.buffer, None, {}
        if pool is not None:
            pool.give(buf)


class UnitSource(ABC):
    """Async interface the engine uses; all methods run on the client's transport event loop."""

    location: str = ""
    #: Where unit receive buffers come from (and return to once no tensor views them): given to the leaf
    #: sources' constructors (``open_unit_source(..., pool=)``); ``None``: plain ``bytearray`` s.
    buffer_pool: BufferPool | None = None
    #: Fingerprints of the units this source verified (:mod:`.fingerprint`): a refetched unit is checked
    #: against its own; shared by the leaf sources :func:`.open_unit_source` builds together.
    fingerprints: Fingerprints | None = None
    #: How many servers one call may try in turn (each up to its timeout): sizes the retry deadline.
    attempt_span: int = 1

    def new_buffer(self, size: int) -> bytearray:
        return self.buffer_pool.take(size) if self.buffer_pool is not None else bytearray(size)

    @abstractmethod
    async def list_models(self) -> list[str]: ...

    @abstractmethod
    async def get_manifest(self, model_name: str | None) -> Manifest:
        """The manifest of ``model_name`` (or of the only hosted model). Raises NotFoundError."""

    @abstractmethod
    async def fetch_unit(self, manifest: Manifest, unit: str) -> FetchedUnit:
        """Fetch, verify and decode one unit. Raises IntegrityError, NotFoundError, WeightServerError…"""

    @abstractmethod
    async def fetch_file(self, manifest: Manifest, name: str) -> bytes:
        """Fetch and verify an auxiliary file (tokenizer, generation config)."""

    async def close(self) -> None:
        pass


class SourceWrapper(UnitSource):
    """A source in front of another (``source``): its location, attempt span and buffer pool are the inner
    source's, and every call passes through unless the subclass overrides it."""

    def __init__(self, source: UnitSource) -> None:
        self.source = source

    @property
    def location(self) -> str:  # type: ignore[override]
        return self.source.location

    @property
    def attempt_span(self) -> int:  # type: ignore[override]
        return self.source.attempt_span

    @property
    def buffer_pool(self) -> BufferPool | None:  # type: ignore[override]
        return self.source.buffer_pool

    @property
    def fingerprints(self) -> Fingerprints | None:  # type: ignore[override]
        return self.source.fingerprints

    async def list_models(self) -> list[str]:
        return await self.source.list_models()

    async def get_manifest(self, model_name: str | None) -> Manifest:
        return await self.source.get_manifest(model_name)

    async def fetch_unit(self, manifest: Manifest, unit: str) -> FetchedUnit:
        return await self.source.fetch_unit(manifest, unit)

    async def fetch_file(self, manifest: Manifest, name: str) -> bytes:
        return await self.source.fetch_file(manifest, name)

    async def close(self) -> None:
        await self.source.close()


__all__ = ["FetchedUnit", "SourceWrapper", "UnitSource"]
