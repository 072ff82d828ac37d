"""Memory planner: a byte budget -> how many units to prefetch and keep, and the bound that plan holds.

Everything the client holds for a model is counted (``bound_bytes``):

* the resident parts (embeddings, final norm, lm_head…),
* at most ``cache_size + prefetch_count + 1`` streamed units alive at once — kept, fetched ahead or in
  flight, and the one computing — each at most the largest unit (a unit's tensors are views into its
  receive buffer, so a unit costs its bytes once; the buffer pool's spare is one of those slots),
* headroom for the forward pass: the KV cache (grows with sequence length and batch), hidden states and
  MLP intermediates, attention scores, the logits of the positions that need them, and
  :data:`RUNTIME_BYTES` of torch's first-call buffers,
* the measured overhead of the model besides its weights: ``meta`` skeleton, one-time set-up (``overhead_bytes``,
  anonymous memory taken by the engine right before planning, from after the model's code was imported), and the
  tokenizer once text first needs it (then the kept units shrink to make room: ``StreamingEngine.add_overhead``).

The budget is filled in this order: the unit computing (the minimum: below it the model cannot run, a
:class:`ConfigurationError` names it), then the prefetch window (up to ``prefetch_count``), then as many
kept units as fit; when the whole model fits, all of it (after the first pass nothing is fetched).

Weights stored as row shards (a large embedding / lm_head, :mod:`.edges`) are kept with the resident parts
when that leaves room for the unit computing; otherwise they are streamed like the blocks (the minimum is then
the rest of the resident parts plus one unit, a shard being at most a unit's size or the largest one).
Mixture-of-experts models (expert units, :mod:`.experts`) add two parts: the *working set* — every expert of
one layer, which one step may select at once (a long prompt routes its tokens to all of them), counted twice:
the fetched units and the compact copy the experts module computes with — and the
*expert cache*, which keeps popular experts between uses. Dense units are used by every token and experts by
a few, so the dense plan is made first and the expert cache gets what the budget leaves after it. Without
a budget the expert cache keeps ``cache_size`` layers' worth of experts.

An explicit ``cache_size`` overrides the planner (the bound is then reported, not enforced).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from ..config import DEFAULT_CACHE_SIZE, StreamingConfig
from ..exceptions import ConfigurationError
from ..format import Manifest
from ..format.manifest import UnitEntry

#: context the plan made at load time reserves KV cache and activations for (the request is not known
#: yet; ``Plan.max_batch`` / :func:`plan_memory` with ``seq_len=`` answer for a real request)
DEFAULT_PLAN_TOKENS = 256
#: torch's buffers of a forward beyond the activations (measured ~13 MiB peak over steady RSS, SmolLM2)
RUNTIME_BYTES = 16 << 20
_ELEM = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2}


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / (1 << 20):.1f} MiB"


def _names(names: list[str], most: int = 6) -> str:
    return ", ".join(names[:most]) + (f", … ({len(names)} units)" if len(names) > most else "") if names else "-"


@dataclass(frozen=True)
class Headroom:
    """Per-token costs of the forward pass, from the model's config (bytes)."""

    kv_per_token: int  # KV cache, all layers (0 for encoders)
    act_per_token: int  # hidden states, q/k/v, MLP intermediates live during one block
    logits_per_token: int  # float32 logits of one position
    heads: int  # attention heads (scores are heads x seq x seq)
    elem: int  # bytes per activation element

    def bytes(self, seq_len: int, batch: int = 1, logit_positions: int = 1) -> int:
        """Headroom for ``batch`` sequences of ``seq_len`` tokens, logits for ``logit_positions`` each."""
        scores = self.heads * seq_len * seq_len * self.elem  # one layer's scores (sdpa's math path)
        return RUNTIME_BYTES + batch * (seq_len * (self.kv_per_token + self.act_per_token) + scores
                                        + logit_positions * self.logits_per_token)


