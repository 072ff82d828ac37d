"""Request batching: concurrent requests share one ``generate`` call, so each streamed layer serves them all.

Schedule ("form the next batch", not continuous batching): the first request that arrives at an idle
batcher opens a window (``window`` seconds); when it closes, or ``max_batch`` compatible requests wait,
they run as ONE left-padded ``generate`` call in a worker thread. Requests arriving meanwhile queue and form
the next batch as soon as the running one ends (they have waited longer than the window already).
Compatible = same sampling: all greedy rows together; sampled rows with equal ``(temperature, top_p)``; a
seeded sampled request alone (a row's random draws depend on its batch, so a seed would not reproduce).

Per row, a stopping criterion (it sees every new token of every row before ``generate`` decides whether to
go on) decodes the tokens incrementally, applies ``max_tokens``, EOS and ``stop`` strings, and pushes text
deltas to the request's asyncio queue; a row that finishes or whose client went away stops there.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from .detok import RowText
from ..exceptions import ModelError
from ..models import text
from .errors import ApiError, from_exception, shutting_down
from .schemas import Sampling

_uid = itertools.count()


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Done:
    finish_reason: str      # "stop" (EOS or a stop string) or "length"
    completion_tokens: int
    text: str               # the whole completion (what the deltas add up to)


@dataclass(frozen=True)
class Failed:
    error: ApiError


Event = Delta | Done | Failed


@dataclass(eq=False)
class GenRequest:
    """One row to generate.

    ``events`` receives ``(index, Delta)``... then exactly one ``(index, Done)`` or ``(index, Failed)``; the
    rows of one HTTP request (several prompts) share one queue and tell their events apart by ``index``.
    """

    prompt_ids: list[int]
    max_tokens: int
    sampling: Sampling
    stop: tuple[str, ...] = ()
    events: asyncio.Queue[tuple[int, Event]] = field(default_factory=asyncio.Queue)
    index: int = 0
    uid: int = field(default_factory=lambda: next(_uid))
    arrival: float = 0.0
    cancelled: bool = False  # set from the event loop, read by the worker thread (a plain flag is enough)
    finished: bool = False   # set by the worker thread once Done/Failed is queued

    @property
    def key(self) -> tuple:
        s = self.sampling
        if s.greedy:
            return ("greedy",)
        return ("seeded", self.uid) if s.seed is not None else ("sample", s.temperature, s.top_p)


class _Row:
    """Worker-thread state of one row of a running batch."""

    def __init__(self, req: GenRequest, tokenizer: Any, emit: Callable[[GenRequest, Event], None]) -> None:
        self.req = req
        self.text = RowText(tokenizer, req.stop)
        self.emit = emit
        self.count = 0
        self.done = False

    def feed(self, ids: list[int], eos: frozenset[int]) -> None:
        if self.done:
            return
        if self.req.cancelled:
            self.done = True  # nobody listens any more: just stop computing this row
            return
        keep: list[int] = []
        eos_hit = False
        for tok in ids:  # several tokens arrive at once when speculation accepted a draft
            if tok in eos:
                eos_hit = True
                break
            keep.append(tok)
            if self.count + len(keep) >= self.req.max_tokens:
                break
        self.count += len(keep) + eos_hit  # the EOS token was generated too (OpenAI counts it)
        delta = self.text.add(keep) if keep else ""
        if delta:
            self.emit(self.req, Delta(delta))
        if eos_hit or self.text.stopped:
            self.finish("stop")
        elif self.count >= self.req.max_tokens:
            self.finish("length")

    def finish(self, reason: str) -> None:
        self.done = self.req.finished = True
        tail = self.text.flush()
        if tail:
            self.emit(self.req, Delta(tail))
        self.emit(self.req, Done(reason, self.count, self.text.text))


class _BatchCriteria(StoppingCriteria):
    """Feeds each step's new tokens to the rows; returns which rows are finished (a per-row bool tensor)."""

    def __init__(self, rows: list[_Row], prompt_len: int, eos: frozenset[int]) -> None:
        self.rows, self.seen, self.eos = rows, prompt_len, eos

    def __deepcopy__(self, memo: dict) -> _BatchCriteria:
        return self  # transformers may copy criteria lists; the rows' state must stay shared

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        new = input_ids[:, self.seen:].tolist()
        self.seen = input_ids.shape[1]
        for row, ids in zip(self.rows, new):
            row.feed(ids, self.eos)
        return torch.tensor([r.done for r in self.rows], dtype=torch.bool, device=input_ids.device)


