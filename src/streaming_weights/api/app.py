"""The OpenAI-compatible ASGI app over one streaming model.

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (causal LMs),
``POST /v1/embeddings`` (encoders), ``GET /healthz`` (503 while the weights are unreachable), ``GET /metrics``.
Generation goes through a :class:`~.batcher.Batcher`, so concurrent requests share every streamed layer.
Stopping drains the requests in flight (:mod:`.lifecycle`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from dataclasses import dataclass
from typing import Any, Iterable

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .batcher import Batcher, GenRequest
from .embeddings import Embedder
from .errors import ApiError, from_exception, invalid, shutting_down
from .lifecycle import IDLE_WAIT_SECONDS, DrainReport, Lifecycle, probe_weights
from .metrics import ApiMetrics
from .prompts import PromptEncoder
from .responses import Shape, collect, stream, usage
from .schemas import ChatRequest, CompletionRequest, EmbeddingRequest, GenOptions, chat_messages, chat_options, \
    completion_options


@dataclass(frozen=True)
class ApiSettings:
    """Serving options.

    Attributes:
        window: seconds a new batch waits for more requests (tens of milliseconds).
        max_batch: most rows in one ``generate`` call.
        max_queue: most requests waiting for a batch; more get 429.
        speculation: passed to ``generate`` for batches that can use it (``None``: the model's default).
        default_max_tokens: new tokens of a chat request that gives no ``max_tokens`` (``None``: the model's
            generation config ``max_new_tokens`` / ``max_length``, else 256; never past the context).
        shutdown_grace: seconds requests in flight get to finish when the server stops; then they are
            cancelled with a 503.
    """

    window: float = 0.03
    max_batch: int = 8
    max_queue: int = 64
    speculation: str | int | None = None
    default_max_tokens: int | None = None
    shutdown_grace: float = 10.0


class _Service:
    """Everything the routes share: the model, its id, the batcher or embedder, auth and metrics."""

    def __init__(self, model: Any, model_id: str | None, tokens: Iterable[str] | None, settings: ApiSettings) -> None:
        self.model = model
        self.model_id = model_id or model.model_name
        self.tokens = [t.encode() for t in tokens or ()]
        self.settings = settings
        hf = model.hf_model
        self.generates = bool(hf.can_generate()) and not hf.config.is_encoder_decoder
        self.lifecycle = Lifecycle()
        self.metrics = ApiMetrics(queue_depth=lambda: (self.batcher or self.embedder).queued,
                                  in_flight=lambda: self.lifecycle.in_flight)
        self.batcher = Batcher(model, window=settings.window, max_batch=settings.max_batch,
                               max_queue=settings.max_queue, speculation=settings.speculation,
                               on_batch=self.metrics.record_batch, on_cancel=self.metrics.cancelled.inc) \
            if self.generates and model.tokenizer is not None else None
        self.embedder = None if self.generates else Embedder(model, max_queue=settings.max_queue)
        self.prompts = PromptEncoder(model.tokenizer, hf.config, getattr(hf, "generation_config", None),
                                     settings.default_max_tokens) if model.tokenizer is not None else None

    async def start(self) -> None:
        if self.batcher is not None:
            self.batcher.start()
        if self.embedder is not None:
            await self.embedder.prepare()

    async def drain(self) -> DrainReport:
        """Stop taking requests; let those in flight finish within the grace, then cancel them (503)."""
        async def cancel() -> None:
            if self.batcher is not None:
                self.batcher.cancel_all()  # answered now; stop() (the app's shutdown) waits for the model
            if self.embedder is not None:
                self.embedder.close()

        return await self.lifecycle.drain(self.settings.shutdown_grace, cancel)

    async def stop(self) -> None:
        await self.drain()
        if self.batcher is not None:  # a moment for the model to go idle, none if told to hurry (a second Ctrl-C)
            await self.batcher.stop(wait=0 if self.lifecycle.hurried else IDLE_WAIT_SECONDS)

    def check_model(self, name: str) -> None:
        if name != self.model_id:
            raise ApiError(404, f"The model `{name}` does not exist; this server serves `{self.model_id}`",
                           param="model", code="model_not_found")

    def need(self, generation: bool) -> None:
        if generation and (self.batcher is None or self.prompts is None):
            raise invalid(f"`{self.model_id}` is not a decoder-only language model with a tokenizer: "
                          "it serves /v1/embeddings", param="model", code="unsupported_model")
        if not generation and self.embedder is None:
            raise invalid(f"`{self.model_id}` is a generative model: use /v1/completions or /v1/chat/completions",
                          param="model", code="unsupported_model")

    def authorize(self, request: Request) -> None:
        if not self.tokens:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        given_b = given.strip().encode()
        # Compare against every token (no early exit), each in constant time.
        ok = False
        for t in self.tokens:
            ok |= hmac.compare_digest(given_b, t)
        if scheme.lower() != "bearer" or not ok:
            raise ApiError(401, "Incorrect or missing API key: send `Authorization: Bearer <token>`",
                           type="authentication_error", code="invalid_api_key")

    async def generate(self, request: Request, prompts: list[list[int]], opts: GenOptions, chat: bool) -> Response:
        assert self.batcher is not None and self.prompts is not None
        queue: asyncio.Queue = asyncio.Queue()
        reqs = [GenRequest(p, self.prompts.max_new(p, opts.max_tokens), opts.sampling, opts.stop, queue, index=i)
                for i, p in enumerate(prompts)]
        try:
            for r in reqs:
                self.batcher.submit(r)
        except ApiError:
            self._cancel(reqs)
            raise
        self.metrics.prompt_tokens.inc(sum(len(p) for p in prompts))
        shape = Shape(chat, self.model_id)
        if opts.stream:
            async def body():
                try:
                    async for chunk in stream(reqs, shape, include_usage=opts.include_usage):
                        yield chunk
                finally:  # also when the client disconnects (the stream task is cancelled)
                    self._cancel(reqs)

            return StreamingResponse(body(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            results = await _unless_disconnected(request, collect(reqs))
        finally:
            self._cancel(reqs)
        if results is None:  # nobody to answer; 499 (nginx's "client closed request") shows in the metrics
            return Response(status_code=499)
        total = sum(d.completion_tokens for d in results)
        return JSONResponse(shape.whole(results, usage(sum(len(p) for p in prompts), total)))

    def _cancel(self, reqs: list[GenRequest]) -> None:
        for r in reqs:
            self.batcher.cancel(r)


async def _unless_disconnected(request: Request, work: Any) -> Any:
    """Await ``work``; if the client disconnects first, cancel it and return ``None`` (its rows stop)."""
    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not task.done():
        task.cancel()
        return None
    return task.result()


def create_app(model: Any, *, model_id: str | None = None, tokens: Iterable[str] | None = None,
               settings: ApiSettings | None = None) -> FastAPI:
    """The ASGI app serving ``model``.

    Args:
        model: a loaded streaming model (build it outside a running event loop, or ``await
            model.ensure_loaded_async()`` first): causal LMs serve completions and chat, encoders embeddings.
        model_id: the name clients pass as ``model`` (default: the manifest's name).
        tokens: accepted bearer tokens; empty or ``None`` serves without authentication.
        settings: batching and queue options.
    """
    svc = _Service(model, model_id, tokens, settings or ApiSettings())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await svc.start()
        try:
            yield
        finally:
            await svc.stop()

    app = FastAPI(title="surfing-weights OpenAI-compatible API", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = svc
    app.state.drain = svc.drain  # ApiServer calls it first thing when stopping
    app.state.hurry = svc.lifecycle.hurry  # and this on a second Ctrl-C
    app.add_middleware(_CountRequests, metrics=svc.metrics, lifecycle=svc.lifecycle)
    _install_error_handlers(app, svc)
    _install_routes(app, svc)
    return app


def _install_routes(app: FastAPI, svc: _Service) -> None:
    auth = [Depends(svc.authorize)]

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        reason = "the server is shutting down" if svc.lifecycle.closing else await probe_weights(svc.model)
        if reason is not None:
            return JSONResponse({"status": "unavailable", "model": svc.model_id, "reason": reason}, status_code=503)
        return JSONResponse({"status": "ok", "model": svc.model_id})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(svc.metrics.render(), media_type=svc.metrics.content_type)

    @app.get("/v1/models", dependencies=auth)
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(svc)]}

    @app.get("/v1/models/{name:path}", dependencies=auth)
    async def get_model(name: str) -> dict[str, Any]:
        svc.check_model(name)
        return _model_card(svc)

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        svc.check_model(body.model)
        svc.need(generation=True)
        opts = completion_options(body)
        return await svc.generate(request, svc.prompts.completion(body.prompt, opts.max_tokens), opts, chat=False)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        svc.check_model(body.model)
        svc.need(generation=True)
        opts = chat_options(body)
        prompt = svc.prompts.chat(chat_messages(body), opts.max_tokens)
        return await svc.generate(request, [prompt], opts, chat=True)

    @app.post("/v1/embeddings", dependencies=auth)
    async def embeddings(body: EmbeddingRequest) -> dict[str, Any]:
        svc.check_model(body.model)
        svc.need(generation=False)
        return await svc.embedder.respond(body, svc.model_id)


def _model_card(svc: _Service) -> dict[str, Any]:
    return {"id": svc.model_id, "object": "model", "created": 0, "owned_by": "surfing-weights"}


def _install_error_handlers(app: FastAPI, svc: _Service) -> None:
    def reply(request: Request, err: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return reply(request, exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        msg = f"{param}: {first.get('msg', 'invalid request')}" if param else first.get("msg", "invalid request")
        return reply(request, invalid(msg, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found" if exc.status_code == 404 else None
        return reply(request, ApiError(exc.status_code, str(exc.detail), code=kind))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        return reply(request, from_exception(exc))



class _CountRequests:
    """Pure ASGI middleware counting answered requests by path and status (unknown paths count as "other",
    so random URLs cannot grow the metric without bound), and the model requests in flight (refused with a
    503 once the server is stopping). Pure ASGI keeps streaming and disconnects intact."""

    PATHS = frozenset({"/healthz", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions",
                       "/v1/embeddings"})
    WORK = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/embeddings"})

    def __init__(self, app: Any, metrics: ApiMetrics, lifecycle: Lifecycle) -> None:
        self.app, self.metrics, self.lifecycle = app, metrics, lifecycle

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        path = scope.get("path", "")
        label = path if path in self.PATHS else ("/v1/models" if path.startswith("/v1/models/") else "other")
        work = path in self.WORK
        try:
            if work and self.lifecycle.closing:
                err = shutting_down()
                await JSONResponse(err.body(), status_code=err.status)(scope, receive, send_status)
                return
            if work:
                self.lifecycle.entered()
            try:
                await self.app(scope, receive, send_status)
            finally:
                if work:
                    self.lifecycle.left()
        finally:
            self.metrics.requests.labels(label, str(status)).inc()
