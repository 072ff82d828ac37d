"""Routed experts: a mixture-of-experts layer fetches only the experts its router picks.

transformers 5 stores a layer's experts fused, as 3-D parameters of one *experts module*
(``experts.gate_up_proj`` ``[E, 2I, H]``, ``experts.down_proj`` ``[E, H, I]``, biases ``[E, ·]`` where the family
has them), whose forward takes ``(hidden_states, top_k_index, top_k_weights)`` from the layer's own router
(the class is wrapped by ``@use_experts_implementation``). Each expert's rows of those tensors are a unit of
their own (role ``expert``, docs/format.md). Right before the experts module runs, :class:`ExpertBinding`
takes the union of the experts the router selected (over tokens and batch rows), fetches those units
concurrently, and hands the module *compact* weights — the selected experts' rows, in expert order — with
the indices remapped onto them and ``num_experts`` set to their count. The module's own forward (eager,
grouped or batched, whichever ``experts_implementation`` transformers selected) then runs unchanged: it
visits the same experts in the same order on the same rows, so the result is the one transformers computes
with all experts in memory. Right after, the meta placeholders come back and the units are released.
"""

from __future__ import annotations

import asyncio
import bisect
import inspect
import time
from typing import Any, Awaitable, Callable

import torch
from torch import nn

from ..client.cache import UnitCache
from ..client.policy import make_policy
from ..exceptions import ManifestError
from .patching import ModuleHook, add_hook

#: names transformers gives the experts forward's routing arguments (indices, then weights)
_INDEX_ARGS = ("top_k_index", "router_indices")


def _is_experts(module: nn.Module) -> int:
    """``num_experts`` if ``module`` is a fused experts module routed by index, else 0."""
    n = getattr(module, "num_experts", None)
    params = list(module.parameters(recurse=False))
    if not isinstance(n, int) or isinstance(n, bool) or n < 1 or not params:
        return 0
    if any(p.dim() < 2 or p.shape[0] != n for p in params):
        return 0
    try:
        names = list(inspect.signature(type(module).forward).parameters)
    except (TypeError, ValueError):
        return 0
    return n if len(names) >= 4 and names[2] in _INDEX_ARGS else 0


def expert_modules(model: nn.Module) -> dict[str, tuple[nn.Module, int]]:
    """``{module path: (experts module, num_experts)}`` of every fused, index-routed experts module."""
    out = {}
    for path, module in model.named_modules():
        n = _is_experts(module)
        if n:
            out[path] = (module, n)
    return out


Acquire = Callable[[list[str]], dict[str, dict[str, torch.Tensor]]]
Release = Callable[[list[str]], None]
#: told which experts a binding's router picked, with the hidden states it routed: ``(binding, hidden, ids)``
OnRoute = Callable[["ExpertBinding", torch.Tensor, list[int]], None]


def router_of(root: nn.Module, path: str, num_experts: int) -> tuple[str, int] | None:
    """``(path of the router, its top-k)`` beside the experts module at ``path``: the sibling module with a
    ``weight`` of ``num_experts`` rows (Qwen's ``gate``, gpt-oss's ``router``…), or ``None``."""
    parent_path = path.rpartition(".")[0]
    parent = root.get_submodule(parent_path) if parent_path else root
    for name, child in parent.named_children():
        weight = child._parameters.get("weight")
        if weight is not None and weight.dim() == 2 and weight.shape[0] == num_experts and not _is_experts(child):
            k = getattr(child, "top_k", None) or getattr(root.config, "num_experts_per_tok", None)
            return (f"{parent_path}.{name}" if parent_path else name), int(k or 1)
    return None