class QueueFullError(ApiError):
    def __init__(self, size: int) -> None:
        super().__init__(429, f"the request queue is full ({size} waiting); retry later",
                         type="requests", code="rate_limit_exceeded")


class Batcher:
    """Batches :class:`GenRequest` rows over one streaming causal-LM model.

    Args:
        model: a streaming causal-LM model (``generate``, ``tokenizer``, ``hf_model``, ``get_inference_stats``).
        window: seconds a batch waits for more arrivals after its first request.
        max_batch: most rows in one ``generate`` call.
        max_queue: most requests waiting (not yet running); more are refused with 429.
        speculation: passed to ``model.generate`` when it takes that option (``None``: the model's default).
        on_batch: called (worker thread) after each batch with ``(rows, tokens, bytes_fetched, seconds)``.
        on_cancel: called (event loop) for each request cancelled before its end.
    """

    def __init__(self, model: Any, *, window: float = 0.03, max_batch: int = 8, max_queue: int = 64,
                 speculation: str | int | None = None,
                 on_batch: Callable[[int, int, int, float], None] | None = None,
                 on_cancel: Callable[[], None] | None = None) -> None:
        self.model, self.window, self.max_batch, self.max_queue = model, window, max_batch, max_queue
        self._on_batch, self._on_cancel = on_batch, on_cancel
        self._pending: deque[GenRequest] = deque()
        self._arrived = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._running: list[GenRequest] = []
        self._busy: asyncio.Future | None = None  # the worker thread's batch, while one runs
        self._closed = False  # cancel_all() ran: the server is stopping, nothing new is taken
        # A worker of its own, not asyncio's default executor: asyncio.run() joins that one when the server
        # stops, so a batch stuck on a fetch would hold the stop until the fetch times out (closing the
        # model after the server ends it instead).
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="surfing-api-batch")
        self._tok = tok = model.tokenizer
        eos = text.eos_ids(model.hf_model.generation_config, tok)  # the same EOS set as generate_text
        try:
            self._pad = text.pad_id(tok, eos)  # padding is masked out
        except ModelError as exc:
            raise ModelError(f"{model.model_name!r}: {exc}") from None
        self._eos = frozenset(eos)
        self._extra: dict[str, Any] = {}
        if speculation is not None and "speculation" in inspect.signature(model.generate).parameters:
            self._extra["speculation"] = speculation

    # ------------------------------------------------------------------------------- event loop side
    @property
    def queued(self) -> int:
        return len(self._pending)

    def submit(self, req: GenRequest) -> GenRequest:
        """Queue a row (call from the event loop). Raises :class:`QueueFullError` when the queue is full, and a
        503 once :meth:`cancel_all` ran."""
        if self._closed:
            raise shutting_down()
        if len(self._pending) >= self.max_queue:
            raise QueueFullError(len(self._pending))
        if self._task is None or self._task.done():
            raise ApiError(503, "the generation worker is not running", type="server_error")
        req.arrival = asyncio.get_running_loop().time()
        self._pending.append(req)
        self._arrived.set()
        return req

    def cancel(self, req: GenRequest) -> None:
        """The client went away (or the request is over): drop a waiting row, or stop a running one at its
        next token. Cancelling a finished row does nothing."""
        if req.cancelled or req.finished:
            return
        req.cancelled = True
        with contextlib.suppress(ValueError):
            self._pending.remove(req)
        if self._on_cancel is not None:
            self._on_cancel()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="surfing-api-batcher")

    def cancel_all(self) -> int:
        """Answer every waiting and running row with a 503 now; running rows stop computing at their next
        token; rows submitted later are refused the same way. Returns how many rows were answered."""
        self._closed = True
        closing = shutting_down()
        victims = [r for r in [*self._pending, *self._running] if not (r.cancelled or r.finished)]
        for req in victims:
            req.cancelled = True
            # The worker may still queue this row's Done after it: readers stop at the first end event.
            req.events.put_nowait((req.index, Failed(closing)))
        self._pending.clear()
        return len(victims)

    async def stop(self, wait: float = 10.0) -> None:
        """:meth:`cancel_all`, then wait up to ``wait`` seconds for the running batch to end, so the model is
        idle when the caller closes it (a batch stuck on a fetch is abandoned). Idempotent."""
        self.cancel_all()
        if self._busy is not None:
            await asyncio.wait({self._busy}, timeout=wait)
        self._worker.shutdown(wait=False)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch(loop)
            self._running = batch
            self._busy = loop.run_in_executor(self._worker, self._run_batch, batch, loop)
            try:
                await asyncio.shield(self._busy)  # stop() cancels this task, never the batch in its thread
            finally:
                self._running, self._busy = [], None

    async def _next_batch(self, loop: asyncio.AbstractEventLoop) -> list[GenRequest]:
        while True:
            if not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            first = self._pending[0]
            same = [r for r in self._pending if r.key == first.key][: self.max_batch]
            remaining = first.arrival + self.window - loop.time()
            if remaining > 0 and len(same) < self.max_batch:
                self._arrived.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                continue
            for r in same:
                self._pending.remove(r)
            return same

    # ---------------------------------------------------------------------------- worker thread side
    def _run_batch(self, batch: list[GenRequest], loop: asyncio.AbstractEventLoop) -> None:
        def emit(req: GenRequest, ev: Event) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: the server stopped, nobody listens
                loop.call_soon_threadsafe(req.events.put_nowait, (req.index, ev))

        rows = [_Row(r, self._tok, emit) for r in batch]
        stats = self.model.get_inference_stats
        before, t0 = stats()["bytes_fetched"], loop.time()
        try:
            self._generate(batch, rows)
        except BaseException as exc:  # noqa: BLE001 - every waiting client gets the error, the server lives on
            err = from_exception(exc)
            for row in rows:
                if not row.done:
                    row.done = row.req.finished = True
                    emit(row.req, Failed(err))
            if not isinstance(exc, Exception):
                raise
        for row in rows:
            if not row.done:  # generate ended before the row's own limit (e.g. the model's length limit)
                row.finish("length")
        if self._on_batch is not None:
            self._on_batch(len(rows), sum(r.count for r in rows), stats()["bytes_fetched"] - before,
                           loop.time() - t0)

    def _generate(self, batch: list[GenRequest], rows: list[_Row]) -> None:
        ids, mask = text.left_pad([r.prompt_ids for r in batch], self._pad)
        width = ids.shape[1]
        sampling = batch[0].sampling
        criteria = StoppingCriteriaList([_BatchCriteria(rows, width, self._eos)])
        kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=max(r.max_tokens for r in batch),
                      pad_token_id=self._pad, stopping_criteria=criteria, **sampling.generate_kwargs(),
                      **self._extra)
        # One generate at a time (the batcher's loop awaits each), so seeding the global RNG inside a
        # forked RNG state is safe and leaves the process's RNG untouched.
        with torch.random.fork_rng(devices=[]), _seeded(sampling.seed):
            self.model.generate(**kwargs)


@contextlib.contextmanager
def _seeded(seed: int | None):
    if seed is not None:
        torch.manual_seed(seed)
    yield


__all__ = ["Batcher", "Delta", "Done", "Failed", "GenRequest", "QueueFullError"]
