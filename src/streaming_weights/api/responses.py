"""Response bodies in OpenAI's shapes: whole completions, and server-sent-event chunk streams."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from .batcher import Delta, Done, Failed, GenRequest
from .errors import ApiError


@dataclass
class Shape:
    """Which endpoint's shapes to build: ``chat`` (chat.completion[.chunk]) or plain text_completion."""

    chat: bool
    model: str
    id: str = field(default="")
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = self.id or ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex

    def _envelope(self, obj: str, choices: list[dict[str, Any]], usage: dict[str, int] | None) -> dict[str, Any]:
        body = {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return body

    def whole(self, results: list[Done], usage: dict[str, int]) -> dict[str, Any]:
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": d.text},
                        "logprobs": None, "finish_reason": d.finish_reason} for i, d in enumerate(results)]
            return self._envelope("chat.completion", choices, usage)
        choices = [{"index": i, "text": d.text, "logprobs": None, "finish_reason": d.finish_reason}
                   for i, d in enumerate(results)]
        return self._envelope("text_completion", choices, usage)

    def chunk(self, index: int, text: str | None, finish_reason: str | None, *, role: bool = False,
              usage: dict[str, int] | None = None, empty: bool = False) -> dict[str, Any]:
        if empty:  # the closing usage chunk of stream_options.include_usage
            choices: list[dict[str, Any]] = []
        elif self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            choices = [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
        else:
            choices = [{"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}]
        return self._envelope("chat.completion.chunk" if self.chat else "text_completion", choices, usage)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(obj: dict[str, Any] | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


async def collect(reqs: list[GenRequest]) -> list[Done]:
    """Wait for every row's end; the first failure is raised (the caller cancels the others)."""
    queue = reqs[0].events
    done: dict[int, Done] = {}
    while len(done) < len(reqs):
        index, ev = await queue.get()
        if isinstance(ev, Failed):
            raise ev.error
        if isinstance(ev, Done):
            done[index] = ev
    return [done[i] for i in range(len(reqs))]


async def stream(reqs: list[GenRequest], shape: Shape, *, include_usage: bool) -> AsyncIterator[bytes]:
    """SSE chunks as the rows decode them, the final ones with ``finish_reason``, then ``[DONE]``."""
    queue = reqs[0].events
    prompt = sum(len(r.prompt_ids) for r in reqs)
    completion, finished = 0, 0
    extra = {"usage": None} if include_usage else {}
    if shape.chat:
        for i in range(len(reqs)):
            yield sse(shape.chunk(i, None, None, role=True) | extra)
    while finished < len(reqs):
        index, ev = await queue.get()
        if isinstance(ev, Delta):
            yield sse(shape.chunk(index, ev.text, None) | extra)
        elif isinstance(ev, Done):
            finished += 1
            completion += ev.completion_tokens
            yield sse(shape.chunk(index, None, ev.finish_reason) | extra)
        else:
            err: ApiError = ev.error
            yield sse(err.body())
            break
    else:
        if include_usage:
            yield sse(shape.chunk(0, None, None, empty=True, usage=usage(prompt, completion)))
    yield sse("[DONE]")
