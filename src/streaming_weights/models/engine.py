"""The streaming engine: I/O thread, unit source, unit cache, hook bindings and the inference counters.

One :class:`StreamingEngine` serves one model. All network and storage I/O runs on its private event
loop (a daemon thread, so a script that never closes still exits); synchronous compute code blocks on
that loop through :meth:`StreamingEngine.run`, whose timeout is the retry policy's deadline (the
longest one operation may take, retries and backoff included). Blocking calls made from a thread that
runs an event loop raise :class:`SyncCallInEventLoopError` at once instead of stalling that loop.

The engine knows nothing about tokenizers, generation or transformers' classes: the loader builds the
model and the facade (:mod:`.base`) exposes it.
"""

from __future__ import annotations

import asyncio
import atexit
import threading
import weakref
from typing import Any, Awaitable, Callable, TypeVar

import torch

from ..client.bridge import LoopThread, guard_sync, in_running_loop, join_running
from ..client.cache import UnitCache
from ..client.device import resolve_device
from ..client.convert import ConvertingSource
from ..client.policy import make_policy
from ..client.base import FetchedUnit, UnitSource
from ..client.open import open_unit_source
from ..client.retry import RetryingSource, RetryPolicy
from ..config import StreamingConfig
from ..format import Manifest
from ..memory import current_anon, resolve_budget  # the model's cost: anonymous memory
from ..monitoring import Totals
from .accounting import Accounting
from .architecture import fp32_names_for
from .qlinear import CodesTier, edge_linear, in_memory_form, make_tier
from .edges import EdgeBinding, kept_and_streamed
from .experts import ExpertStreams
from .patching import FunctionHook, add_hook
from .hooks import UnitBinding
from .placement import DevicePlacement
from .planner import Plan, plan_memory

T = TypeVar("T")

#: seconds a graceful close may take at interpreter exit (a script that never closes exits promptly)
EXIT_CLOSE_SECONDS = 1.0


