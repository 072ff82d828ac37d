"""Case ``scale`` (issue 26 item 6): a TinyLlama-1.1B-shaped model inside a 1.5 GB cap, ours vs accelerate.

A LlamaForCausalLM of TinyLlama-1.1B's shape (hidden 2048, intermediate 5632, 22 layers, 32 heads, 4 KV heads,
vocabulary 32000; random weights, fixed seed) is saved as a bf16 safetensors checkpoint (~2.2 GB, built once and
kept in the cache directory, ``--quick``: a tiny shape in the run's temporary directory) and chunked three
times: bf16, int8 and int4. Each contender decodes the same greedy tokens from the same fixed prompt in a fresh
process inside a 1.5 GB cgroup cap (page cache counted), its files evicted first, pinned to the client core
with one compute thread, bf16 compute; the weight server (all three chunkings) is pinned to the other core and
warmed (its cache holds every unit) before the timed runs. transformers in memory runs uncapped once: the
tokens and logits every contender is compared with. Beside each figure: the physical limit, bytes per token
over the measured bandwidth of the link it came over (raw TCP on loopback, pinned, for the server rows;
``dd iflag=direct`` of chunk files for the local directory and accelerate's offloaded weights).
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from typing import Any

from ..netutil import free_port
from . import rawsender
from .common import MiB, module_command, process, prompt_ids, run_child, summarize, weight_server_process
from .disk import dd_direct
from .fixtures import load_manifest
from .generation import ACCEL_MARGIN
from .sandbox import evict, pinned_here
from .scale_child import SCHEMES

#: TinyLlama-1.1B's shape (LlamaConfig keywords)
FULL = {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
        "num_attention_heads": 32, "num_key_value_heads": 4}
#: the smoke test's shape (seconds); its embedding and lm_head are cut into two row shards each (as the full
#: size's are by the chunker's "auto": each is larger than a layer), so the quick run takes the same paths
QUICK = {"vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2}
QUICK_SHARD_BYTES = 64 << 10
COMMON = {"max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "pad_token_id": 0,
          "bos_token_id": 1, "eos_token_id": 2}
SEED = 1234
CAP = 1_500_000_000  # the issue's 1.5 GB client cap (RSS + page cache, no swap)
TOKENS, PROMPT_LEN = 6, 16  # time to result = from building the model to the 6th new token
TITLE = "Scale: a TinyLlama-1.1B-shaped model (bf16, int8, int4) inside a 1.5 GB cap, ours vs accelerate"
#: issue 26's goals: accelerate's time to result over the contender's (paired per round)
GOALS = {"local": ">= 1.5", "server": ">= 1.0", "int8_codes": ">= 5", "int8_kernel": ">= 5"}
LABELS = {"transformers": "transformers in memory (uncapped, reference)", "server": "ours, weight server (bf16)",
          "local": "ours, local chunk directory (bf16)", "int8_codes": "ours, server, int8 codes",
          "int4_codes": "ours, server, int4 codes", "int8_kernel": "ours, server, int8-channel kernel",
          "int4_kernel": "ours, server, int4 kernel", "accelerate": "accelerate disk offload (bf16)"}
LOSSLESS = ("server", "local", "accelerate")  # tokens must equal transformers'


def kernel_supported() -> bool:
    """Whether this build's ``StreamingConfig`` accepts ``quantized_in_memory="kernel"`` (compute on codes)."""
    from ..config import StreamingConfig
    from ..exceptions import ConfigurationError

    try:
        StreamingConfig(quantized_in_memory="kernel")
    except ConfigurationError:
        return False
    return True


def contenders(root: Path, prefix: str, uri: str, kernel: bool) -> dict[str, tuple[str, dict[str, Any]]]:
    """name -> (child kind, its arguments); the ``*_kernel`` rows only where ``kernel`` (the hook)."""
    def stream(scheme: str, location: str, **options: Any) -> tuple[str, dict[str, Any]]:
        return "scale_stream", {"name": f"{prefix}-{scheme}", "location": location, "options": options}

    c = {"server": stream("bf16", uri), "local": stream("bf16", str(root / "chunks" / "bf16")),
         "int8_codes": stream("int8", uri, quantized_in_memory="codes"),
         "int4_codes": stream("int4", uri, quantized_in_memory="codes")}
    if kernel:
        c |= {"int8_kernel": stream("int8-channel", uri, quantized_in_memory="kernel"),
              "int4_kernel": stream("int4", uri, quantized_in_memory="kernel")}
    c["accelerate"] = ("scale_accelerate", {"path": str(root / "hf"), "offload": str(root / "offload"), "cap": CAP,
                                            "margin": ACCEL_MARGIN})
    return c


