"""``python -m streaming_weights.benchmarks.moe_child KIND ARGS_JSON OUT``: the ``moe`` case's fresh processes.

Kinds (run through :func:`.child.main`, so the import baseline, the VmHWM reset and ``multi`` are the
suite's own):

- ``moe_prepare``: a random-init Qwen3-MoE (fixed seed) saved with ``save_pretrained`` (the hub layout,
  per-expert tensors), chunked twice: ``--experts units`` and ``--experts layer``.
- ``moe_reference``: transformers' ``from_pretrained`` of that directory, in memory.
- ``moe_stream``: :class:`~streaming_weights.models.StreamingBaseModel` from the weight server under
  ``memory_budget``; the cache counters are read after every new token.
- ``moe_accelerate``: accelerate's disk offload (``device_map="auto"``, ``max_memory``) of the same directory.

Every generate kind decodes ``tokens`` greedy tokens from ``prompt`` and returns the tokens, the time of each,
and (streaming) the bytes fetched after the first new token, so the figures are per *decoded* token: the
prompt's forward (which routes its tokens to most experts) is reported apart as ``prefill_s``.
"""

from __future__ import annotations

import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

from .child import TokenClock, accelerate_kwargs, main as child_main
from .fixtures import chunk_source

#: the two chunkings of the same checkpoint (``surfing chunk --experts units|layer``)
MODES = {"units": True, "layer": False}


def build_random_moe(path: Path, config: dict[str, Any], seed: int = 1234, embed_std: float = 1.0) -> Path:
    """Save a random-init ``Qwen3MoeForCausalLM`` of ``config`` (Qwen3MoeConfig keywords) in bfloat16.

    The input embedding is drawn with std ``embed_std`` rather than ``initializer_range`` (0.02): with the
    default, the blocks' outputs swamp the token's identity in the residual stream, deeper layers route every
    token to the same few experts (measured: 9 of 64 for a 32-token prompt in layer 8), decoding loops, and
    an expert cache looks far better than it would on a trained model, whose routing is balanced.
    """
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**config)).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, embed_std)
    model.to(torch.bfloat16).save_pretrained(str(path))
    return path


class RoutingLog:
    """The experts each experts module was handed, per forward: how spread this model's routing is."""

    def __init__(self, model: Any) -> None:
        from ..models.experts import expert_modules
        from ..models.patching import FunctionHook, add_hook

        self.picks: dict[str, list[set[int]]] = {}
        self.top_k = int(getattr(model.config, "num_experts_per_tok", 0) or 0)
        for path, (module, _) in expert_modules(model).items():
            add_hook(module, FunctionHook(pre=partial(self._record, path)))

    def _record(self, path: str, module: Any, args: tuple, kwargs: dict) -> None:
        index = kwargs.get("top_k_index", kwargs.get("router_indices"))
        index = args[1] if index is None else index
        self.picks.setdefault(path, []).append(set(index.reshape(-1).tolist()))

    def summary(self) -> dict[str, float]:
        """Experts per layer the prompt's forward used; per decoded token and layer, how many of its top-k
        experts the previous decoded token used too (uniformly random routing: k*k/E)."""
        layers = list(self.picks.values())
        shared = [len(a & b) for p in layers for a, b in zip(p[1:], p[2:])]
        return {"prefill_experts_per_layer": statistics.mean(len(p[0]) for p in layers),
                "decode_shared_with_previous": statistics.mean(shared) if shared else float("nan"),
                "top_k": self.top_k}


def moe_prepare(a: dict[str, Any]) -> dict[str, Any]:
    root = Path(a["root"])
    t0 = time.perf_counter()
    build_random_moe(root / "hf", a["config"], a.get("seed", 1234))
    out = {"build_s": time.perf_counter() - t0}
    for mode, units in MODES.items():
        t0 = time.perf_counter()
        chunk_source(root / "hf", root / "chunks" / mode, f"{a['name']}-{mode}", expert_units=units)
        out[f"chunk_{mode}_s"] = time.perf_counter() - t0
    return out


