"""Test doubles for code that streams models: :class:`FakeSource`, a unit source answered by a function.

The pattern of httpx's ``MockTransport``: every request the engine makes goes to ``handler(request)``,
whose answer is checked and decoded exactly as a real source's would be (BLAKE3 against the manifest,
zero-copy decode into a pooled buffer), so a test can serve a real chunk directory and inject delays,
errors or corrupt bytes where it wants::

    async def handler(req: FakeRequest):
        if req.op == "fetch_unit" and req.name == "model.layers.3":
            raise ConnectionResetError("injected")
        await asyncio.sleep(0.05)                 # a slow network
        return await req.forward()                # what the chunk directory holds

    source = FakeSource(handler, chunks_dir="chunks/llama")
    model = StreamingLlamaModel("llama", source)

``handler`` may be a plain function or a coroutine function. Answers: ``bytes``/``bytearray`` for
``fetch_unit`` and ``fetch_file`` (raw object bytes), a :class:`~streaming_weights.format.Manifest` for
``get_manifest``, a list of names for ``list_models``; ``None`` means "what ``forward()`` would answer".
Raising an exception makes the source raise it. ``source.requests`` lists every request, in order.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Union

from .client.base import FetchedUnit, UnitSource
from .client.verify import verify_and_decode, verify_blob
from .exceptions import ConfigurationError
from .format import Manifest, join_key
from .storage.catalog import discover_models, pick_model
from .storage import FilesystemBackend

__all__ = ["FakeRequest", "FakeSource", "passthrough"]

Answer = Union[bytes, bytearray, Manifest, list, None]
Handler = Callable[["FakeRequest"], Union[Answer, Awaitable[Answer]]]


@dataclass
class FakeRequest:
    """One call the engine made: ``op`` is ``list_models``, ``get_manifest``, ``fetch_unit``, ``fetch_file`` or ``close``;
    ``model`` the model name asked for; ``name`` the unit or file name (``None`` for the other ops)."""

    op: str
    model: str | None
    name: str | None = None
    manifest: Manifest | None = field(default=None, repr=False)
    _source: FakeSource | None = field(default=None, repr=False, compare=False)

    async def forward(self) -> Answer:
        """The answer of the backing chunk directory (``FakeSource(chunks_dir=...)``)."""
        if self._source is None or self._source.storage is None:
            raise ConfigurationError("FakeRequest.forward() needs FakeSource(..., chunks_dir=...)")
        storage = self._source.storage
        models = await self._source.catalog()
        if self.op == "list_models":
            return sorted(models)
        if self.op == "get_manifest":
            return models[pick_model(models, self.model, storage.location)][1]
        assert self.manifest is not None and self.name is not None
        entry = self.manifest.unit(self.name) if self.op == "fetch_unit" else self.manifest.file(self.name)
        return await storage.load(join_key(models[self.manifest.name][0], entry.path))


def passthrough(request: FakeRequest) -> None:
    """A handler answering everything from the backing chunk directory."""
    return None


class FakeSource(UnitSource):
    """A :class:`UnitSource` whose answers come from ``handler`` (see the module docstring).

    Args:
        handler: ``handler(request) -> answer`` (sync or async); default: serve ``chunks_dir`` unchanged.
        chunks_dir: a chunk directory backing :meth:`FakeRequest.forward` and ``None`` answers.
    """

    def __init__(self, handler: Handler = passthrough, *, chunks_dir: str | os.PathLike[str] | None = None) -> None:
        self.handler = handler
        self.storage = FilesystemBackend(chunks_dir) if chunks_dir is not None else None
        self._models: dict[str, tuple[str, Manifest]] | None = None
        self.location = f"fake:{chunks_dir}" if chunks_dir is not None else "fake:"
        self.requests: list[FakeRequest] = []
        self.closed = False

    async def catalog(self) -> dict[str, tuple[str, Manifest]]:
        """``{model name: (directory prefix, manifest)}`` of the backing chunk directory."""
        if self._models is None:
            self._models = await discover_models(self.storage)
        return self._models

    def fetched(self, op: str = "fetch_unit") -> list[str | None]:
        """Names asked for by ``op`` requests, in order (e.g. every unit fetch attempt)."""
        return [r.name for r in self.requests if r.op == op]

    async def _ask(self, op: str, model: str | None, name: str | None = None,
                   manifest: Manifest | None = None) -> Any:
        req = FakeRequest(op, model, name, manifest, self)
        self.requests.append(req)
        answer = self.handler(req)
        if inspect.isawaitable(answer):
            answer = await answer
        return await req.forward() if answer is None else answer

    async def list_models(self) -> list[str]:
        return list(await self._ask("list_models", None))

    async def get_manifest(self, model_name: str | None) -> Manifest:
        answer = await self._ask("get_manifest", model_name)
        return answer if isinstance(answer, Manifest) else Manifest.from_bytes(bytes(answer))

    async def fetch_unit(self, manifest: Manifest, unit: str) -> FetchedUnit:
        data = await self._ask("fetch_unit", manifest.name, unit, manifest)
        entry = manifest.unit(unit)
        # Copy into a pooled buffer as a real source receives into one (buffer reuse is exercised too).
        buf = self.new_buffer(len(data)) if len(data) == entry.bytes else bytearray(len(data))
        buf[:] = data
        return FetchedUnit(unit, verify_and_decode(entry, buf, self.location), entry.bytes, 0.0, buf)

    async def fetch_file(self, manifest: Manifest, name: str) -> bytes:
        data = bytes(await self._ask("fetch_file", manifest.name, name, manifest))
        verify_blob(manifest.file(name), data, self.location)
        return data

    async def close(self) -> None:
        """Asks the handler too (``op="close"``; its answer is ignored), so a test can make closing slow."""
        req = FakeRequest("close", None, _source=self)
        self.requests.append(req)
        answer = self.handler(req)
        if inspect.isawaitable(answer):
            await answer
        self.closed = True
        if self.storage is not None:
            await self.storage.close()