def disk_bandwidth(files: list[Path]) -> dict[str, Any]:
    """``dd if=FILE of=/dev/null bs=4M iflag=direct`` (the disk case's :func:`.disk.dd_direct`) of each file
    after evicting it: bytes/s over all of them, or ``{"error": ...}`` (e.g. a filesystem without O_DIRECT)."""
    seconds = 0.0
    for f in files:
        evict([f])
        try:
            seconds += dd_direct(f)
        except (subprocess.CalledProcessError, IndexError, ValueError) as exc:
            return {"error": f"dd iflag=direct failed on {f.name}: {exc}"}
    total = sum(f.stat().st_size for f in files)
    return {"Bps": total / seconds, "bytes": total, "files": len(files)}


def pipe_bandwidth(file: Path, ctx: Any, repeats: int) -> dict[str, Any]:
    """Raw TCP on loopback (the transfer case's sender, pinned to the server core; this process receives on
    the client core): bytes/s of each of ``repeats`` receipts of ``file`` after one warm-up."""
    size, port = file.stat().st_size, free_port()
    with process(module_command("rawsender", str(file), str(port)), port, cpus=ctx.server_cpus), \
            pinned_here(ctx.client_cpus):
        rawsender.receive_once(port, size)
        return {"Bps": [size / rawsender.receive_once(port, size) for _ in range(repeats)], "bytes": size}


async def _warm(uri: str, names: list[str]) -> None:
    """Fetch every unit of ``names`` once, so the server's cache holds them before the timed runs."""
    from ..client.transport import WebSocketSource

    async with WebSocketSource(uri, timeout_seconds=600) as src:
        for name in names:
            m = await src.get_manifest(name)
            for u in m.units:
                await src.fetch_unit(m, u.name)


def _evict_for(root: Path, name: str) -> list[Path]:
    return [root / "hf", root / "offload"] if name == "accelerate" else [root / "chunks"]


def _runs(ctx: Any, root: Path, todo: dict[str, tuple[str, dict[str, Any]]], base: dict[str, Any],
          rounds: int, logits: Path) -> dict[str, list[dict[str, Any]]]:
    """The reference (uncapped) once, then ``rounds`` interleaved rounds of every contender inside the cap
    (--quick: everything in one uncapped process)."""
    ref = ["scale_reference", base | {"path": str(root / "hf"), "logits_out": str(logits / "transformers-0")}]
    runs = [[kind, base | args | {"logits_out": str(logits / f"{name}-0")}] for name, (kind, args) in todo.items()]
    if ctx.quick:
        ctx.say("scale: reference and contenders in one process (--quick)")
        r = run_child("multi", {"runs": [ref, *runs], "threads": 1}, 600, cpus=ctx.client_cpus, module="scale_child")
        results = r.get("results") or [r] * (len(todo) + 1)
        return {n: [res | {"round": 0}] for n, res in zip(["transformers", *todo], results)}
    ctx.say("scale: transformers in memory (uncapped reference)")
    evict([root / "hf"])
    out = {"transformers": [run_child(*ref, 900, cpus=ctx.client_cpus, module="scale_child")]}
    for i in range(rounds):
        for name, (kind, args) in todo.items():
            ctx.say(f"scale: {name} ({i + 1}/{rounds})")
            res = ctx.sandboxed(kind, base | args | {"logits_out": str(logits / f"{name}-{i}")}, cap=CAP,
                                evict_paths=_evict_for(root, name), timeout=600, module="scale_child")
            ctx.say(f"  -> {res['error'] if 'error' in res else _said(res)}")
            out.setdefault(name, []).append(res | {"round": i})
    return out