class StreamingEngine:
    """Streams one model's units: owns the I/O loop, the (retrying) source and, once bound, the cache.

    Args:
        config: the resolved options (location, token, timeouts, retries, cache bounds, trace…).

    Raises:
        ConfigurationError: the location cannot be opened (bad URI…).
    """

    def __init__(self, config: StreamingConfig) -> None:
        self.config = config
        # device hook (H): a device this machine lacks fails here, before anything is opened or fetched
        self.placement = DevicePlacement(resolve_device(config.device))
        self.io = LoopThread()
        # Every source built below takes its unit buffers from this pool (pinned on CUDA), sized by the plan.
        self.pool = self.placement.pool(0)
        self.policy = RetryPolicy(max_retries=config.max_retries, timeout_seconds=config.timeout_seconds)
        try:
            self.source: RetryingSource = self._open_source(config)
        except BaseException:
            self.io.close()
            raise
        self.manifest: Manifest | None = None
        self.plan: Plan | None = None
        self.overhead_from = current_anon()  # this model's cost is measured from here (the loader skips its code)
        self.cache: UnitCache | None = None
        self.bindings: list[UnitBinding] = []
        self.experts: ExpertStreams | None = None  # mixture-of-experts models only
        self.codes: CodesTier | None = None  # quantized units kept as codes (the compressed tier)
        self.edge_bindings: list[EdgeBinding] = []
        self.held_edges: dict[str, FetchedUnit] = {}  # row shards kept as codes for the model's life (loader)
        self.prefetch_enabled = True
        self.pinned = False  # the kept blocks' tensors stay in their modules (see _pin_kept)
        self.pinned_hits = 0  # uses of pinned units (cache hits that never reached the cache) before the last unpin
        self.accounting = Accounting(self._lifetime, config.monitor)
        self.lock = self.accounting.lock  # held by an inference; unpinning waits for it
        self._root_handles: list[Any] = []
        self.closed = False
        _track(self)  # closed at interpreter exit if the user did not (one atexit hook for all engines)

    def _open_source(self, cfg: StreamingConfig) -> UnitSource:
        kw: dict[str, Any] = {"token": cfg.token, "timeout_seconds": cfg.timeout_seconds, "s3": cfg.s3,
                              "ssl_context": cfg.ssl_context, "trusted_keys": cfg.trusted_keys, "manifest_sha256": cfg.manifest_sha256}
        if getattr(cfg, "ca_cert", None):
            kw["ca_cert"] = cfg.ca_cert
        # The one place retries happen (every layer below makes one attempt); units convert once, below them: float32
        # where from_pretrained(dtype=...) keeps it; quantized ones kept as codes or computed on by kernels (or why not)
        codes, kernel, self.kernel_fallback = in_memory_form(cfg, self.placement.on_host)
        self.converter = ConvertingSource(open_unit_source(cfg.location, pool=self.pool, **kw), cfg.dtype,
                                          keep_fp32=fp32_names_for, keep_codes=codes, kernel=kernel)
        return RetryingSource(self.converter, self.policy)

    # --------------------------------------------------------------------------------- the bridge
    @property
    def deadline(self) -> float:
        """Longest one operation may take, retries and backoff included (the bridge's timeout)."""
        return self.source.deadline()

    def run(self, coro: Awaitable[T], what: str = "this call", alternative: str | None = None) -> T:
        """Run ``coro`` on the I/O loop and block until it finishes (at most :attr:`deadline`)."""
        if in_running_loop():
            if asyncio.iscoroutine(coro):
                coro.close()  # never started: no "was never awaited" warning
            guard_sync(what, alternative)
        return self.io.run(coro, self.deadline)

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a plain (non-blocking) function on the I/O loop thread, serialized with its work."""
        return self.io.call(fn, *args)

    async def call_async(self, fn: Callable[..., T], *args: Any) -> T:
        """:meth:`call` awaited from another event loop (which keeps running meanwhile)."""
        async def wrapper() -> T:
            return fn(*args)
        return await self.io.wrap(wrapper())

    async def wrap(self, coro: Awaitable[T]) -> T:
        """Await ``coro`` (run on the I/O loop) from another event loop."""
        return await self.io.wrap(coro)

    # -------------------------------------------------------------------------------- the binding
    def make_plan(self, manifest: Manifest) -> Plan:
        """Plan the memory for ``manifest`` (``memory_budget="auto"`` is measured now: call it once the
        model's code is imported and its meta model built, right before the resident parts are fetched).

        Raises:
            ConfigurationError: the budget is not a size, or below the model's minimum (named).
        """
        # The skeleton and one-time set-up are built: their cost is measured (threads building others count too)
        overhead = max(0, current_anon() - self.overhead_from)
        self.codes = make_tier(self.converter, manifest)  # the compressed tier (codes or kernel form), if any
        overhead += self.codes.scratch_bytes if self.codes is not None else 0  # its expansion buffers
        budget, where = resolve_budget(self.config.memory_budget)
        if budget is not None and where.startswith("auto"):
            budget += overhead  # "auto" was measured after that memory was spent: the budget covers it
        self._plan_args = dict(budget=budget, budget_from=where, overhead_bytes=overhead,
                               unit_bytes_of=self._unit_memory(manifest))
        self.plan = plan_memory(manifest, self.config, **self._plan_args)
        # A dropped unit's buffer is reused by the next fetch (once no tensor views it): one of the plan's unit slots
        self.pool.limit(max(self.plan.unit_bytes, self.converter.spare_bytes(manifest)))
        return self.plan

    def plan_for(self, seq_len: int, batch: int = 1) -> Plan:
        """The plan (same budget and measured overhead) for a request of ``batch`` x ``seq_len`` tokens.

        Raises:
            ConfigurationError: that request does not fit the budget even with no unit kept.
        """
        return plan_memory(self.manifest, self.config, seq_len=seq_len, batch=batch, **self._plan_args)

    def add_overhead(self, extra: int) -> None:
        """Count ``extra`` more bytes besides weights (a tokenizer built late): kept units shrink to fit, or raise."""
        args = {**self._plan_args, "overhead_bytes": max(0, self._plan_args["overhead_bytes"] + extra),
                "stream_shards": self.plan.shards_streamed}  # the edges are bound: kept rows stay kept
        self.plan, self._plan_args = plan_memory(self.manifest, self.config, **args), args
        self.fit_request(self.plan.seq_len, self.plan.batch)

    def fit_request(self, seq_len: int, batch: int = 1) -> Plan:
        """Size the kept units to what the budget leaves beside a request's KV cache and activations (``batch`` x
        ``seq_len`` tokens): fewer than the load-time plan (made for :data:`~.planner.DEFAULT_PLAN_TOKENS`) for a
        longer request, more for a shorter one. Without a budget (explicit or default ``cache_size``) nothing
        changes. Returns the request's plan.

        Raises:
            ConfigurationError: the request does not fit the budget even with no unit kept.
        """
        plan = self.plan_for(seq_len, batch)
        if self.plan is not None and self.plan.source == "budget" and self.cache is not None:
            keep = plan.cache_size
            if keep != self.cache.max_units:
                with self.lock:
                    self._unpin()
                    self.call(self.cache.resize, keep, self.cache.max_bytes)
        return plan

    def resize_cache(self, units: int) -> None:
        """Keep ``units`` streamed units (and, for a mixture of experts, ``units`` layers' worth of experts, as
        the planner gives without a budget)."""
        with self.lock:
            self._unpin()
            self.call(self._resize, units)

    def _resize(self, units: int) -> None:
        self.cache.resize(units, self.cache.max_bytes)
        if self.experts is not None and self.plan is not None:
            layer = self.plan.experts_per_layer * self.plan.expert_unit_bytes
            self.experts.cache.resize(len(self.experts.cache.sizes) if units else 0, units * layer)

    async def clear_caches(self) -> None:
        """Drop every cached and prefetched unit and expert (resident parts stay). Call with the model unpinned
        (:meth:`_unpin`, as the facade does)."""
        await self.cache.clear()
        if self.experts is not None:
            await self.experts.cache.clear()

    def _unit_memory(self, manifest: Manifest) -> Callable[[Any], int]:
        """Bytes a unit holds once received (and converted to the compute dtype, if it is)."""
        return lambda entry: self.converter.held_bytes(entry, manifest)

    def bind(self, manifest: Manifest, root: torch.nn.Module) -> None:
        """Create the unit cache for ``manifest`` (sized by the plan) and hook every streamed unit of ``root``."""
        cfg = self.config
        plan = self.plan or self.make_plan(manifest)
        blocks = [u.name for u in manifest.streamed]
        streamed = set(plan.streamed)
        kept, streamed_edges = kept_and_streamed(manifest, plan.streamed)
        held = [t for t in kept if set(t.units) <= set(self.held_edges)]  # kept as codes: they compute per use
        edges = [EdgeBinding(root, manifest, t, self.acquire, self.release, self.placement.ops.device,
                             rows=self.edge_rows if self.codes is not None else None, linear=edge_linear)
                 for t in streamed_edges + held]
        # The order the policy starts from: the blocks, then the lm_head's shards (an input embedding's
        # shards are used by the tokens of each step, outside that order).
        order = blocks + [u for e in edges if e.heads for u in e.tensor.units]
        self.cache = UnitCache(
            self._fetch, make_policy(cfg.cache_policy, order),
            {u.name: u.bytes for u in manifest.units if u.name in streamed}, max_units=plan.cache_size,
            max_bytes=None if cfg.cache_size_mb is None else int(cfg.cache_size_mb * (1 << 20)),
            prefetch_count=plan.prefetch_count, trace=cfg.trace, pool=self.pool)
        if plan.cache_size < len(plan.streamed) and (book := self.source.fingerprints) is not None:
            book.expect_refetch(u for u in manifest.units if u.name in streamed)  # fetched again on every pass
        self.manifest = manifest
        self.bindings = [UnitBinding(root, n, self.acquire, self.release) for n in blocks]
        self.codes is not None and self.codes.bind(root)  # kernel form: its linear layers compute on codes
        self.experts = ExpertStreams.bind(manifest, root, plan, self._fetch, self.run, self.call, cfg.trace,
                                          peek=self._peek if cfg.expert_prefetch else None)
        self.edge_bindings = edges
        self._count_direct_calls(root)
        # device hook (H): resident parts and inputs to the device; the device tier in front of the cache
        self.placement.bind(root, manifest, peek=self._peek, headroom_bytes=getattr(plan, "headroom_bytes", 0))

    def _count_direct_calls(self, root: torch.nn.Module) -> None:
        """Count calls of the model itself (``hf_model(...)``, ``hf_model.base_model(...)``) as inferences.

        Only the outermost call counts: the facade's own calls and transformers' nested calls (a
        ``*ForCausalLM`` calling its base model, ``generate`` calling forward) are inside one scope.
        """
        base = getattr(root, "base_model", root)
        modules = {id(root): root, id(base): base}
        scope = FunctionHook(pre=lambda *_: self.enter("forward"), post=lambda *_: self.exit())
        self._root_handles += [add_hook(module, scope) for module in modules.values()]

    async def _fetch(self, name: str) -> FetchedUnit:
        return await self.source.fetch_unit(self.manifest, name)

    def acquire(self, name: str, ordered: bool = True) -> dict[str, torch.Tensor]:
        """The tensors of streamed unit ``name`` for the compute about to run (blocks until fetched).

        ``ordered=False``: a data-dependent use (an embedding shard), neither learned nor prefetched along.
        """
        tensors = self.placement.acquire(name, lambda n: self._host_acquire(n, ordered))  # device hook (H)
        self.cache._event("compute_start", name)
        return tensors

    def _host_acquire(self, name: str, ordered: bool = True) -> FetchedUnit:
        unit = self.held_edges.get(name) or self.run(
            self.cache.acquire(name, prefetch=self.prefetch_enabled and ordered, observe=ordered),
            "a forward pass", "await model.forward_async(...)` / `await model.generate_async(...)")
        return self.codes.expand(name, unit) if self.codes is not None else unit  # compressed tier: per use

    def edge_rows(self, unit: str, tensor: str, rows: torch.Tensor) -> torch.Tensor:
        """Rows of a row shard's ``tensor`` in the compute dtype, decoded alone when the shard is held as codes
        (an embedding's lookup: a whole shard is never expanded for it); the shard is acquired and released."""
        held = self.held_edges.get(unit)
        fetched = held or self.run(self.cache.acquire(unit, prefetch=False, observe=False), "a forward pass")
        try:
            return self.converter.gather(self.manifest, unit, fetched.tensors, tensor, rows)
        finally:
            if held is None:
                self.call(self.cache.release, unit)

    def _peek(self, name: str) -> FetchedUnit | None:
        """The host copy of ``name`` if it has arrived (prefetched or kept), without fetching it."""
        return self.call(self.cache.peek, name)

    def release(self, name: str) -> None:
        self.cache._event("compute_end", name)
        if name not in self.held_edges:  # (held shards are no cache's)
            self.placement.release(name, lambda n: self.io.post(self.cache.release, n))  # device hook (H)
        if self.codes is not None:
            self.codes.release(name)

    # ------------------------------------------------------------------------------- the counters
    def _lifetime(self) -> Totals | None:
        """The unit and expert caches' counters as :class:`Totals` (``None``: unbound, or the loop is gone)."""
        if self.cache is None or self.closed:
            return None
        try:
            return self.call(self._read_caches)
        except Exception:  # noqa: BLE001 - the I/O loop is gone: nothing to count against
            return None

    def _read_caches(self) -> Totals:
        caches = [self.cache.stats] + ([self.experts.cache.stats] if self.experts is not None else [])
        out = Totals(fetch_seconds=sum(c.fetch_seconds for c in caches), bytes_fetched=sum(c.bytes_fetched for c in caches),
                     hits=sum(c.hits for c in caches) + self.pinned_uses(), misses=sum(c.misses for c in caches),
                     stall_seconds=self.cache.stats.stall_seconds)
        if self.experts is not None:
            out.stall_seconds += self.experts.stall_seconds  # wall time: concurrent expert fetches overlap
        return out

    def enter(self, kind: str) -> None:
        """Open a counted inference scope (:meth:`Accounting.enter`)."""
        self.accounting.enter(kind)

    def exit(self, tokens: int = 0) -> None:
        """Close the innermost scope (:meth:`Accounting.exit`); after a model's forward (blocks idle), pin what is kept."""
        self.accounting.exit(tokens)
        if self.accounting.depth <= 1 and not self.closed:
            self._pin_kept()

    # --------------------------------------------------------------------------- weights in memory
    def _pin_kept(self) -> None:
        """Leave the blocks the cache keeps for good (``UnitCache.pin_kept``) in their modules, codes expanded per use
        aside: a kept unit costs nothing to use. Undone by :meth:`_unpin` before a unit may go (resize, clear, close)."""
        if self.pinned or not self.bindings or not self.placement.on_host or not self.cache.can_pin(len(self.bindings)):
            return  # (can_pin asked here: no trip to the I/O thread for a cache that cannot)
        names = [b.name for b in self.bindings if not self.converter.codes_kept(self.manifest, b.name)]
        try:
            units = self.call(self.cache.pin_kept, names)
        except Exception:  # noqa: BLE001 - the I/O loop is gone: nothing to pin
            return
        for b in self.bindings:
            if b.name in units:  # (a kernel tier hands the kernel forms to its layers until unpinned)
                b.pin(self.codes.expand(b.name, units[b.name]).tensors if self.codes is not None else units[b.name].tensors)
        self.pinned = bool(units)

    def pinned_uses(self) -> int:
        """Uses of pinned units: cache hits that never had to reach the cache."""
        return self.pinned_hits + sum(b.pinned_uses for b in self.bindings)

    def unpin(self) -> None:
        """Return pinned units to per-use fetching (before the cache may drop them), between inferences."""
        with self.lock:
            self._unpin()

    def _unpin(self) -> None:
        if self.pinned:
            self.pinned = False
            uses = sum(b.pinned_uses for b in self.bindings)
            for b in self.bindings:
                if b.pinned and self.codes is not None:
                    self.codes.release(b.name)
                b.unpin()
                b.pinned_uses = 0
            self.cache.unpin()  # (between inferences, before what may evict: nothing on the loop reads it now)
            self.pinned_hits += uses

    def cache_info(self) -> dict[str, Any]:
        """The cache's counters plus the requested and effective cache sizes."""
        info = self.call(self.cache.info)
        if self.pinned_uses():  # held units used without asking the cache are hits all the same
            info["hits"] += self.pinned_uses()
            info["hit_rate"] = info["hits"] / (info["hits"] + info["misses"])
        info["pinned"] = self.pinned
        n_streamed = len(self.plan.streamed) if self.plan is not None else len(self.manifest.streamed)
        info["requested_cache_size"] = self.cache.max_units
        # More than every streamed unit cannot be kept: the size that actually bounds the cache.
        info["effective_cache_size"] = min(self.cache.max_units, n_streamed)
        info["resident_mb"] = (self.plan.resident_bytes if self.plan is not None else
                               sum(u.bytes for u in self.manifest.resident)) / (1 << 20)
        info["streamed_units"] = n_streamed
        info["plan"] = self.plan.as_dict() if self.plan is not None else None
        if info["plan"] is not None:  # device hook (H): the device part of the budget
            info["plan"]["device"] = self.placement.plan_part()
        if self.experts is not None:
            info["experts"] = self.call(self.experts.info)
        return info

    def inference_stats(self) -> dict[str, Any]:
        """``get_inference_stats()`` (:meth:`Accounting.stats`)."""
        return self.accounting.stats(self._lifetime() or Totals())

    # ------------------------------------------------------------------------------- the lifecycle
    async def _shutdown(self) -> None:
        self.placement.clear()  # device hook (H)
        self.held_edges.clear()
        if self.cache is not None:
            await self.cache.clear()
        if self.experts is not None:
            await self.experts.cache.clear()
        await self.source.close()

    def close(self, timeout: float = 10.0) -> None:
        """Drop cached units, close connections and stop the I/O thread (idempotent). Inside a running event loop
        it does not wait for a graceful close (that would stall the loop): connections drop with the I/O loop."""
        if self.closed:
            return
        self.closed = True
        _OPEN.discard(self)
        self._unpin()
        if not in_running_loop():
            try:
                self.io.run(self._shutdown(), timeout)
            except Exception:  # noqa: BLE001 - best effort: the connections die with the loop anyway
                pass
        self.io.close()

    def close_nowait(self) -> None:
        """Start closing without waiting (for ``__del__``, which must never block)."""
        if self.closed:
            return
        self.closed = True
        _OPEN.discard(self)

        async def finish() -> None:
            try:
                await self._shutdown()
            finally:
                asyncio.get_running_loop().stop()

        try:
            self.io.submit(finish())
        except RuntimeError:  # the loop is already closed
            pass

    async def close_async(self) -> None:
        if not self.closed:
            await asyncio.to_thread(self.close)


_OPEN: weakref.WeakSet[StreamingEngine] = weakref.WeakSet()  # engines not closed yet (a dropped one is let go)
_registered: list = []  # the exit hook, once registered


def _track(engine: StreamingEngine) -> None:
    """Remember ``engine`` for :func:`_close_at_exit`, registered once, as one of threading's exit hooks: they run
    before thread pools shut down (the hash workers); as an ``atexit`` hook it ran after, with the last pass's
    prefetches still receiving (warnings on stderr; at worst "terminate called without an active exception")."""
    if not _registered:
        getattr(threading, "_register_atexit", atexit.register)(_close_at_exit)
        _registered.append(_close_at_exit)
    _OPEN.add(engine)


def _close_at_exit() -> None:
    """Close what scripts left open, each within :data:`EXIT_CLOSE_SECONDS` (one that never closes exits promptly)."""
    for engine in list(_OPEN):
        engine.close(EXIT_CLOSE_SECONDS)
    join_running(EXIT_CLOSE_SECONDS)  # and the I/O threads of models dropped unclosed, still finishing their close
