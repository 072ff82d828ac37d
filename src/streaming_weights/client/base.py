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


class UnitSource(ABC):
    """Async interface the engine uses; all methods run on the client's transport event loop."""

    location: str = ""
    #: Set by the engine: where unit receive buffers come from (and return to once no tensor views them).
    buffer_pool: BufferPool | None = None
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


__all__ = ["FetchedUnit", "UnitSource"]
