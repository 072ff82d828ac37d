"""``/v1/embeddings`` over an encoder model's ``embed``, one request at a time.

The pooling and normalization are the model's own (:mod:`.sentence`: a sentence-transformers model's
``modules.json``; mean pooling otherwise). An input longer than the model takes is refused with OpenAI's 400
(``context_length_exceeded``), never truncated.
"""

from __future__ import annotations

import asyncio
import base64
import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..client.bridge import in_running_loop
from .errors import ApiError, invalid, shutting_down
from .schemas import EmbeddingRequest
from .sentence import EmbeddingRecipe, input_limit, read_recipe

MAX_INPUTS = 2048  # OpenAI's limit per request


def _embed_fn(model: Any):
    fn = getattr(model, "embed", None)
    if fn is not None:
        return fn
    from ..models.embedding import embed  # the function behind the facade method

    return lambda texts, **kw: embed(model, texts, **kw)


class Embedder:
    """Runs embedding requests in a worker thread, one after another (each is already one large batch).

    Args:
        model: a loaded streaming encoder model.
        max_queue: most requests waiting; more are refused with 429.

    Raises:
        ModelError: (outside a running event loop, else from :meth:`prepare`) the model's sentence-transformers
            pipeline holds a step this server cannot apply.
    """

    def __init__(self, model: Any, *, max_queue: int = 64) -> None:
        self.model = model
        self.max_queue = max_queue
        self.queued = 0
        self._lock = asyncio.Lock()
        # Its own worker (not asyncio's default executor, which asyncio.run joins): an abandoned batch must not
        # hold up the server's stop.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="surfing-api-embed")
        self._closing: asyncio.Event | None = None
        self.recipe: EmbeddingRecipe | None = None
        if not in_running_loop():  # fail fast (the CLI reports a bad pipeline before serving)
            self.recipe = asyncio.run(read_recipe(model))

    async def prepare(self) -> None:
        """Read the model's embedding pipeline if that could not happen at construction (the app's start-up)."""
        self._closing = asyncio.Event()
        if self.recipe is None:
            self.recipe = await read_recipe(self.model)

    def close(self) -> None:
        """Shutting down: waiting and running requests are answered 503 now (the running batch is abandoned)."""
        if self._closing is not None:
            self._closing.set()
        self._worker.shutdown(wait=False)

    async def respond(self, body: EmbeddingRequest, model_id: str) -> dict[str, Any]:
        recipe = self.recipe or EmbeddingRecipe()
        texts = self._texts(body)
        if recipe.lowercase:
            texts = [t.lower() for t in texts]
        n_tokens = self._check_lengths(texts, recipe)
        if self.queued >= self.max_queue:
            raise ApiError(429, f"the request queue is full ({self.queued} waiting); retry later",
                           type="requests", code="rate_limit_exceeded")
        self.queued += 1
        try:
            vectors = await self._run(texts, recipe)
        finally:
            self.queued -= 1
        data = [{"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)}
                for i, v in enumerate(vectors)]
        return {"object": "list", "data": data, "model": model_id,
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}

    async def _run(self, texts: list[str], recipe: EmbeddingRecipe) -> Any:
        async with self._lock:
            if self._closing is not None and self._closing.is_set():
                raise shutting_down()
            embed = functools.partial(_embed_fn(self.model), texts, pooling=recipe.pooling, normalize=recipe.normalize)
            work = asyncio.get_running_loop().run_in_executor(self._worker, embed)
            closing = asyncio.ensure_future(self._closing.wait()) if self._closing is not None else None
            try:
                await asyncio.wait({work} | ({closing} if closing else set()), return_when=asyncio.FIRST_COMPLETED)
            finally:
                if closing is not None:
                    closing.cancel()
            if not work.done():  # the thread runs on to its end; nobody waits for it
                work.add_done_callback(lambda f: f.cancelled() or f.exception())
                raise shutting_down()
            return work.result()

    def _check_lengths(self, texts: list[str], recipe: EmbeddingRecipe) -> int:
        """The inputs' total tokens; OpenAI's 400 for the first one longer than the model takes."""
        limit, why = input_limit(self.model, recipe)
        lengths = [len(ids) for ids in self.model.tokenizer(texts)["input_ids"]]
        for i, n in enumerate(lengths):
            if n > limit:
                where = "input" if len(texts) == 1 else f"input[{i}]"
                raise invalid(f"This model's maximum input length is {limit} tokens ({why}); however, {where} has "
                              f"{n} tokens. Please shorten it or split it into several inputs.", param="input",
                              code="context_length_exceeded")
        return sum(lengths)

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
