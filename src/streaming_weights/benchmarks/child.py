"""``python -m streaming_weights.benchmarks.child KIND ARGS_JSON OUT``: one measurement in a fresh interpreter.

Memory and cold-start figures need a process of their own: its RSS baseline is taken after the imports,
the peak (VmHWM) is reset, then ``KIND`` runs and its JSON result is written to ``OUT``. ``multi`` runs
several kinds in one process (``--quick``, to save interpreter start-ups).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

from ..memory import current_rss, status_bytes
from .common import prompt_ids
from .fixtures import build_random_llama, chunk_source, load_manifest


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) to the current RSS
        return True
    except OSError:
        return False


def _peak() -> int:
    """This child's own peak RSS (VmHWM; ``ru_maxrss`` would carry the forking parent's peak)."""
    peak = status_bytes("VmHWM")
    if peak is None:
        raise RuntimeError("/proc/self/status has no VmHWM: peak memory cannot be measured on this system")
    return peak


class TokenClock:
    """A generate() streamer recording when each chunk of new tokens arrives (the first put is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _prompt(a: dict[str, Any]) -> Any:
    """The prompt as a (batch, length) id tensor: ``a["prompt"]`` (ids) or a fixed random one; batch rows
    after the first are random prompts of the same length (same cost per row, no padding)."""
    import torch

    first = torch.tensor([a["prompt"]]) if a.get("prompt") else prompt_ids(a["vocab"], a["prompt_len"])
    rows = [first] + [prompt_ids(a["vocab"], first.shape[1], seed=100 + i) for i in range(a.get("batch", 1) - 1)]
    return torch.cat(rows)


def _gen_kwargs(a: dict[str, Any]) -> dict[str, Any]:
    import torch

    ids = _prompt(a)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=a["tokens"],
                min_new_tokens=a["tokens"], do_sample=False)


def _timed_generate(model: Any, a: dict[str, Any], t_origin: float, **extra: Any) -> dict[str, Any]:
    import torch

    kw = _gen_kwargs(a) | extra
    clock = TokenClock() if kw["input_ids"].shape[0] == 1 else None  # streamers take batch 1 only
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**kw, streamer=clock) if clock else model.generate(**kw)
    dt = time.perf_counter() - t0
    new = int(out.shape[0] * (out.shape[1] - kw["input_ids"].shape[1]))
    return {"generate_s": dt, "tokens_per_s": new / dt, "new_tokens": new,
            "ttft": (clock.times[0] if clock and clock.times else float("nan")) - t_origin}


def _stream_kwargs(a: dict[str, Any]) -> dict[str, Any]:
    if "model_kwargs" in a:
        return dict(a["model_kwargs"])
    return {"cache_size": a["cache"], "prefetch_count": a["prefetch"]}


def child_stream(a: dict[str, Any]) -> dict[str, Any]:
    from ..models import StreamingLlamaModel

    t_origin = time.perf_counter()
    model = StreamingLlamaModel(a["name"], a["uri"], **_stream_kwargs(a))
    load = time.perf_counter() - t_origin
    extra = {"speculation": a["speculation"]} if "speculation" in a else {}
    r = _timed_generate(model, a, t_origin, **extra)
    stats, info = model.get_inference_stats(), model.get_cache_info()
    model.close()
    plan = info.get("plan")
    return r | {"load_s": load, "bytes_fetched_per_token": stats["bytes_fetched"] / max(1, r["new_tokens"]),
                "bytes_fetched": stats["bytes_fetched"], "stall_seconds": stats["stall_seconds"],
                "peak_live_units": info["peak_live_units"], "hit_rate": info["hit_rate"],
                "drafted_tokens": stats.get("drafted_tokens"), "accepted_tokens": stats.get("accepted_tokens"),
                "plan": plan if isinstance(plan, dict) else None}


async def _download(a: dict[str, Any], out: Path) -> tuple[Any, dict[str, Any]]:
    from ..client.transport import WebSocketSource

    async with WebSocketSource(a["uri"], timeout_seconds=600) as src:
        m = await src.get_manifest(a["name"])
        units = await asyncio.gather(*(src.fetch_unit(m, u.name) for u in m.units))
        state: dict[str, Any] = {}
        for u in units:
            state.update(u.tensors)
        for f in m.files:
            (out / f.name).write_bytes(await src.fetch_file(m, f.name))
        return m, state


def child_download(a: dict[str, Any]) -> dict[str, Any]:
    from safetensors.torch import save_file

    from ..models.architecture import build_config, resolve_architecture

    t_origin = time.perf_counter()
    out = Path(a["tmp"])
    out.mkdir(parents=True, exist_ok=True)
    m, state = asyncio.run(_download(a, out))
    download_s = time.perf_counter() - t_origin
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    del state
    cfg = build_config(m.model_type, m.config)
    cfg.architectures = [m.architecture]
    cfg.save_pretrained(str(out))
    model = resolve_architecture(m.architecture).from_pretrained(str(out), local_files_only=True).eval()
    load = time.perf_counter() - t_origin
    return _timed_generate(model, a, t_origin) | {"load_s": load, "download_s": download_s}


def child_hf(a: dict[str, Any], **kw: Any) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    t_origin = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(a["path"], local_files_only=True, **kw).eval()
    load = time.perf_counter() - t_origin
    return _timed_generate(model, a, t_origin) | {"load_s": load}