class StepClock(TokenClock):
    """A generate() streamer: the time and ids of each new token and, with ``snapshot``, the counters after
    it. The snapshots' own time is recorded (``overhead``) so it can be taken out of the token times."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]] | None = None) -> None:
        super().__init__()
        self.snapshot = snapshot
        self.ids: list[int] = []
        self.counts: list[dict[str, Any]] = []
        self.overhead: list[float] = []  # seconds spent in snapshot() after each token

    def put(self, value: Any) -> None:
        is_prompt = not self._prompt_seen
        super().put(value)
        if is_prompt:
            return
        self.ids.extend(int(i) for i in value.reshape(-1).tolist())
        if self.snapshot is not None:
            t0 = time.perf_counter()
            self.counts.append(self.snapshot())
            self.overhead.append(time.perf_counter() - t0)


def _decode(model: Any, a: dict[str, Any], t_origin: float, snapshot: Callable[[], dict[str, Any]] | None = None,
            **extra: Any) -> dict[str, Any]:
    """Greedy ``a["tokens"]`` tokens from ``a["prompt"]``: tokens, per-decoded-token seconds (and bytes with
    ``snapshot``), time to result from ``t_origin`` (before the model was built) to the last token."""
    import torch

    ids = torch.tensor([a["prompt"]])
    clock = StepClock(snapshot)
    t_gen = time.perf_counter()
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=a["tokens"],
                       min_new_tokens=a["tokens"], do_sample=False, streamer=clock, **extra)
    t, skew = clock.times, sum(clock.overhead[:-1])  # snapshots taken before the last token's time
    decoded = len(t) - 1
    res = {"tokens": clock.ids, "new_tokens": len(clock.ids), "decoded_tokens": decoded,
           "load_s": t_gen - t_origin, "prefill_s": t[0] - t_gen,
           "s_per_token": (t[-1] - t[0] - skew) / max(1, decoded), "time_to_result_s": t[-1] - t_origin - skew}
    if clock.counts:
        first, last = clock.counts[0], clock.counts[-1]
        res.update({k: (last[k] - first[k]) / max(1, decoded) for k in ("dense_bytes", "expert_bytes")},
                   counters_after_prompt=first, counters_end=last)
        res["bytes_per_token"] = res["dense_bytes"] + res["expert_bytes"]
    return res


def moe_reference(a: dict[str, Any]) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    t_origin = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(a["path"], local_files_only=True).eval()
    log = RoutingLog(model)
    return _decode(model, a, t_origin) | {"routing": log.summary()}


def moe_accelerate(a: dict[str, Any]) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    kw = accelerate_kwargs(a)
    t_origin = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(a["path"], local_files_only=True, **kw).eval()
    return _decode(model, a, t_origin) | {"max_memory_cpu": kw["max_memory"]["cpu"]}


def _counters(model: Any) -> dict[str, Any]:
    info = model.get_cache_info()
    e = info.get("experts") or {}
    return {"dense_bytes": info["bytes_fetched"], "dense_hits": info["hits"], "dense_misses": info["misses"],
            "expert_bytes": e.get("bytes_fetched", 0), "expert_hits": e.get("hits", 0),
            "expert_misses": e.get("misses", 0)}


def moe_stream(a: dict[str, Any]) -> dict[str, Any]:
    from ..models import StreamingBaseModel

    t_origin = time.perf_counter()
    model = StreamingBaseModel(a["name"], a["uri"], memory_budget=a["budget"])
    res = _decode(model, a, t_origin, lambda: _counters(model), speculation="off")
    info = model.get_cache_info()
    model.close()
    return res | {"plan": info.get("plan"), "experts": info.get("experts")}


MEASUREMENTS = {"moe_prepare": moe_prepare, "moe_reference": moe_reference, "moe_stream": moe_stream,
                "moe_accelerate": moe_accelerate}


def main(argv: list[str]) -> int:
    from transformers import Qwen3MoeForCausalLM  # noqa: F401  (the model's code: part of the import baseline)

    return child_main(argv, MEASUREMENTS)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