class ExpertBinding(ModuleHook):
    """Streams the experts of the experts module at ``path`` through ``acquire`` / ``release`` callbacks.

    Args:
        root: the meta-built model.
        path: the experts module's path (``model.layers.3.mlp.experts``).
        units: ``[(unit name, start, stop, {tensor name: (shape)})]`` of its expert units.
        acquire: fetches several units at once, ``{unit: {tensor name: tensor}}``.
        release: gives them back once the module has run.

    Raises:
        ManifestError: the units do not tile the module's experts, or their tensors do not match its
            parameters (names, count or shapes): the manifest disagrees with the config.
    """

    def __init__(self, root: nn.Module, path: str, units: list[tuple[str, int, int, dict[str, tuple[int, ...]]]],
                 acquire: Acquire, release: Release, on_route: OnRoute | None = None) -> None:
        self.path = path
        self._on_route = on_route
        self.module = root.get_submodule(path)
        self.num_experts = self.module.num_experts
        self.units = sorted(units, key=lambda u: u[1])
        self._starts = [u[1] for u in self.units]
        self._placeholders = dict(self.module._parameters)
        self._acquire, self._release = acquire, release
        self._held: list[str] = []
        self._check()
        self._patch = add_hook(self.module, self)

    def _check(self) -> None:
        expected = 0
        params = {f"{self.path}.{k}": tuple(v.shape) for k, v in self._placeholders.items() if v is not None}
        for name, start, stop, tensors in self.units:
            if start != expected:
                raise ManifestError(f"experts of {self.path!r}: unit {name!r} starts at expert {start}, expected "
                                    f"{expected} (expert units must tile 0..{self.num_experts - 1} without gaps)")
            expected = stop
            if set(tensors) != set(params):
                raise ManifestError(f"experts of {self.path!r}: unit {name!r} holds {sorted(tensors)}, the model's "
                                    f"experts module has {sorted(params)}")
            for t, shape in tensors.items():
                if tuple(shape) != (stop - start, *params[t][1:]):
                    raise ManifestError(f"experts of {self.path!r}: unit {name!r} stores {t!r} as {list(shape)}, the "
                                        f"config makes it {[stop - start, *params[t][1:]]}")
        if expected != self.num_experts:
            raise ManifestError(f"experts of {self.path!r}: the manifest has {expected} experts, the config "
                                f"{self.num_experts}: the manifest does not belong to this config")

    def unit_of(self, expert: int) -> tuple[str, int, int, Any]:
        return self.units[bisect.bisect_right(self._starts, expert) - 1]

    def pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        args, kwargs = list(args), dict(kwargs)
        where = next((k for k in _INDEX_ARGS if k in kwargs), None)
        index = kwargs[where] if where else args[1]
        ids = torch.unique(index[(index >= 0) & (index < self.num_experts)]).tolist()  # sorted
        spots = [(unit[0], e - unit[1]) for e in ids for unit in (self.unit_of(e),)]  # (unit, row in it)
        needed = list(dict.fromkeys(name for name, _ in spots))
        hidden = args[0] if args else kwargs["hidden_states"]
        if self._on_route is not None:
            self._on_route(self, hidden, ids)
        fetched = self._acquire(needed) if needed else {}
        self._held = needed
        device = hidden.device
        for key in self._placeholders:
            full = f"{self.path}.{key}"
            rows = [fetched[name][full][row:row + 1] for name, row in spots]
            weight = rows[0] if len(rows) == 1 else torch.cat(rows) if rows else self._empty(key)
            module._parameters[key] = nn.Parameter(weight.to(device), requires_grad=False)
        # expert e -> its position among the selected ones; anything else (a sentinel) -> the new count
        lut = torch.full((self.num_experts + 1,), len(ids), dtype=index.dtype, device=index.device)
        if ids:
            lut[torch.tensor(ids, device=index.device)] = torch.arange(len(ids), dtype=index.dtype, device=index.device)
        outside = (index < 0) | (index > self.num_experts)
        remapped = lut[torch.where(outside, self.num_experts, index)]  # anything not an expert stays a sentinel
        if where:
            kwargs[where] = remapped
        else:
            args[1] = remapped
        module.num_experts = len(ids)
        return tuple(args), kwargs

    def _empty(self, key: str) -> torch.Tensor:
        shape = self._placeholders[key].shape
        return torch.empty((0, *shape[1:]), dtype=self._placeholders[key].dtype)

    def post_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        module._parameters.update(self._placeholders)
        module.num_experts = self.num_experts
        held, self._held = self._held, []
        if held:
            self._release(held)

    def remove(self) -> None:
        self._patch.remove()
        self.module._parameters.update(self._placeholders)
        self.module.num_experts = self.num_experts