def _said(r: dict[str, Any]) -> str:
    return f"{r['time_to_result_s']:.1f} s to result, {r['s_per_token']:.2f} s/decoded token"


def _agreement(r: dict[str, Any], ref: dict[str, Any], ref_logits: Any, path: Path) -> dict[str, Any]:
    """Token identity with the reference and the largest |logit difference| over the steps whose prefix is
    the reference's (step 0 always: the prompt's forward; after a differing token the inputs differ)."""
    import torch
    from safetensors.torch import load_file

    own = load_file(str(path))["logits"]
    same = 0
    while same < min(len(r["tokens"]), len(ref["tokens"])) and r["tokens"][same] == ref["tokens"][same]:
        same += 1
    n = min(same + 1, own.shape[0], ref_logits.shape[0])
    a, b = own[:n], ref_logits[:n]
    finite = torch.isfinite(a) & torch.isfinite(b)  # min_new_tokens masks the EOS id to -inf in both
    return {"tokens_identical": r["tokens"] == ref["tokens"], "logits_steps_compared": n,
            "logits_max_abs_diff": float((a - b).abs()[finite].max()), "reference_logit_max_abs": float(
                b[finite].abs().max())}


def _compare(runs: dict[str, list[dict[str, Any]]], logits: Path) -> None:
    """Add :func:`_agreement` with the reference to every run that finished."""
    from safetensors.torch import load_file

    ref = runs["transformers"][0]
    if "error" in ref:
        return
    ref_logits = load_file(str(logits / "transformers-0"))["logits"]
    for name, rs in runs.items():
        for i, r in enumerate(rs):
            if "error" not in r and name != "transformers":
                r.update(_agreement(r, ref, ref_logits, logits / f"{name}-{r.get('round', i)}"))


def _bytes_per_token(name: str, r: dict[str, Any]) -> float:
    """Streaming: bytes fetched per decoded token; accelerate: the weights it offloaded (read on each use)."""
    return float(r["offloaded_bytes"] if name == "accelerate" else r.get("bytes_per_token", float("nan")))


def _limit(name: str, r: dict[str, Any], bw: dict[str, float]) -> float:
    """Physical limit of one decoded token: its bytes over the bandwidth of the link they came over."""
    link = "disk" if name in ("local", "accelerate") else "pipe"
    return _bytes_per_token(name, r) / bw[link] if bw.get(link) else float("nan")


def _over(a: float, b: float) -> float:
    """``a / b``, NaN where ``b`` is 0 (a contender that fetched nothing per token has no limit to compare)."""
    return a / b if b else float("nan")


def _metrics(runs: dict[str, list[dict[str, Any]]], bw: dict[str, float]) -> tuple[dict, dict, list[str]]:
    metrics: dict[str, Any] = {}
    ratios: dict[str, Any] = {}
    notes = [f"{LABELS[n]}: a run FAILED ({r['error']})." for n, rs in runs.items() for r in rs if "error" in r]
    ok = {n: [r for r in rs if "error" not in r] for n, rs in runs.items()}
    for name, rs in ok.items():
        if not rs:
            continue
        def m(key: str, unit: str, f: Any, rs: list[dict[str, Any]] = rs, name: str = name) -> None:
            vals = [v for v in map(f, rs) if v == v]  # NaN: not applicable (e.g. nothing fetched: no limit)
            if vals:
                metrics[f"{name}_{key}"] = summarize(vals, unit)
        m("time_to_result_s", "s (build model -> 6th token)", lambda r: r["time_to_result_s"])
        m("s_per_token", "s/decoded token", lambda r: r["s_per_token"])
        m("peak_rss_MiB", "MiB (VmHWM)", lambda r: r["peak_rss"] / MiB)
        if name == "transformers":
            continue
        m("MiB_per_token", "MiB/decoded token" + (" (offloaded)" if name == "accelerate" else " fetched"),
          lambda r: _bytes_per_token(name, r) / MiB)
        m("limit_s_per_token", "s/decoded token (bytes / bandwidth)", lambda r: _limit(name, r, bw))
        m("tokens_identical_to_transformers", "1 = yes", lambda r: float(r["tokens_identical"]))
        m("logits_max_abs_diff", "max |logit - reference logit|", lambda r: r["logits_max_abs_diff"])
        over = [v for v in (_over(r["s_per_token"], _limit(name, r, bw)) for r in rs) if v == v]
        if over:  # a contender that fetched nothing per token has no limit to compare with
            ratios[f"{name}_s_per_token_over_limit"] = summarize(over, "x")
    for name, rs in ok.items():
        if name in ("transformers", "accelerate") or not ok.get("accelerate"):
            continue
        acc = {r["round"]: r for r in ok["accelerate"]}
        pairs = [(acc[r["round"]], r) for r in rs if r.get("round") in acc]
        ratios[f"accelerate_over_{name}_time_to_result"] = summarize(
            [a["time_to_result_s"] / b["time_to_result_s"] for a, b in pairs], "x") | (
            {"goal": GOALS[name]} if name in GOALS else {})
        ratios[f"accelerate_over_{name}_s_per_token"] = summarize(
            [a["s_per_token"] / b["s_per_token"] for a, b in pairs], "x")
    return metrics, ratios, notes