def child_accelerate(a: dict[str, Any]) -> dict[str, Any]:
    """accelerate's big-model inference: weights beyond ``max_memory`` offloaded to disk. Under a cap, its
    CPU budget is what the cap leaves after this process's runtime and a margin for activations."""
    kw = accelerate_kwargs(a)
    return child_hf(a, **kw) | {"max_memory_cpu": kw["max_memory"]["cpu"]}


def accelerate_kwargs(a: dict[str, Any]) -> dict[str, Any]:
    """``from_pretrained`` keywords of accelerate's disk offload: ``max_memory`` is ``a["budget"]``, or under a
    cap ``a["cap"]`` less this process's RSS and ``a["margin"]``; the rest goes to ``a["offload"]``."""
    Path(a["offload"]).mkdir(parents=True, exist_ok=True)
    budget = int(a["budget"]) if a.get("budget") else max(32 << 20, int(a["cap"]) - current_rss() - a["margin"])
    return {"device_map": "auto", "max_memory": {"cpu": budget}, "offload_folder": a["offload"]}


def child_airllm(a: dict[str, Any]) -> dict[str, Any]:
    from airllm import AutoModel  # type: ignore[import-not-found]

    t_origin = time.perf_counter()
    model = AutoModel.from_pretrained(a["path"], device="cpu", layer_shards_saving_path=a["shards"])
    load = time.perf_counter() - t_origin
    kw = _gen_kwargs(a)
    t0 = time.perf_counter()
    model.generate(kw["input_ids"], max_new_tokens=a["tokens"], min_new_tokens=a["tokens"], do_sample=False,
                   use_cache=True, return_dict_in_generate=True)
    dt = time.perf_counter() - t0
    return {"generate_s": dt, "tokens_per_s": a["tokens"] / dt, "new_tokens": a["tokens"], "ttft": float("nan"),
            "load_s": load}


def child_airllm_prepare(a: dict[str, Any]) -> dict[str, Any]:
    """Let AirLLM split the checkpoint into its per-layer shards (once, uncapped, before the timed runs)."""
    from airllm import AutoModel  # type: ignore[import-not-found]

    t0 = time.perf_counter()
    AutoModel.from_pretrained(a["path"], device="cpu", layer_shards_saving_path=a["shards"])
    return {"seconds": time.perf_counter() - t0}


def child_chunk(a: dict[str, Any]) -> dict[str, Any]:
    src = Path(a["source"])
    files = [p for p in src.rglob("*") if p.is_file()] if src.is_dir() else [src]
    t0 = time.perf_counter()
    chunk_source(src, Path(a["out"]), "bench-chunk")
    dt = time.perf_counter() - t0
    m = load_manifest(Path(a["out"]))
    return {"seconds": dt, "bytes_written": m.total_bytes, "source_bytes": sum(p.stat().st_size for p in files),
            "largest_unit": max(u.bytes for u in m.units)}


MEASUREMENTS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "stream": child_stream, "download": child_download, "hf_memory": child_hf, "accelerate": child_accelerate,
    "airllm": child_airllm, "airllm_prepare": child_airllm_prepare, "chunk": child_chunk,
}


Measurements = dict[str, Callable[[dict[str, Any]], dict[str, Any]]]


def measure(kind: str, args: dict[str, Any], table: Measurements | None = None) -> dict[str, Any]:
    """Run measurement ``kind`` (of ``table``, default :data:`MEASUREMENTS`) with the peak RSS reset first;
    adds baseline/peak RSS to its result."""
    table = MEASUREMENTS if table is None else table
    if kind not in table:
        raise SystemExit(f"unknown benchmark child {kind!r}")
    baseline = current_rss()
    peak_reset = _reset_peak()
    res = table[kind](args)
    res["baseline_rss"] = baseline
    res["peak_rss"] = _peak()
    res["peak_over_baseline"] = max(0, res["peak_rss"] - baseline) if peak_reset else float("nan")
    return res


def _import_baseline(kinds: list[str]) -> None:
    """Import everything the measured code imports, before the clock and the peak reset."""
    import safetensors.torch  # noqa: F401
    import torch
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: F401

    from .. import models  # noqa: F401
    from ..client import transport  # noqa: F401

    if any("accelerate" in k for k in kinds):
        import accelerate  # noqa: F401
    if "airllm" in kinds or "airllm_prepare" in kinds:
        import airllm  # noqa: F401  # type: ignore[import-not-found]
    if "chunk" in kinds:
        from .. import chunker  # noqa: F401
    torch.set_grad_enabled(False)


def main(argv: list[str], table: Measurements | None = None) -> int:
    """``KIND ARGS_JSON OUT``: run one measurement of ``table`` (default :data:`MEASUREMENTS`; other child
    modules pass their own) or ``multi`` of them, and write its JSON result to ``OUT``."""
    kind, args, out = argv[0], json.loads(argv[1]), Path(argv[2])
    if kind == "build_llama":
        build_random_llama(Path(args.pop("path")), **args)
        out.write_text("{}")
        return 0
    kinds = [k for k, _ in args["runs"]] if kind == "multi" else [kind]
    _import_baseline(kinds)
    if args.get("threads"):
        import torch

        torch.set_num_threads(int(args["threads"]))  # one compute thread: the client owns one core
    if kind == "multi":
        res: dict[str, Any] = {"results": [measure(k, a, table) for k, a in args["runs"]]}  # in the order given
    else:
        res = measure(kind, args, table)
    out.write_text(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
