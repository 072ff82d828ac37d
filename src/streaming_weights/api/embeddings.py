"""``/v1/embeddings`` over an encoder model's ``embed`` (mean pooling, issue 13), one request at a time."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

from .errors import ApiError, invalid
from .schemas import EmbeddingRequest

MAX_INPUTS = 2048  # OpenAI's limit per request


def _embed_fn(model: Any):
    fn = getattr(model, "embed", None)
    if fn is not None:
        return fn
    from ..models.embedding import embed  # the function behind the facade method

    return lambda texts: embed(model, texts)


class Embedder:
    """Runs embedding requests in a worker thread, one after another (each is already one large batch).

    Args:
        model: a loaded streaming encoder model.
        max_queue: most requests waiting; more are refused with 429.
    """

    def __init__(self, model: Any, *, max_queue: int = 64) -> None:
        self.model = model
        self.max_queue = max_queue
        self.queued = 0
        self._lock = asyncio.Lock()

    async def respond(self, body: EmbeddingRequest, model_id: str) -> dict[str, Any]:
        texts = self._texts(body)
        if self.queued >= self.max_queue:
            raise ApiError(429, f"the request queue is full ({self.queued} waiting); retry later",
                           type="requests", code="rate_limit_exceeded")
        self.queued += 1
        try:
            async with self._lock:
                vectors = await asyncio.to_thread(_embed_fn(self.model), texts)
        finally:
            self.queued -= 1
        tok = self.model.tokenizer
        limit = getattr(tok, "model_max_length", None) or 1 << 30
        n_tokens = sum(min(len(ids), limit) for ids in tok(texts)["input_ids"])
        data = [{"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)}
                for i, v in enumerate(vectors)]
        return {"object": "list", "data": data, "model": model_id,
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}

    @staticmethod
    def _texts(body: EmbeddingRequest) -> list[str]:
        if body.dimensions is not None:
            raise invalid("dimensions: this model's embedding size is fixed", param="dimensions",
                          code="unsupported_parameter")
        inp = body.input
        texts = [inp] if isinstance(inp, str) else list(inp)
        if not texts:
            raise invalid("input: must not be empty", param="input")
        if not all(isinstance(t, str) for t in texts):
            raise invalid("input: send text; token-id input is not supported here", param="input",
                          code="unsupported_parameter")
        if len(texts) > MAX_INPUTS:
            raise invalid(f"input: at most {MAX_INPUTS} texts per request, got {len(texts)}", param="input")
        if any(not t for t in texts):
            raise invalid("input: texts must not be empty strings", param="input")
        return texts


def _encode(vector: Any, fmt: str) -> list[float] | str:
    v = vector.detach().float().cpu()
    if fmt == "base64":  # what the official client asks for by default: little-endian float32 bytes
        return base64.b64encode(v.numpy().astype("<f4").tobytes()).decode()
    return v.tolist()
