"""``StreamingBaseModel``: any chunked transformers model, run by transformers itself with streamed weights.

The model is transformers' own class (named in the manifest) built on ``meta`` by :mod:`.loader`;
every streamed block is fed by the :class:`~.engine.StreamingEngine`. Forward passes, ``generate``
and KV caches are transformers' code paths, unchanged. This module is the public facade only:
options (:class:`~streaming_weights.config.StreamingConfig`), loading on demand (explicit
:meth:`~StreamingBaseModel.ensure_loaded`), the sync and async API, stats and the lifecycle.
"""

from __future__ import annotations

import asyncio
import os
import threading
from functools import partial
from typing import Any, Callable

import torch

from ..config import StreamingConfig
from ..exceptions import ModelError
from ..format import Manifest
from . import embedding, generation, validation
from ..client.bridge import guard_sync, in_running_loop
from .engine import StreamingEngine
from .loader import LoadedModel, load_model


def _as_ids(x: Any) -> Any:
    if x is None or isinstance(x, torch.Tensor):
        return x
    t = torch.as_tensor(x)
    return t.unsqueeze(0) if t.dim() == 1 else t


class StreamingBaseModel:
    """Run a chunked model whose weights stream from a weight server, S3 or a local chunk directory.

    Args:
        model_name: the manifest's model name (``None``: the only model the source hosts).
        websocket_uri: ``ws://``/``wss://`` server, a list of servers (failover), ``s3://bucket/prefix``,
            a local chunk directory or a :class:`~streaming_weights.client.UnitSource`.
            Default: ``config.server_uri``, else ``config.websocket_uri`` (``ws://localhost:8765``).
        cache_size: streamed units kept between uses (resident parts, in-flight prefetches and the unit
            computing now are not counted). Changeable at run time: ``model.cache_size = 5``.
        config: a :class:`StreamingConfig` supplying every option not passed explicitly
            (default: :meth:`StreamingConfig.from_env`).
        chunks_dir: read chunks from this directory instead of a server (original keyword).
        **options: any :class:`StreamingConfig` field: ``prefetch_count``, ``cache_policy`` (``"order"`` or
            ``"lru"``), ``cache_size_mb``, ``token`` (default ``$SURFING_TOKEN``), ``timeout_seconds``,
            ``max_retries``, ``monitor`` (a :class:`StreamingMonitor`), ``ssl_context``, ``trace``…

    Outside an event loop the model loads in the constructor (errors surface right there); inside one,
    loading waits for ``async with``, :meth:`ensure_loaded_async` or the first ``*_async`` call.

    Raises:
        UnknownOptionError: an option that does not exist (also a ``TypeError``).
        NotFoundError: the source does not host ``model_name`` (the message lists what it hosts).
        UnsupportedArchitectureError: the manifest's architecture is not one this class runs.
        ConnectionFailedError, AuthenticationError, IntegrityError, UnitUnavailableError.
    """

    #: model_type values this class accepts (empty: any).
    families: frozenset[str] = frozenset()

    def __init__(self, model_name: str | None = None, websocket_uri: Any = None, cache_size: int | None = None, *,
                 config: StreamingConfig | None = None, chunks_dir: str | os.PathLike[str] | None = None,
                 **options: Any) -> None:
        uri = websocket_uri if websocket_uri is not None else (str(chunks_dir) if chunks_dir else None)
        cfg = StreamingConfig.resolve(config, model_name=model_name, server_uri=uri, cache_size=cache_size, **options)
        self.config = cfg
        self.model_name = cfg.model_name
        self.websocket_uri = cfg.location
        self.monitor = cfg.monitor
        self._closed = False
        self._loaded: LoadedModel | None = None
        self._load_lock = threading.Lock()
        self._drafts = generation.DraftCounter()
        self.engine = StreamingEngine(cfg)
        if not in_running_loop():
            self.ensure_loaded()  # plain sync use: fail fast, right here
        # Inside a running event loop loading waits: blocking that loop here would deadlock a weight
        # server running on it.

    # ------------------------------------------------------------------------------------ loading
    def ensure_loaded(self) -> None:
        """Fetch the manifest, build the model, load resident parts (once; idempotent; the tokenizer: on first use).

        Raises:
            SyncCallInEventLoopError: called inside a running event loop before loading; use
                ``await model.ensure_loaded_async()`` (or ``async with model``).
            ModelError: the model was closed; plus whatever loading raises (the model is closed then).
        """
        if self._loaded is not None:
            return
        self._ensure_open()
        guard_sync("loading a model", "await model.ensure_loaded_async()` or `async with model")
        with self._load_lock:
            if self._loaded is not None:
                return
            try:
                self._loaded = load_model(self.engine, self.model_name, self.families, type(self).__name__)
            except BaseException:
                self.close()
                raise
            self.model_name = self._loaded.manifest.name

    async def ensure_loaded_async(self) -> None:
        """:meth:`ensure_loaded` without blocking the running event loop."""
        if self._loaded is None:
            self._ensure_open()
            await asyncio.to_thread(self.ensure_loaded)

    def _part(self) -> LoadedModel:
        self.ensure_loaded()
        assert self._loaded is not None
        return self._loaded

    @property
    def manifest(self) -> Manifest:
        """The model's manifest (loads the model first if needed)."""
        return self._part().manifest

    @property
    def hf_model(self) -> torch.nn.Module:
        """transformers' model with streamed weights (loads the model first if needed). Calling it directly
        streams and counts like :meth:`forward`."""
        return self._part().hf_model

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer, or ``None`` when the chunks carry none (loads the model first if needed). Built on
        first access (callers that only pass token ids never build it); under a memory budget the kept units make
        room for it then."""
        return self._part().tokenizer

    @property
    def source(self) -> Any:
        """The unit source the engine reads from (wrapped in the retry policy)."""
        return self.engine.source

    @property
    def base_model(self) -> torch.nn.Module:
        """The transformers base model (``LlamaModel`` inside ``LlamaForCausalLM``…)."""
        return self.hf_model.base_model

    @property
    def prefetch_count(self) -> int:
        return self.config.prefetch_count

    @property
    def timeout_seconds(self) -> float:
        return self.config.timeout_seconds

    @property
    def max_retries(self) -> int:
        return self.config.max_retries

    # Private aliases kept for tests written against the single-class version.

    # ------------------------------------------------------------------------------------ compute
    def _forward_impl(self, **kwargs: Any) -> Any:
        return self.base_model(**kwargs)

    def _sync_guard(self, method: str) -> None:
        """Raise :class:`SyncCallInEventLoopError` if blocking ``method`` runs inside an event loop."""
        guard_sync(f"{type(self).__name__}.{method}()", f"await model.{method}_async(...)")

    def _timed(self, kind: str, fn: Callable[[], Any], tokens_of: Callable[[Any], int] | None = None) -> Any:
        """Run ``fn`` (without autograd) as one counted inference of ``kind``; nested model calls belong to it."""
        self._ensure_open()
        self.ensure_loaded()
        tokens = 0
        self.engine.enter(kind)
        try:
            with torch.no_grad():
                out = fn()
            tokens = tokens_of(out) if tokens_of else 0
            return out
        finally:
            self.engine.exit(tokens)

    def forward(self, input_ids: Any = None, attention_mask: Any = None, *, enable_prefetch: bool = True,
                **kwargs: Any) -> Any:
        """Synchronous forward; returns what the transformers base model returns for the same weights.

        Raises:
            SyncCallInEventLoopError: called inside a running event loop (use :meth:`forward_async`).
        """
        self._sync_guard("forward")
        engine = self.engine

        def run() -> Any:
            engine.prefetch_enabled = enable_prefetch
            try:
                return self._forward_impl(input_ids=_as_ids(input_ids), attention_mask=_as_ids(attention_mask),
                                          **{k: _as_ids(v) if k.endswith("_ids") else v for k, v in kwargs.items()})
            finally:
                engine.prefetch_enabled = True

        return self._timed("forward", run)

    __call__ = forward

    async def forward_async(self, input_ids: Any = None, attention_mask: Any = None, *,
                            enable_prefetch: bool = True, **kwargs: Any) -> Any:
        """Async forward: compute runs in a worker thread, I/O on the engine's own loop."""
        await self.ensure_loaded_async()
        return await asyncio.to_thread(self.forward, input_ids, attention_mask,
                                       enable_prefetch=enable_prefetch, **kwargs)

    def generate(self, *args: Any, speculation: str | int | None = None, **kwargs: Any) -> Any:
        """``hf_model.generate`` with streamed weights: same arguments, same result as transformers.

        ``speculation`` (default ``config.speculation``, ``"auto"``): greedy single-sequence calls draft
        from the context (transformers' prompt lookup) and verify a whole draft per fetch of the weights;
        ``"off"`` decodes one token per pass; N sets the draft length. ``assistant_model`` may be a
        transformers model or another streaming model. See :mod:`.generation`.

        Raises:
            SyncCallInEventLoopError: called inside a running event loop (use :meth:`generate_async`).
            ConfigurationError: an invalid ``speculation``, ``temperature`` < 0, ``top_p`` outside (0, 1], or an
                empty prompt (``input_ids`` of length 0: a tokenizer without BOS encodes ``""`` to nothing).
            ContextLengthError: one sequence's prompt + ``max_new_tokens`` exceed the model's
                ``max_position_embeddings`` (checked before the memory plan; batches: see ``generate_text``).
        """
        self._sync_guard("generate")
        if "input_ids" in kwargs:
            kwargs["input_ids"] = _as_ids(kwargs["input_ids"])
        ids = kwargs.get("input_ids", args[0] if args else None)
        hf = self.hf_model
        prompt_len = ids.shape[-1] if isinstance(ids, torch.Tensor) and not hf.config.is_encoder_decoder else 0
        setting = generation.parse_speculation(self.config.speculation if speculation is None else speculation)
        own_lookup = "prompt_lookup_num_tokens" in kwargs
        kwargs = generation.prepare_generate(hf, args, kwargs, setting)
        validation.check_sampling(kwargs)
        if isinstance(ids, torch.Tensor):  # checked before planning; then, under a budget, room for its KV cache
            generation.check_request(hf, kwargs, ids)
            generation.fit_request(self, generation.request_tokens(hf, kwargs, ids.shape[-1]),
                                   int(ids.shape[0]) if ids.dim() >= 2 else 1)
        adaptive = setting == "auto" and not own_lookup and "prompt_lookup_num_tokens" in kwargs

        def tokens_of(out: Any) -> int:
            seq = out.sequences if hasattr(out, "sequences") else out
            return int(seq.shape[-1] - prompt_len) * int(seq.shape[0]) if isinstance(seq, torch.Tensor) else 0

        def run() -> Any:
            with generation.counting_drafts(hf, self._drafts, adaptive=adaptive):
                return hf.generate(*args, **kwargs)

        return self._timed("generate", run, tokens_of)

    async def generate_async(self, *args: Any, **kwargs: Any) -> Any:
        """:meth:`generate` in a worker thread (the running event loop keeps going)."""
        await self.ensure_loaded_async()
        return await asyncio.to_thread(self.generate, *args, **kwargs)

    def generate_text(self, prompts: str | list[str], *, batch_size: int | None = None, chat: bool = False,
                      stop: str | list[str] | None = None, **generate_kwargs: Any) -> str | list[str]:
        """Text in, new text out (a string for a string, a list in the same order for a list), in
        left-padded batches that share each fetch of the weights: see :func:`.generation.generate_text`.

        Raises:
            ModelError: an encoder-decoder or non-generative model, or no tokenizer.
            SyncCallInEventLoopError: called inside a running event loop (use :meth:`generate_text_async`).
        """
        self._sync_guard("generate_text")
        cfg = self.hf_model.config
        if cfg.is_encoder_decoder or not self.hf_model.can_generate():
            raise ModelError(f"generate_text runs decoder-only language models; {self.model_name!r} is a "
                             f"{self.manifest.architecture} (use generate() with token ids)")
        return generation.generate_text(self, prompts, batch_size=batch_size, chat=chat, stop=stop,
                                        **generate_kwargs)

    async def generate_text_async(self, prompts: str | list[str], **kwargs: Any) -> str | list[str]:
        await self.ensure_loaded_async()
        return await asyncio.to_thread(self.generate_text, prompts, **kwargs)

    def embed(self, texts: str | list[str], *, batch_size: int | None = None, pooling: str = "mean",
              normalize: bool = False, allow_decoder: bool = False, **kwargs: Any) -> torch.Tensor:
        """Embeddings (N, hidden) of ``texts`` in input order, in large length-sorted blocks that share each
        fetch of the weights: see :func:`.embedding.embed` (``pooling`` ``"mean"`` or ``"cls"``).

        A decoder-only language model (it can ``generate``) is refused unless ``allow_decoder=True``: its
        pooled hidden states were not trained as sentence embeddings, so they are rarely what a caller wants.

        Raises:
            ModelError: an encoder-decoder model, a decoder-only one without ``allow_decoder``, or no tokenizer.
            SyncCallInEventLoopError: called inside a running event loop (use :meth:`embed_async`).
        """
        self._sync_guard("embed")
        hf = self.hf_model
        if hf.config.is_encoder_decoder:
            raise ModelError(f"embed runs encoder (or decoder-only) models; {self.model_name!r} is a "
                             f"{self.manifest.architecture}")
        if not allow_decoder and hf.can_generate():
            raise ModelError(f"{self.model_name!r} is a decoder-only language model ({self.manifest.architecture}): "
                             "its pooled hidden states are not trained sentence embeddings; use an encoder such as "
                             "all-MiniLM-L6-v2, or pass allow_decoder=True (CLI: --allow-decoder) to get them anyway")
        return embedding.embed(self, texts, batch_size=batch_size, pooling=pooling, normalize=normalize, **kwargs)

    async def embed_async(self, texts: str | list[str], **kwargs: Any) -> torch.Tensor:
        await self.ensure_loaded_async()
        return await asyncio.to_thread(self.embed, texts, **kwargs)

    # ------------------------------------------------------------------------------ cache control
    @property
    def streamed_units(self) -> list[str]:
        return [u.name for u in self.manifest.streamed]

    @property
    def cache_size(self) -> int:
        """The requested cache size (``get_cache_info()["effective_cache_size"]``: what actually bounds it)."""
        self.ensure_loaded()
        return self.engine.cache.max_units

    @cache_size.setter
    def cache_size(self, value: int) -> None:
        self.ensure_loaded()
        self.engine.resize_cache(int(value))

    def _unit_names(self, indices: list[int]) -> list[str]:
        units = self.streamed_units
        for i in indices:
            if not 0 <= i < len(units):
                raise IndexError(f"layer index {i} out of range 0..{len(units) - 1}")
        return [units[i] for i in indices]

    async def warmup(self, layer_indices: list[int] | None = None) -> None:
        """Fetch these streamed units (indices into :attr:`streamed_units`; default: the first
        ``cache_size``) into the cache before the first forward."""
        await self.ensure_loaded_async()
        idx = list(range(min(self.cache_size, len(self.streamed_units)))) if layer_indices is None else layer_indices
        await self.engine.wrap(self.engine.cache.warm(self._unit_names(list(idx))))

    async def prefetch_next_layers(self, current_layer: int, prefetch_count: int | None = None) -> list[str]:
        """Start fetching the units expected after streamed unit ``current_layer``; returns the names started."""
        await self.ensure_loaded_async()
        (name,) = self._unit_names([current_layer])
        count = self.config.prefetch_count if prefetch_count is None else prefetch_count
        return await self.engine.call_async(partial(self.engine.cache.schedule_prefetch, beyond_kept=False), name, count)

    def clear_cache(self) -> None:
        """Drop every cached and prefetched unit (resident parts stay).

        Raises:
            SyncCallInEventLoopError: called inside a running event loop (use :meth:`clear_cache_async`).
        """
        self._sync_guard("clear_cache")
        self.ensure_loaded()
        self.engine.unpin()
        self.engine.run(self.engine.clear_caches())

    async def clear_cache_async(self) -> None:
        await self.ensure_loaded_async()
        await asyncio.to_thread(self.engine.unpin)
        await self.engine.wrap(self.engine.clear_caches())

    def get_cache_info(self) -> dict[str, Any]:
        """Cache counters and contents; ``requested_cache_size`` and ``effective_cache_size`` (the
        requested size capped at the number of streamed units)."""
        self._ensure_open()
        self.ensure_loaded()
        return self.engine.cache_info()

    def get_inference_stats(self) -> dict[str, Any]:
        """Totals over every inference, including direct ``hf_model(...)`` calls: ``total_time`` is
        ``compute_seconds + stall_seconds``; ``drafted_tokens`` / ``accepted_tokens``: speculation's drafts."""
        self._ensure_open()
        self.ensure_loaded()
        return {**self.engine.inference_stats(), **self._drafts.as_stats()}

    def trace_events(self) -> list[tuple[float, str, str]]:
        """Timestamped (perf_counter) fetch/compute events, when built with ``trace=True``."""
        self.ensure_loaded()
        return list(self.engine.cache.stats.events)

    # ---------------------------------------------------------------------------------- lifecycle
    def _ensure_open(self) -> None:
        if self._closed:
            raise ModelError("this streaming model was closed")

    def close(self) -> None:
        """Close connections and stop the I/O thread (idempotent). Inside a running event loop it does
        not wait for the connections' graceful close (use :meth:`cleanup` there)."""
        if self._closed:
            return
        self._closed = True
        self.engine.close()

    async def cleanup(self) -> None:
        """Close connections and stop the I/O thread without blocking the running loop."""
        if not self._closed:
            self._closed = True
            await self.engine.close_async()

    close_async = cleanup

    async def __aenter__(self) -> StreamingBaseModel:
        await self.ensure_loaded_async()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.cleanup()

    def __enter__(self) -> StreamingBaseModel:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        # Never block here (it may run at interpreter shutdown or inside a loop): start the close only.
        engine = self.__dict__.get("engine")
        if engine is not None and not self.__dict__.get("_closed", True):
            engine.close_nowait()

    def __repr__(self) -> str:
        if self.__dict__.get("_loaded") is None:
            return f"{type(self).__name__}({self.model_name!r}, not loaded yet)"
        m = self._loaded.manifest
        return (f"{type(self).__name__}({self.model_name!r}, {m.architecture}, {len(m.streamed)} streamed units, "
                f"cache_size={self.engine.cache.max_units})")