def _table(runs: dict[str, list[dict[str, Any]]], bw: dict[str, float]) -> list[str]:
    """One row per contender (medians of its runs; time to result of every run)."""
    import statistics

    rows = ["| contender | time to result (s), each run | s / decoded token | MiB / decoded token | physical limit "
            "(s / token) | s/token over limit | peak VmHWM (MiB) | tokens = transformers | max abs logit diff "
            "(steps) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            rows.append(f"| {LABELS[name]} | failed: {rs[0]['error'][:160]} | | | | | | | |")
            continue
        med = lambda f: statistics.median(f(r) for r in ok)  # noqa: E731
        each = " / ".join(f"{r['time_to_result_s']:.1f}" for r in ok)
        if name == "transformers":
            rows.append(f"| {LABELS[name]} | {each} | {med(lambda r: r['s_per_token']):.3f} | in memory | | | "
                        f"{med(lambda r: r['peak_rss']) / MiB:.0f} | reference | reference |")
            continue
        limit = med(lambda r: _limit(name, r, bw))
        same = "yes" if all(r["tokens_identical"] for r in ok) else "**NO**" if name in LOSSLESS else "no (lossy)"
        diff = f"{max(r['logits_max_abs_diff'] for r in ok):.3g} ({min(r['logits_steps_compared'] for r in ok)})"
        rows.append(f"| {LABELS[name]} | {each} | {med(lambda r: r['s_per_token']):.3f} | "
                    f"{med(lambda r: _bytes_per_token(name, r)) / MiB:.0f} | {limit:.3f} | "
                    f"{_over(med(lambda r: r['s_per_token']), limit):.2f} | {med(lambda r: r['peak_rss']) / MiB:.0f} | "
                    f"{same} | {diff} |")
    return rows


def _plans(runs: dict[str, list[dict[str, Any]]]) -> str:
    """Each streaming contender's plan (first run), accelerate's split, in a sentence."""
    parts = []
    for name, rs in runs.items():
        r = next((r for r in rs if "error" not in r), None)
        if r is None:
            continue
        p = r.get("plan") or {}
        if p:
            parts.append(f"{LABELS[name]}: budget {p.get('budget_bytes', 0) / MiB:.0f} MiB "
                         f"({p.get('budget_from', '?')}), {p.get('cache_size')} of {len(p.get('streamed', []))} "
                         f"streamed units kept, prefetch {p.get('prefetch_count')}, bound "
                         f"{p.get('bound_bytes', 0) / MiB:.0f} MiB, overhead {p.get('overhead_bytes', 0) / MiB:.0f} MiB")
        elif name == "accelerate":
            parts.append(f"accelerate: max_memory {r['max_memory_cpu'] / MiB:.0f} MiB, {r['disk_modules']} modules "
                         f"({r['offloaded_bytes'] / MiB:.0f} MiB) offloaded to disk")
    return "; ".join(parts)


def _measured(ctx: Any, config: dict[str, Any], prep: dict[str, Any], sizes: dict[str, int], bw: dict[str, Any],
              runs: dict[str, list[dict[str, Any]]], rounds: int, kernel: bool) -> str:
    c = config
    gb = lambda v: f"{v / 1e9:.2f} GB/s" if v else "not measured"  # noqa: E731
    where = (f"inside a {CAP / 1e9:.1f} GB cgroup cap ({ctx.cap_reason})" if ctx.cap_kind and not ctx.quick
             else f"UNCAPPED ({'--quick: every contender in one process' if ctx.quick else ctx.cap_reason})")
    ref = next((r for r in runs["transformers"] if "error" not in r), {})
    built = "reused from the cache directory" if prep.get("cached") else f"built and chunked in {prep_s(prep):.0f} s"
    return (
        f"LlamaForCausalLM of TinyLlama-1.1B's shape at {'the quick (tiny) size' if ctx.quick else 'full size'}: "
        f"hidden {c['hidden_size']}, intermediate {c['intermediate_size']}, {c['num_hidden_layers']} layers, "
        f"{c['num_attention_heads']} heads, {c['num_key_value_heads']} KV heads, vocabulary {c['vocab_size']}; "
        f"random weights (seed {SEED}) built directly in bf16 and saved as safetensors shards "
        f"({sizes['bf16'] / 1e9:.2f} GB chunked bf16, int8 {sizes['int8'] / 1e9:.2f} GB, int4 "
        f"{sizes['int4'] / 1e9:.2f} GB, int8-channel {sizes['int8-channel'] / 1e9:.2f} GB; every chunking cuts the "
        f"embedding and lm_head into row shards; {built}). "
        f"Greedy decoding of {TOKENS} tokens from a fixed random prompt of {PROMPT_LEN} tokens, speculation off, "
        f"bf16 compute. Each contender in a fresh process {where}, its files evicted from the page cache first, "
        f"pinned to CPU {ctx.client_cpus[0]} with one compute thread; the weight server (`surfing serve`, all "
        f"three chunkings, warmed: every unit in its cache) pinned to CPU {ctx.server_cpus[0]}. ours: "
        "StreamingBaseModel(memory_budget='auto', dtype='bfloat16'), the int8/int4 rows with "
        "quantized_in_memory='codes' (the compressed tier: codes kept, expanded per use)"
        + ("; the 'kernel' rows with quantized_in_memory='kernel' (the blocks' linear layers compute on the codes "
           "with torch's weight-only kernels: int4 codes, and int8 on the int8-channel chunking, one scale per row, "
           "which torch's int8 kernel takes; group-wise int8 has none)" if kernel else "; a 'kernel' row (compute on the codes with torch's int8/int4 kernels) runs here "
           "once StreamingConfig accepts quantized_in_memory='kernel' (not in this build)")
        + ". accelerate: from_pretrained(device_map='auto', max_memory={'cpu': cap - its RSS - 96 MiB}, "
        f"offload_folder on local disk, dtype=bfloat16). n = {rounds} interleaved round(s); transformers in "
        f"memory runs once uncapped ({ref.get('s_per_token', float('nan')):.3f} s/token) as the reference. "
        "Time to result = from building the model to the 6th new token; s/decoded token = between the first and "
        "the last new token; bytes per token from get_cache_info() over the decoded tokens (accelerate: the "
        f"bytes it offloaded, read on every use). Physical limit = bytes per token / bandwidth: pipe = raw TCP "
        f"on loopback, one connection, pinned (best of {len(bw.get('pipe_runs', []))}: {gb(bw.get('pipe'))}; the "
        f"transfer case's sender, one {bw.get('pipe_bytes', 0) / MiB:.0f} MiB chunk file; below 1 in 's/token over "
        "limit' means ours moved bytes faster than that one raw connection did), disk = `dd iflag=direct bs=4M` of "
        f"{bw.get('disk_files', 0)} chunk files after eviction ({gb(bw.get('disk'))}"
        f"{'; ' + bw['disk_error'] if bw.get('disk_error') else ''}). Random weights make perplexity meaningless "
        "(near-uniform next-token distributions): the int8/int4 rows report token identity and the largest "
        "|logit - bf16 reference logit| over the steps whose prefix equals the reference's (the reference's "
        f"largest |logit| is {_ref_scale(runs):.3g}); the quant case gives int8/int4 perplexity on SmolLM2. "
        f"{_plans(runs)}.")


def prep_s(prep: dict[str, Any]) -> float:
    return sum(v for k, v in prep.items() if k.endswith("_s") and isinstance(v, (int, float)))


def _ref_scale(runs: dict[str, list[dict[str, Any]]]) -> float:
    vals = [r["reference_logit_max_abs"] for rs in runs.values() for r in rs if "reference_logit_max_abs" in r]
    return max(vals, default=float("nan"))


def _root(ctx: Any) -> Path:
    """Where the checkpoint and its chunkings live: the run's temporary directory with --quick, else the
    cache directory (2.2 GB built once, like the demo's chunks; ``make clean-cache`` removes it)."""
    if ctx.quick:
        return Path(ctx.tmp) / "scale"
    from ..demo import cache_dir

    return cache_dir() / "bench" / "scale-tinyllama-1.1b"


def _bandwidths(ctx: Any, chunks: Path) -> dict[str, Any]:
    """Disk (dd iflag=direct of the largest streamed chunk files) and pipe (raw TCP of the largest one)."""
    m = load_manifest(chunks)
    files = [chunks / u.path for u in sorted(m.streamed, key=lambda u: -u.bytes)[: 1 if ctx.quick else 6]]
    ctx.say("scale: disk (dd iflag=direct) and pipe (raw TCP) bandwidth")
    disk = disk_bandwidth(files)
    pipe = pipe_bandwidth(files[0], ctx, 1 if ctx.quick else 5)
    return {"disk": disk.get("Bps"), "disk_files": disk.get("files", 0), "disk_error": disk.get("error"),
            "pipe": max(pipe["Bps"]), "pipe_runs": pipe["Bps"], "pipe_bytes": pipe["bytes"]}


def run(ctx: Any) -> dict[str, Any]:
    config = (QUICK if ctx.quick else FULL) | COMMON
    prefix, root, rounds = ("scale-tiny" if ctx.quick else "scale-tinyllama"), _root(ctx), 1 if ctx.quick else 2
    ctx.say(f"scale: building and chunking the random-init model in {root} (once; {', '.join(SCHEMES)})")
    shards = {"shard_size": QUICK_SHARD_BYTES} if ctx.quick else {}
    prep = run_child("scale_prepare", {"root": str(root), "config": config, "seed": SEED, "name": prefix} | shards,
                     3600, module="scale_child")
    if "error" in prep:
        raise RuntimeError(f"scale_prepare: {prep['error']}")
    manifests = {s: load_manifest(root / "chunks" / s) for s in SCHEMES}
    bw = _bandwidths(ctx, root / "chunks" / "bf16")
    base = {"prompt": prompt_ids(config["vocab_size"], PROMPT_LEN)[0].tolist(), "tokens": TOKENS, "threads": 1}
    logits = Path(ctx.tmp) / "scale-logits"
    logits.mkdir(parents=True, exist_ok=True)
    kernel = kernel_supported()
    server_mb = sum(m.total_bytes for m in manifests.values()) / MiB * 1.2 + 64
    with weight_server_process(root / "chunks", cache_mb=server_mb, cpus=ctx.server_cpus) as uri:
        ctx.say("scale: warming the weight server's cache")
        asyncio.run(_warm(uri, [m.name for m in manifests.values()]))
        runs = _runs(ctx, root, contenders(root, prefix, uri, kernel), base, rounds, logits)
    _compare(runs, logits)
    metrics, ratios, notes = _metrics(runs, bw)
    metrics["pipe_raw_tcp_GBps"] = summarize([v / 1e9 for v in bw["pipe_runs"]], "GB/s")
    if bw["disk"]:
        metrics["disk_dd_direct_GBps"] = summarize([bw["disk"] / 1e9], "GB/s")
    sizes = {s: m.total_bytes for s, m in manifests.items()}
    return {
        "title": TITLE, "measured": _measured(ctx, config, prep, sizes, bw, runs, rounds, kernel) + " " + " ".join(notes),
        "metrics": metrics, "ratios": ratios, "notes": notes, "table": _table(runs, bw), "bandwidth": bw,
        "stored_bytes": sizes, "kernel_rows": kernel,
        "tokens": {n: [r.get("tokens") for r in rs] for n, rs in runs.items()},
    }
