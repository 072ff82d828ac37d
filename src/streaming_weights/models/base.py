"""``StreamingBaseModel``: any chunked transformers model, run by transformers itself with streamed weights.

The model is transformers' own class (named in the manifest) built on ``meta``; resident parts are
loaded once; every streamed block gets a :class:`~.hooks.UnitBinding` fed by the unit cache and
prefetcher. Forward passes, ``generate`` and KV caches are transformers' code paths, unchanged.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from ..client.bridge import LoopThread
from ..client.buffers import BufferPool
from ..client.cache import UnitCache
from ..client.policy import make_policy
from ..client.source import UnitSource, open_unit_source
from ..config import StreamingConfig
from ..exceptions import ModelError, UnsupportedArchitectureError
from ..format import Manifest
from ..monitoring import InferenceRecord, StreamingMonitor
from .architecture import build_config, build_meta_model, resolve_architecture, streamed_module_names
from .hooks import UnitBinding, assign_tensor

_TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                    "spiece.model", "sentencepiece.bpe.model"}


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
            or a local chunk directory. Default: ``config.websocket_uri`` (``ws://localhost:8765``).
        cache_size: streamed units kept between uses (resident parts, in-flight prefetches and the unit
            computing now are not counted). Changeable at run time: ``model.cache_size = 5``.
        prefetch_count: units fetched ahead of the one computing.
        cache_policy: ``"order"`` (default: evicts the unit whose next use is farthest) or ``"lru"``.
        cache_size_mb: optional byte bound on the cache.
        token: bearer token for the server (default ``$SURFING_TOKEN``).
        timeout_seconds, max_retries: per-request timeout and retries before a specific error.
        monitor: a :class:`StreamingMonitor` collecting stats across calls.
        config: a :class:`StreamingConfig` supplying any option not passed explicitly.
        chunks_dir: read chunks from this directory instead of a server (original keyword).

    Raises:
        NotFoundError: the source does not host ``model_name`` (the message lists what it hosts).
        UnsupportedArchitectureError: the manifest's architecture is not one this class runs.
        ConnectionFailedError, AuthenticationError, IntegrityError, UnitUnavailableError.
    """

    #: model_type values this class accepts (empty: any).
    families: frozenset[str] = frozenset()

    def __init__(
        self,
        model_name: str | None = None,
        websocket_uri: str | list[str] | UnitSource | None = None,
        cache_size: int | None = None,
        *,
        prefetch_count: int | None = None,
        cache_policy: str | None = None,
        cache_size_mb: float | None = None,
        token: str | None = None,
        timeout_seconds: float | None = None,
        max_retries: int | None = None,
        monitor: StreamingMonitor | None = None,
        config: StreamingConfig | None = None,
        chunks_dir: str | os.PathLike[str] | None = None,
        ssl_context: Any = None,
        trace: bool = False,
    ) -> None:
        cfg = config or StreamingConfig.from_env()
        self.config = cfg
        self.model_name = model_name if model_name is not None else cfg.model_name
        uri = websocket_uri if websocket_uri is not None else (str(chunks_dir) if chunks_dir else cfg.websocket_uri)
        self.websocket_uri = uri
        self.prefetch_count = cfg.prefetch_count if prefetch_count is None else prefetch_count
        self.timeout_seconds = cfg.timeout_seconds if timeout_seconds is None else timeout_seconds
        self.max_retries = cfg.max_retries if max_retries is None else max_retries
        token = token if token is not None else (cfg.token or os.environ.get("SURFING_TOKEN"))
        cache_units = cfg.cache_size if cache_size is None else cache_size
        cache_mb = cfg.cache_size_mb if cache_size_mb is None else cache_size_mb
        self.monitor = monitor
        self._lock = threading.RLock()
        self._prefetch_enabled = True
        self._closed = False
        self._loaded = False
        self._loading = False
        self._stats = {"total_inferences": 0, "total_time": 0.0, "tokens": 0}
        self._options = dict(cache_units=cache_units, cache_mb=cache_mb, policy=cache_policy or cfg.cache_policy,
                             trace=trace)
        self._io = LoopThread()
        try:
            self.source = open_unit_source(uri, token=token, timeout_seconds=self.timeout_seconds,
                                           max_retries=self.max_retries, ssl_context=ssl_context)
        except BaseException:
            self._closed = True
            self._io.close()
            raise
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            self._ensure_loaded()  # plain sync use: fail fast, right here
        # Inside a running event loop, loading waits for `async with`, `await warmup()` or the first call:
        # blocking that loop here would deadlock a weight server that runs on it.

    _LAZY = frozenset({"manifest", "hf_model", "tokenizer", "_cache", "_bindings"})

    def __getattr__(self, name: str) -> Any:
        if name in StreamingBaseModel._LAZY and "_io" in self.__dict__ and not self.__dict__.get("_loading"):
            self._ensure_loaded()
            return self.__dict__[name]
        raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")

    def _ensure_loaded(self) -> None:
        """Fetch the manifest, build the meta model, load resident parts and the tokenizer (once)."""
        with self._lock:
            if self._loaded:
                return
            self._ensure_open()
            self._loading = True
            try:
                self._load()
                self._loaded = True
            except BaseException:
                self.close()
                raise
            finally:
                self._loading = False

    async def _ensure_loaded_async(self) -> None:
        if not self._loaded:
            await asyncio.to_thread(self._ensure_loaded)

    def _load(self) -> None:
        opts = self._options
        self.manifest = self._run(self.source.get_manifest(self.model_name))
        self.model_name = self.manifest.name
        self._check_family()
        self.hf_model = self._build_model()
        streamed = [u.name for u in self.manifest.streamed]
        largest = max((u.bytes for u in self.manifest.streamed), default=0)
        # A dropped unit's buffer is reused by the next fetch (only once no tensor views it). One spare
        # buffer is enough in steady state (a unit is dropped right before the next prefetch starts) and
        # keeps memory within resident + (cache_size + prefetch_count + 1) units.
        self.source.buffer_pool = BufferPool(max_bytes=largest)
        self._cache = UnitCache(
            self._fetch_unit,
            make_policy(opts["policy"], streamed),
            {u.name: u.bytes for u in self.manifest.streamed},
            max_units=opts["cache_units"],
            max_bytes=None if opts["cache_mb"] is None else int(opts["cache_mb"] * (1 << 20)),
            prefetch_count=self.prefetch_count,
            max_retries=self.max_retries,
            trace=opts["trace"],
            pool=self.source.buffer_pool,
        )
        self._bindings = [UnitBinding(self.hf_model, n, self._acquire, self._release) for n in streamed]
        self.tokenizer = self._load_tokenizer()

    # ------------------------------------------------------------------------------------- set-up
    def _run(self, coro, timeout: float | None = None):
        return self._io.run(coro, timeout if timeout is not None else self._op_timeout)

    @property
    def _op_timeout(self) -> float:
        # A unit may legitimately take (retries + 1) request timeouts plus backoff before the cache gives up.
        return self.timeout_seconds * (self.max_retries + 1) + 5.0 * (self.max_retries + 1)

    def _check_family(self) -> None:
        mt = self.manifest.model_type
        if self.families and mt not in self.families:
            raise UnsupportedArchitectureError(
                f"{type(self).__name__} runs {sorted(self.families)} models, but {self.manifest.name!r} is a "
                f"{mt!r} model ({self.manifest.architecture}); use StreamingBaseModel or the matching class"
            )

    def _build_model(self) -> torch.nn.Module:
        m = self.manifest
        cls = resolve_architecture(m.architecture)
        hf_config = build_config(m.model_type, m.config)
        dtype = getattr(torch, m.dtype, None)
        model = build_meta_model(cls, hf_config, dtype if isinstance(dtype, torch.dtype) else None)
        expected = [u.name for u in m.streamed]
        if streamed_module_names(model) != expected:
            raise ModelError(
                f"manifest of {m.name!r} streams {expected[:3]}… but {m.architecture} maps to "
                f"{streamed_module_names(model)[:3]}…; re-chunk with this version of streaming_weights"
            )
        for entry in m.resident:
            unit = self._run(self.source.fetch_unit(m, entry.name))
            for name, t in unit.tensors.items():
                assign_tensor(model, name, t)
        params = dict(model.named_parameters(remove_duplicate=False))
        for alias, target in m.tied.items():
            if alias not in params or target not in params:
                raise ModelError(f"tied weight {alias} -> {target} does not exist in {m.architecture}")
            owner_path, _, attr = alias.rpartition(".")
            owner = model.get_submodule(owner_path) if owner_path else model
            owner._parameters[attr] = model.get_parameter(target)
        streamed_prefixes = tuple(n + "." for n in expected)
        missing = [n for n, p in model.named_parameters(remove_duplicate=False)
                   if p.is_meta and not n.startswith(streamed_prefixes)]
        if missing:  # never compute with uninitialized weights
            raise ModelError(f"resident parts of {m.name!r} lack {missing[:5]}: the chunks are incomplete")
        return model

    def _load_tokenizer(self):
        names = {f.name for f in self.manifest.files}
        gen = "generation_config.json" in names
        if not (names & _TOKENIZER_FILES) and not gen:
            return None
        with tempfile.TemporaryDirectory(prefix="surfing-tok-") as tmp:
            for f in self.manifest.files:
                Path(tmp, f.name).write_bytes(self._run(self.source.fetch_file(self.manifest, f.name)))
            if gen:
                from transformers import GenerationConfig

                self.hf_model.generation_config = GenerationConfig.from_pretrained(tmp)
            if not names & _TOKENIZER_FILES:
                return None
            from transformers import AutoTokenizer

            try:
                return AutoTokenizer.from_pretrained(tmp, local_files_only=True)
            except Exception as exc:  # noqa: BLE001
                raise ModelError(f"cannot build the tokenizer of {self.manifest.name!r}: {exc}") from exc

    # ------------------------------------------------------------------------------ hook plumbing
    async def _fetch_unit(self, name: str):
        return await self.source.fetch_unit(self.manifest, name)

    def _acquire(self, name: str) -> dict[str, torch.Tensor]:
        unit = self._run(self._cache.acquire(name, prefetch=self._prefetch_enabled))
        self._cache._event("compute_start", name)
        return unit.tensors

    def _release(self, name: str) -> None:
        self._cache._event("compute_end", name)
        self._io.call(self._cache.release, name)

    # ------------------------------------------------------------------------------------ compute
    @property
    def base_model(self) -> torch.nn.Module:
        """The transformers base model (``LlamaModel`` inside ``LlamaForCausalLM``…)."""
        return self.hf_model.base_model

    def _forward_impl(self, **kwargs: Any) -> Any:
        return self.base_model(**kwargs)

    def _timed(self, kind: str, fn, tokens_of=None):
        self._ensure_open()
        self._ensure_loaded()
        with self._lock:
            before = self._io.call(lambda: dict(vars(self._cache.stats)))
            t0 = time.perf_counter()
            with torch.no_grad():
                out = fn()
            dt = time.perf_counter() - t0
            after = self._io.call(lambda: dict(vars(self._cache.stats)))
        tokens = tokens_of(out) if tokens_of else 0
        self._stats["total_inferences"] += 1
        self._stats["total_time"] += dt
        self._stats["tokens"] += tokens
        if self.monitor is not None:
            self.monitor.record(InferenceRecord(
                seconds=dt, kind=kind, tokens=tokens,
                fetch_seconds=after["fetch_seconds"] - before["fetch_seconds"],
                stall_seconds=after["stall_seconds"] - before["stall_seconds"],
                bytes_fetched=after["bytes_fetched"] - before["bytes_fetched"],
                hits=after["hits"] - before["hits"], misses=after["misses"] - before["misses"]))
        return out

    def forward(self, input_ids: Any = None, attention_mask: Any = None, *, enable_prefetch: bool = True,
                **kwargs: Any) -> Any:
        """Synchronous forward; returns what the transformers base model returns for the same weights."""
        def run():
            self._prefetch_enabled = enable_prefetch
            try:
                return self._forward_impl(input_ids=_as_ids(input_ids), attention_mask=_as_ids(attention_mask),
                                          **{k: _as_ids(v) if k.endswith("_ids") else v for k, v in kwargs.items()})
            finally:
                self._prefetch_enabled = True

        return self._timed("forward", run)

    __call__ = forward

    async def forward_async(self, input_ids: Any = None, attention_mask: Any = None, *,
                            enable_prefetch: bool = True, **kwargs: Any) -> Any:
        """Async forward: compute runs in a worker thread, I/O on the client's own loop."""
        return await asyncio.to_thread(self.forward, input_ids, attention_mask,
                                       enable_prefetch=enable_prefetch, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """``hf_model.generate`` with streamed weights: same arguments, same result as transformers."""
        if "input_ids" in kwargs:
            kwargs["input_ids"] = _as_ids(kwargs["input_ids"])
        prompt_len = 0
        ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(ids, torch.Tensor) and not self.hf_model.config.is_encoder_decoder:
            prompt_len = ids.shape[-1]

        def tokens_of(out):
            seq = out.sequences if hasattr(out, "sequences") else out
            return int(seq.shape[-1] - prompt_len) * int(seq.shape[0]) if isinstance(seq, torch.Tensor) else 0

        return self._timed("generate", lambda: self.hf_model.generate(*args, **kwargs), tokens_of)

    async def generate_async(self, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(self.generate, *args, **kwargs)

    # ------------------------------------------------------------------------------ cache control
    @property
    def streamed_units(self) -> list[str]:
        return [u.name for u in self.manifest.streamed]

    @property
    def cache_size(self) -> int:
        return self._cache.max_units

    @cache_size.setter
    def cache_size(self, value: int) -> None:
        self._io.call(self._cache.resize, int(value), self._cache.max_bytes)

    async def warmup(self, layer_indices: list[int] | None = None) -> None:
        """Fetch these streamed units (indices into :attr:`streamed_units`; default: the first
        ``cache_size``) into the cache before the first forward."""
        await self._ensure_loaded_async()
        units = self.streamed_units
        idx = list(range(min(self.cache_size, len(units)))) if layer_indices is None else list(layer_indices)
        for i in idx:
            if not 0 <= i < len(units):
                raise IndexError(f"layer index {i} out of range 0..{len(units) - 1}")
        await self._io.wrap(self._cache.warm([units[i] for i in idx]))

    async def prefetch_next_layers(self, current_layer: int, prefetch_count: int | None = None) -> list[str]:
        """Start fetching the units expected after streamed unit ``current_layer``; returns the names started."""
        await self._ensure_loaded_async()
        units = self.streamed_units
        if not 0 <= current_layer < len(units):
            raise IndexError(f"layer index {current_layer} out of range 0..{len(units) - 1}")
        count = self.prefetch_count if prefetch_count is None else prefetch_count

        async def go():
            return self._cache.schedule_prefetch(units[current_layer], count)

        return await self._io.wrap(go())

    def clear_cache(self) -> None:
        """Drop every cached and prefetched unit (resident parts stay)."""
        self._run(self._cache.clear())

    def get_cache_info(self) -> dict[str, Any]:
        info = self._io.call(self._cache.info)
        info["resident_mb"] = sum(u.bytes for u in self.manifest.resident) / (1 << 20)
        info["streamed_units"] = len(self.manifest.streamed)
        return info

    def get_inference_stats(self) -> dict[str, Any]:
        info = self.get_cache_info()
        n, total = self._stats["total_inferences"], self._stats["total_time"]
        return {
            "total_inferences": n,
            "total_time": total,
            "avg_inference_time": total / n if n else 0.0,
            "cache_hit_rate": info["hit_rate"],
            "fetch_seconds": info["fetch_seconds"],
            "stall_seconds": info["stall_seconds"],
            "compute_seconds": max(0.0, total - info["stall_seconds"]),
            "bytes_fetched": info["bytes_fetched"],
            "generated_tokens": self._stats["tokens"],
            "tokens_per_second": self._stats["tokens"] / total if total and self._stats["tokens"] else 0.0,
        }

    def trace_events(self) -> list[tuple[float, str, str]]:
        """Timestamped (perf_counter) fetch/compute events, when built with ``trace=True``."""
        return list(self._cache.stats.events)

    # ---------------------------------------------------------------------------------- lifecycle
    def _ensure_open(self) -> None:
        if self._closed:
            raise ModelError("this streaming model was closed")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._io.run(self._shutdown(), 10)
        except Exception:  # noqa: BLE001 - best effort
            pass
        self._io.close()

    async def _shutdown(self) -> None:
        cache = self.__dict__.get("_cache")
        if cache is not None:
            await cache.clear()
        await self.source.close()

    async def cleanup(self) -> None:
        """Close connections and stop the I/O thread."""
        await asyncio.to_thread(self.close)

    async def __aenter__(self):
        await self._ensure_loaded_async()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if "_io" in self.__dict__ and not self._closed:
                self.close()
        except Exception:  # noqa: BLE001
            pass

    def __repr__(self) -> str:
        if not self.__dict__.get("_loaded"):
            return f"{type(self).__name__}({self.model_name!r}, not loaded yet)"
        return (f"{type(self).__name__}({self.model_name!r}, {self.manifest.architecture}, "
                f"{len(self.manifest.streamed)} streamed units, cache_size={self.cache_size})")
