"""``python -m streaming_weights.benchmarks.scale_child KIND ARGS_JSON OUT``: the ``scale`` case's fresh processes.

Kinds (run through :func:`.child.main`, so the import baseline, the VmHWM reset and ``multi`` are the
suite's own):

- ``scale_prepare``: a random-init LlamaForCausalLM (fixed seed) built directly in bfloat16 (one copy of the
  weights, saved in shards so the writer never holds a second one), chunked three times: bf16 as stored,
  ``quantize="int8"`` and ``quantize="int4"``. A root that is already prepared for the same config is kept.
- ``scale_reference``: transformers' ``from_pretrained`` in memory, bf16 (the tokens and logits to match).
- ``scale_stream``: :class:`~streaming_weights.models.StreamingBaseModel` (``memory_budget="auto"``, bf16
  compute) from the weight server or a local chunk directory; the cache counters are read after every token.
- ``scale_accelerate``: accelerate's disk offload (``device_map="auto"``, ``max_memory`` = cap less this
  process's RSS and a margin) of the same checkpoint, bf16.

Every generate kind decodes ``tokens`` greedy tokens from ``prompt`` and writes the float32 logits of each
step to ``logits_out`` (safetensors) for the parent to compare with the reference.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

from .child import accelerate_kwargs, main as child_main
from .fixtures import chunk_source
from .moe_child import _counters, _decode

#: chunkings of the one checkpoint: directory name -> ModelChunker(quantize=...); all cut the embedding and lm_head
#: into row shards alike (the compressed tier keeps codes for streamed blocks only; shards convert on arrival).
#: int8-channel (one scale per row) is what torch's int8 kernel computes on: the int8 'kernel' row uses it.
SCHEMES = {"bf16": None, "int8": "int8", "int4": "int4", "int8-channel": "int8-channel"}
#: bytes per checkpoint shard while saving: the writer's copy of one shard is all it adds to the model
SHARD_SIZE = "300MB"


def build_random_llama_bf16(path: Path, config: dict[str, Any], seed: int) -> Path:
    """Save a random-init ``LlamaForCausalLM`` of ``config`` (LlamaConfig keywords), initialised directly in
    bfloat16 under ``seed``, as safetensors shards of :data:`SHARD_SIZE`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # parameters are created (and initialised) in bf16: one copy
    try:
        model = LlamaForCausalLM(LlamaConfig(**config)).eval()
    finally:
        torch.set_default_dtype(before)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(str(path), max_shard_size=SHARD_SIZE)
    return path


def scale_prepare(a: dict[str, Any]) -> dict[str, Any]:
    """Build the checkpoint once per ``root`` and chunk each of :data:`SCHEMES` once: ``ready.json`` records the
    model (config, seed, name) the checkpoint was made for and the chunkings made from it, so a new chunking
    does not rebuild the checkpoint. ``shard_size``: the chunker's (default ``"auto"``; a tiny model passes bytes
    so that its embedding and lm_head are row shards as the full size's are)."""
    root = Path(a["root"])
    model = {"config": a["config"], "seed": a["seed"], "name": a["name"]}
    shard_size = a.get("shard_size", "auto")
    ready = root / "ready.json"
    state = json.loads(ready.read_text()) if ready.is_file() else {}
    if state.get("model") != model:
        state = {"model": model, "chunks": {}, "timings": {}}
    timings: dict[str, float] = {}
    if not state["timings"].get("build_s"):
        t0 = time.perf_counter()
        build_random_llama_bf16(root / "hf", a["config"], a["seed"])
        timings["build_s"] = time.perf_counter() - t0
    from ..chunker.plan import SHARD_ROW_ALIGN
    from ..format.chunkfile import DATA_ALIGN

    # chunks cut or laid out otherwise are re-chunked
    layout = {"shard_size": shard_size, "row_align": SHARD_ROW_ALIGN, "data_align": DATA_ALIGN}
    for scheme, quantize in SCHEMES.items():
        if state["chunks"].get(scheme) == layout:
            continue
        t0 = time.perf_counter()
        chunk_source(root / "hf", root / "chunks" / scheme, f"{a['name']}-{scheme}", quantize=quantize,
                     shard_size=shard_size)
        timings[f"chunk_{scheme}_s"] = time.perf_counter() - t0
        state["chunks"][scheme] = layout
    state["timings"] = state["timings"] | timings
    ready.write_text(json.dumps(state))
    return timings | {"cached": not timings}


class LogitsLog:
    """A logits processor that keeps a float32 copy of each step's scores (the argmax greedy picks from)."""

    def __init__(self) -> None:
        self.steps: list[Any] = []

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        self.steps.append(scores[0].float().clone())
        return scores

    def save(self, path: str) -> None:
        import torch
        from safetensors.torch import save_file

        save_file({"logits": torch.stack(self.steps)}, path)


def _generate(model: Any, a: dict[str, Any], t_origin: float, snapshot: Any = None, **extra: Any) -> dict[str, Any]:
    """Greedy decode (moe_child's clock and counters) with every step's logits written to ``logits_out``."""
    from transformers import LogitsProcessorList

    log = LogitsLog()
    res = _decode(model, a, t_origin, snapshot, logits_processor=LogitsProcessorList([log]), **extra)
    log.save(a["logits_out"])
    return res


def scale_reference(a: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    t_origin = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(a["path"], local_files_only=True, dtype=torch.bfloat16).eval()
    return _generate(model, a, t_origin)


def scale_accelerate(a: dict[str, Any]) -> dict[str, Any]:
    """accelerate's disk offload; ``offloaded_bytes``: the parameters it left on disk (read on every use)."""
    import torch
    from transformers import AutoModelForCausalLM

    kw = accelerate_kwargs(a)
    t_origin = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(a["path"], local_files_only=True, dtype=torch.bfloat16,
                                                 **kw).eval()
    on_disk = {name for name, where in (getattr(model, "hf_device_map", None) or {}).items() if where == "disk"}
    offloaded = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                    if any(n == d or n.startswith(d + ".") for d in on_disk))
    res = _generate(model, a, t_origin)
    return res | {"max_memory_cpu": kw["max_memory"]["cpu"], "offloaded_bytes": offloaded,
                  "disk_modules": len(on_disk)}


def scale_stream(a: dict[str, Any]) -> dict[str, Any]:
    from ..models import StreamingBaseModel

    t_origin = time.perf_counter()
    model = StreamingBaseModel(a["name"], a["location"], memory_budget="auto", dtype="bfloat16",
                               **a.get("options", {}))
    res = _generate(model, a, t_origin, lambda: _counters(model), speculation="off")
    info = model.get_cache_info()
    model.close()
    return res | {"plan": info.get("plan")}


def _reported(fn: Callable[[dict[str, Any]], dict[str, Any]]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """``fn`` with an exception returned as its result ``{"error": ...}``: one contender's failure is its row
    of the report (and, in ``multi``, the others still run)."""
    def run(a: dict[str, Any]) -> dict[str, Any]:
        try:
            return fn(a)
        except Exception as exc:  # noqa: BLE001 - reported in the contender's row
            return {"error": f"{type(exc).__name__}: {exc}"}
    return run


MEASUREMENTS = {name: _reported(fn) for name, fn in {
    "scale_prepare": scale_prepare, "scale_reference": scale_reference, "scale_stream": scale_stream,
    "scale_accelerate": scale_accelerate}.items()}


def main(argv: list[str]) -> int:
    from transformers import LlamaForCausalLM  # noqa: F401  (the model's code: part of the import baseline)

    return child_main(argv, MEASUREMENTS)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