class ExpertStreams:
    """A model's expert cache (popular experts kept within the plan's ``expert_cache_bytes``; nothing is
    prefetched along an order: which experts come next is the router's choice) and its expert bindings.

    With ``pregate``, while layer *i*'s experts are fetched, layer *i+1*'s router (from its dense unit, if that
    has arrived) is applied to layer *i*'s hidden states and the experts it predicts are fetched ahead (at most
    twice the router's top-k; mispredictions join the cache, which evicts by popularity). ``info()`` reports
    the prediction's hit rate.

    Built by :meth:`bind`; ``run`` / ``call`` are the engine's bridge onto its I/O loop, ``peek`` returns an
    arrived dense unit (or ``None``) without fetching it.
    """

    def __init__(self, cache: UnitCache, run: Callable[..., Any], call: Callable[..., Any],
                 peek: Callable[[str], Any] | None = None) -> None:
        self.cache = cache
        self._run, self._call, self._peek = run, call, peek
        self.bindings: list[ExpertBinding] = []
        self.routers: dict[int, tuple[str, str, int]] = {}  # binding id -> (dense unit, router path, top-k)
        self.predicted: dict[int, list[int]] = {}  # binding id -> experts fetched ahead for it
        self.counts = {"predicted": 0, "predicted_used": 0, "routed": 0, "skipped": 0}
        self.stall_seconds = 0.0

    @classmethod
    def bind(cls, manifest: Any, root: nn.Module, plan: Any, fetch: Callable[[str], Awaitable[Any]],
             run: Callable[..., Any], call: Callable[..., Any], trace: bool = False,
             peek: Callable[[str], Any] | None = None) -> ExpertStreams | None:
        """Hook every experts module of ``root`` that ``manifest`` has expert units for (``None``: it has none);
        ``peek`` given: pre-gate (see the class).

        Raises:
            ManifestError: the manifest's expert units do not match the model's experts modules.
        """
        groups = manifest.expert_groups()
        if not groups:
            return None
        cache = UnitCache(fetch, make_policy("popularity", []), {u.name: u.bytes for u in manifest.experts},
                          max_units=len(manifest.experts) if plan.expert_cache_bytes else 0,
                          max_bytes=plan.expert_cache_bytes, prefetch_count=0, trace=trace)
        self = cls(cache, run, call, peek)
        dense = [u.name for u in manifest.streamed]
        for path, units in groups.items():
            try:
                module = root.get_submodule(path)
            except AttributeError:
                raise ManifestError(f"manifest {manifest.name!r} has expert units for {path!r}, which "
                                    f"{type(root).__name__} built from its config does not have") from None
            spans = [(u.name, *u.rows, {t: s.shape for t, s in u.tensors.items()}) for u in units]
            binding = ExpertBinding(root, path, spans, self.acquire, self.release,
                                    self._route if peek is not None else None)
            router = router_of(root, path, getattr(module, "num_experts", 0))
            unit = next((d for d in dense if router and router[0].startswith(d + ".")), None)
            if router is not None and unit is not None:
                self.routers[id(binding)] = (unit, *router)
            self.bindings.append(binding)
        return self

    def _route(self, binding: ExpertBinding, hidden: torch.Tensor, ids: list[int]) -> None:
        """Score the prediction made for ``binding``, settle its leftovers, predict for the next binding."""
        ahead = self.predicted.pop(id(binding), [])
        if ahead:
            used = set(ids)
            self.counts["predicted_used"] += sum(e in used for e in ahead)
            self.counts["routed"] += len(ids)
            unused = [binding.unit_of(e)[0] for e in ahead if e not in used]
            self._call(self.cache.settle, unused)
        at = self.bindings.index(binding)
        if at + 1 < len(self.bindings):
            self._pregate(self.bindings[at + 1], hidden)

    def _pregate(self, nxt: ExpertBinding, hidden: torch.Tensor) -> None:
        known = self.routers.get(id(nxt))
        arrived = self._peek(known[0]) if known else None
        weight = arrived.tensors.get(f"{known[1]}.weight") if arrived is not None else None
        if weight is None:
            self.counts["skipped"] += 1
            return
        with torch.no_grad():
            logits = torch.nn.functional.linear(hidden.reshape(-1, weight.shape[1]).to(weight.dtype),
                                                weight.to(hidden.device))
            picks = torch.unique(logits.topk(min(known[2], weight.shape[0]), dim=-1).indices).tolist()
        if len(picks) > 2 * known[2]:  # a long prompt: nearly every expert, nothing to gain
            self.counts["skipped"] += 1
            return
        self.predicted[id(nxt)] = picks
        self.counts["predicted"] += len(picks)
        self._call(self.cache.fetch_ahead, list(dict.fromkeys(nxt.unit_of(e)[0] for e in picks)))

    def acquire(self, names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
        """The tensors of expert units ``names``, fetched concurrently (blocks until all are verified)."""
        return self._run(self._acquire(names), "a forward pass",
                         "await model.forward_async(...)` / `await model.generate_async(...)")

    async def _acquire(self, names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
        t0 = time.perf_counter()
        got = await asyncio.gather(*(self.cache.acquire(n, prefetch=False) for n in names), return_exceptions=True)
        self.stall_seconds += time.perf_counter() - t0  # wall time: the fetches overlap each other
        failed = [g for g in got if isinstance(g, BaseException)]
        if failed:  # give back the ones that arrived, report the first failure
            for name, unit in zip(names, got):
                if not isinstance(unit, BaseException):
                    self.cache.release(name)
            raise failed[0]
        return {n: u.tensors for n, u in zip(names, got)}

    def release(self, names: list[str]) -> None:
        self._call(lambda: [self.cache.release(n) for n in names])

    def info(self) -> dict[str, Any]:
        """Expert hits, misses, bytes (``get_cache_info()["experts"]``); call on the I/O loop."""
        e = self.cache.info()
        out = {k: e[k] for k in ("hits", "misses", "hit_rate", "fetches", "bytes_fetched", "evictions", "cached_mb")}
        out["stall_seconds"] = self.stall_seconds
        out.update(cached=e["cache_size"], capacity_bytes=self.cache.max_bytes, units=len(self.cache.sizes),
                   layers=len(self.bindings), prefetch_hits=e["prefetch_hits"])
        if self._peek is not None:
            c = self.counts
            out["pregate"] = dict(c, hit_rate=c["predicted_used"] / c["routed"] if c["routed"] else 0.0,
                                  precision=c["predicted_used"] / c["predicted"] if c["predicted"] else 0.0)
        return out


__all__ = ["ExpertBinding", "ExpertStreams", "expert_modules"]