def headroom_of(manifest: Manifest) -> Headroom:
    """Estimate the forward's per-token memory from the manifest's config (missing keys count as 0)."""
    c = manifest.config
    elem = _ELEM.get(manifest.dtype, 4)
    hidden = int(c.get("hidden_size") or c.get("d_model") or c.get("n_embd") or 0)
    heads = int(c.get("num_attention_heads") or c.get("num_heads") or c.get("n_head") or 1)
    layers = int(c.get("num_hidden_layers") or c.get("num_layers") or c.get("n_layer") or len(manifest.streamed))
    kv_heads = int(c.get("num_key_value_heads") or heads)
    head_dim = int(c.get("head_dim") or (hidden // heads if heads else 0))
    inter = int(c.get("intermediate_size") or c.get("d_ff") or c.get("n_inner") or 4 * hidden)
    vocab = int(c.get("vocab_size") or 0)
    arch = manifest.architecture
    decoder = any(k in arch for k in ("CausalLM", "ConditionalGeneration", "LMHead"))
    kv = 2 * layers * kv_heads * head_dim * elem if decoder else 0
    # residual + normed + attention output + q/k/v, and the MLP's gate/up/activation
    act = elem * (4 * hidden + 2 * kv_heads * head_dim + 3 * inter)
    return Headroom(kv, act, 4 * vocab if decoder else 0, heads, elem)


@dataclass
class Plan:
    """What the client holds for one model; :meth:`as_dict` is ``get_cache_info()["plan"]``."""

    budget_bytes: int | None  # None: no budget (explicit or default cache_size)
    bound_bytes: int  # most the plan holds: resident + live units x largest + headroom + overhead
    resident: list[str]  # units kept for the model's lifetime
    streamed: list[str]  # units fetched on use
    cache_size: int  # streamed units kept between uses
    prefetch_count: int  # units fetched ahead
    resident_bytes: int
    unit_bytes: int  # the largest streamed unit
    headroom_bytes: int
    overhead_bytes: int  # measured: skeleton, one-time set-up, the tokenizer once built
    seq_len: int
    batch: int
    source: str  # "budget", "cache_size" (explicit) or "default"
    budget_from: str = "none"  # "given", "auto (...)"
    headroom: Headroom | None = field(default=None, repr=False)
    #: the accelerator's share (helper H fills it; None on the CPU) and the host's
    device: dict[str, Any] | None = None
    #: bytes of the weights stored as row shards (embedding / lm_head), and whether they are streamed
    shard_bytes: int = 0
    shards_streamed: bool = False
    #: mixture-of-experts: experts per layer (most), the largest expert unit, the working set (one layer's
    #: experts, in use at once at worst) and the expert cache (popular experts kept between uses), bytes
    experts_per_layer: int = 0
    expert_layers: int = 0
    expert_unit_bytes: int = 0
    expert_working_bytes: int = 0
    expert_cache_bytes: int = 0

    @property
    def live_units(self) -> int:
        return min(self.cache_size + self.prefetch_count + 1, len(self.streamed))

    @property
    def host(self) -> dict[str, Any]:
        return {"bound_bytes": self.bound_bytes, "resident_bytes": self.resident_bytes,
                "units": self.live_units, "unit_bytes": self.unit_bytes, "headroom_bytes": self.headroom_bytes}

    def max_batch(self, seq_len: int, logit_positions: int = 1) -> int:
        """Most sequences of ``seq_len`` tokens one forward can take within the budget (>= 1).

        Without a budget: the batch whose headroom equals the plan's (the user chose the cache, not memory).
        """
        if self.headroom is None:
            return 1
        per = max(1, self.headroom.bytes(seq_len, 1, logit_positions) - RUNTIME_BYTES)
        spare = (self.budget_bytes if self.budget_bytes is not None else self.bound_bytes) - (
            self.bound_bytes - self.headroom_bytes + RUNTIME_BYTES)
        return max(1, spare // per)

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "headroom"}
        out["live_units"], out["host"] = self.live_units, self.host
        return out

    def describe(self) -> str:
        """A few human-readable lines (``surfing inspect --memory``)."""
        whole = " (the whole model: nothing is fetched after the first pass)" if self.cache_size >= len(
            self.streamed) else ""
        return "\n".join([
            f"budget:    {_mib(self.budget_bytes)} [{self.budget_from}]",
            f"bound:     {_mib(self.bound_bytes)} = resident {_mib(self.resident_bytes)} + {self.live_units} x "
            f"{_mib(self.unit_bytes)} units + headroom {_mib(self.headroom_bytes)} "
            f"({self.seq_len} tokens x batch {self.batch}) + overhead {_mib(self.overhead_bytes)}",
            f"resident:  {_names(self.resident)}",
            *([f"shards:    {_mib(self.shard_bytes)} of embedding / lm_head rows "
               f"{'streamed (not enough memory to keep them)' if self.shards_streamed else 'kept resident'}"]
              if self.shard_bytes else []),
            f"streamed:  {len(self.streamed)} units; keep {self.cache_size}, prefetch {self.prefetch_count}{whole}",
            *([f"experts:   {self.expert_layers} layers x {self.experts_per_layer} experts of up to "
               f"{_mib(self.expert_unit_bytes)}; fetched as routed: working set {_mib(self.expert_working_bytes)} "
               f"(one layer's, fetched + compact copy), cache {_mib(self.expert_cache_bytes)} "
               f"(up to {min(self.expert_layers * self.experts_per_layer, self.expert_cache_bytes // max(1, self.expert_unit_bytes))}"
               f" of {self.expert_layers * self.experts_per_layer} experts kept, by popularity)"]
              if self.expert_layers else []),
        ])


def _experts(manifest: Manifest, config: StreamingConfig, size: Callable[[UnitEntry], int]) -> tuple[int, int, int, int]:
    """``(layers with expert units, most experts in one layer, largest expert unit's bytes, working set)``: the
    working set is one layer's experts in use at once, twice (the fetched units and the compact copy the
    experts module computes with), and, when pre-gating, up to 2 x top-k experts fetched ahead."""
    groups = manifest.expert_groups() if hasattr(manifest, "expert_groups") else {}
    per_layer = max((len(g) for g in groups.values()), default=0)
    unit = max((size(u) for g in groups.values() for u in g), default=0)
    top_k = int(manifest.config.get("num_experts_per_tok") or per_layer)
    ahead = min(2 * top_k, per_layer) if getattr(config, "expert_prefetch", False) else 0
    return len(groups), per_layer, unit, (2 * per_layer + ahead) * unit


def plan_memory(manifest: Manifest, config: StreamingConfig, *, budget: int | None = None, budget_from: str = "none",
                seq_len: int | None = None, batch: int = 1, overhead_bytes: int = 0,
                unit_bytes_of: Callable[[UnitEntry], int] | None = None, stream_shards: bool | None = None) -> Plan:
    """The plan for ``manifest`` under ``budget`` bytes (``None``: ``config.cache_size`` or the default).

    ``overhead_bytes``: what the model holds besides weights and the forward (measured by the engine);
    ``unit_bytes_of``: a unit's bytes once received (default: its stored size; larger when converted);
    ``stream_shards``: keep (``False``) or stream (``True``) the row shards as a bound model already does
    (``None``: keep them when that fits).
    Raises:
        ConfigurationError: ``budget`` is below the minimum (named in the message).
    """
    size = unit_bytes_of or (lambda entry: entry.bytes)
    shards = list(getattr(manifest, "shards", ()))
    blocks = [u.name for u in manifest.streamed]
    core = sum(size(u) for u in manifest.resident)
    shard_bytes = sum(size(u) for u in shards)
    block_unit = max((size(u) for u in manifest.streamed), default=0)
    layers, per_layer, expert_unit, working = _experts(manifest, config, size)
    hr = headroom_of(manifest)
    tokens = seq_len or min(DEFAULT_PLAN_TOKENS, int(manifest.config.get("max_position_embeddings") or 10**9))
    head = hr.bytes(tokens, batch)

    def plan(k: int, p: int, *, stream_shards: bool, source: str, expert_cache: int = 0) -> Plan:
        streamed = blocks + [u.name for u in shards] if stream_shards else blocks
        unit = max([block_unit, *(size(u) for u in shards)]) if stream_shards else block_unit
        res_bytes = core if stream_shards else core + shard_bytes
        live = min(k + p + 1, len(streamed))
        return Plan(budget, res_bytes + live * unit + head + overhead_bytes + working + expert_cache,
                    resident=[u.name for u in manifest.resident] + ([] if stream_shards else [u.name for u in shards]),
                    streamed=streamed, cache_size=k, prefetch_count=p, resident_bytes=res_bytes, unit_bytes=unit,
                    headroom_bytes=head, overhead_bytes=overhead_bytes, seq_len=tokens, batch=batch, headroom=hr,
                    budget_from=budget_from, source=source, shard_bytes=shard_bytes, shards_streamed=stream_shards,
                    experts_per_layer=per_layer, expert_layers=layers, expert_unit_bytes=expert_unit,
                    expert_working_bytes=working, expert_cache_bytes=expert_cache)

    if config.cache_size is not None or budget is None:
        k = DEFAULT_CACHE_SIZE if config.cache_size is None else config.cache_size
        return plan(k, config.prefetch_count, stream_shards=False, expert_cache=k * per_layer * expert_unit,
                    source="default" if config.cache_size is None else "cache_size")
    least = plan(0, 0, stream_shards=bool(stream_shards), source="budget")
    if budget < least.bound_bytes and shards and stream_shards is None:  # they do not fit beside one unit: stream
        least = plan(0, 0, stream_shards=True, source="budget")
    minimum = least.bound_bytes
    if budget < minimum:
        raise ConfigurationError(
            f"memory_budget {_mib(budget)} is below the minimum {_mib(minimum)} ({minimum} bytes) for "
            f"{manifest.name!r}: resident {_mib(least.resident_bytes)} + one {_mib(least.unit_bytes)} unit + "
            f"headroom {_mib(head)} for {tokens} tokens x batch {batch} + overhead {_mib(overhead_bytes)} "
            f"{f'+ one layer of experts {_mib(working)} ' if working else ''}"
            f"(tokenizer, skeleton){'; the embedding / lm_head shards already streamed' if least.shards_streamed else ''}")
    n, unit = len(least.streamed), least.unit_bytes
    spare_units = (budget - minimum) // unit if unit else n
    p = min(config.prefetch_count, spare_units, max(0, n - 1))
    # n units alive at once is the whole model: keep all of it (nothing is fetched after the first pass)
    k = n if spare_units + 1 >= n else spare_units - p
    dense = plan(k, p, stream_shards=least.shards_streamed, source="budget")
    # what the dense plan leaves keeps experts (dense units serve every token, experts a few)
    return plan(k, p, stream_shards=least.shards_streamed, source="budget",
                expert_cache=max(0, budget - dense.bound_bytes)) if working else dense
