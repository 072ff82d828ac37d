"""GPU check of the accelerator path (issue 16): one script for a bare accelerator machine.

    PYTHONPATH=src python3 bench/gpu_check.py                 # --device cuda
    PYTHONPATH=src python3 bench/gpu_check.py --device cpu    # the same logic on the host (a test runs this)

Needs torch, transformers (and what they pull in: numpy, safetensors, huggingface_hub, tokenizers), plus
websockets and blake3 (and accelerate / prometheus_client / cryptography if this tree imports them; the
preflight names every missing module). No network: it builds a seeded random Llama of a few hundred MB
on the spot (saved as a checkpoint, chunked with ModelChunker), serves it on loopback with WeightServer
and prints:

1. parity with transformers on the same device: float32 logits within 1e-4 relative; bfloat16 greedy
   tokens identical over 16 new tokens;
2. our host-to-device bandwidth (pinned receive buffers, copy stream, events) against a plain pinned
   ``copy_`` of the same bytes;
3. a streamed forward (device ring: every unit crosses the bus each pass) against
   max(compute-only, copy-only), and the forward with every unit kept on the device.

Exit status 0 when both parity checks pass. ``--json PATH`` writes the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

NEEDED = ("torch", "transformers", "safetensors", "numpy", "websockets", "blake3", "accelerate", "streaming_weights.server",
          "streaming_weights.models", "streaming_weights.chunker")


def preflight() -> None:
    """Import what the check needs; name every missing module at once (and the wheel to carry)."""
    missing = []
    for name in NEEDED:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            missing.append(f"{name} (missing module {exc.name!r}: pip install --no-index <its wheel>)")
    if missing:
        sys.exit("gpu_check: cannot run here:\n  " + "\n  ".join(missing))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda, cuda:N, mps or cpu (default cuda)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--vocab", type=int, default=16000)
    p.add_argument("--seq", type=int, default=128, help="prompt tokens of the timed forward")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON here")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------ the model
def build_checkpoint(args: argparse.Namespace, root: Path) -> tuple[Path, Path, int]:
    """A seeded random Llama saved as a float32 checkpoint and chunked; returns (ckpt, chunks, bytes)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from streaming_weights.chunker import ModelChunker

    torch.manual_seed(0)
    heads = max(1, args.hidden // 64)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
                      max_position_embeddings=max(256, args.seq + args.new_tokens), tie_word_embeddings=False,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    ckpt, chunks = root / "ckpt", root / "chunks"
    model.save_pretrained(str(ckpt))
    del model
    asyncio.run(ModelChunker(str(ckpt), output_dir=str(chunks), name="gpu-check").chunk_model())
    return ckpt, chunks, nbytes


class Served:
    """A WeightServer over ``chunks`` on a free loopback port, on its own I/O thread."""

    def __init__(self, chunks: Path) -> None:
        from streaming_weights.client.bridge import LoopThread
        from streaming_weights.server import WeightServer

        self.io = LoopThread("gpu-check-server")
        self.server = WeightServer(str(chunks), host="127.0.0.1", port=0)
        self.io.run(self.server.start(), 60)
        self.uri = f"ws://127.0.0.1:{self.server.port}"

    def close(self) -> None:
        self.io.run(self.server.stop(), 60)
        self.io.close()


def reference(ckpt: Path, device: str, dtype: Any) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=dtype).to(device).eval()


def streamed(uri: str, device: str, dtype: str | None, layers: int) -> Any:
    from streaming_weights import StreamingLlamaModel

    # The host tier keeps every layer: the timings measure the device path, not loopback. No drafting:
    # plain greedy decoding, as the reference runs it (a multi-token verify pass rounds differently in bf16).
    return StreamingLlamaModel("gpu-check", uri, device=device, dtype=dtype, cache_size=layers, prefetch_count=1,
                               speculation="off")


# ------------------------------------------------------------------------------------------- parity
def fp32_parity(ckpt: Path, uri: str, args: argparse.Namespace, ids: Any) -> dict[str, Any]:
    import torch

    ref = reference(ckpt, args.device, torch.float32)
    with torch.no_grad():
        want = ref(input_ids=ids.to(args.device)).logits.float().cpu()
    del ref
    with streamed(uri, args.device, None, args.layers) as m, torch.no_grad():
        got = m.hf_model(input_ids=ids).logits.float().cpu()
        device_of_logits = str(m.hf_model(input_ids=ids).logits.device)
    rel = ((got - want).abs().max() / want.abs().max()).item()
    return {"max_relative_error": rel, "ok": rel <= 1e-4, "logits_device": device_of_logits}


def bf16_greedy(ckpt: Path, uri: str, args: argparse.Namespace, ids: Any) -> dict[str, Any]:
    import torch

    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    ref = reference(ckpt, args.device, torch.bfloat16)
    with torch.no_grad():
        want = ref.generate(input_ids=ids.to(args.device), **gen)[0, ids.shape[1]:].cpu().tolist()
    del ref
    with streamed(uri, args.device, "bfloat16", args.layers) as m, torch.no_grad():
        got = m.generate(input_ids=ids, **gen)[0, ids.shape[1]:].cpu().tolist()
    return {"reference": want, "streamed": got, "ok": got == want and len(got) == args.new_tokens}


# ------------------------------------------------------------------------------------------- timings
def best_of(repeats: int, fn: Callable[[], Any], sync: Callable[[], None]) -> float:
    """Median wall time of ``fn`` (after one warm-up call), the device synchronized around each call."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bandwidth(m: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Our copy path (the engine's pinned receive buffers, copy stream, events) vs a plain pinned copy_."""
    import torch

    engine, ops = m.engine, m.engine.placement.ops
    units = [engine.run(engine.source.fetch_unit(engine.manifest, u.name)) for u in engine.manifest.streamed]
    total = sum(u.nbytes for u in units)
    if ops.is_host:
        return {"bytes": total, "ours_gbps": None, "plain_gbps": None, "note": "compute on the host: no copies"}

    def ours() -> None:
        for u in units:
            ops.host_wait(ops.copy_to_device(u.tensors, u.buffer)[1])

    plain_src = [torch.empty(u.nbytes, dtype=torch.uint8, pin_memory=True) for u in units]
    plain_dst = [torch.empty(u.nbytes, dtype=torch.uint8, device=ops.device) for u in units]

    def plain() -> None:
        for s, d in zip(plain_src, plain_dst):
            d.copy_(s, non_blocking=True)

    t_ours = best_of(args.repeats, ours, ops.synchronize)
    t_plain = best_of(args.repeats, plain, ops.synchronize)
    pinned = all(u.tensors and next(iter(u.tensors.values())).is_pinned() for u in units)
    return {"bytes": total, "ours_gbps": total / t_ours / 1e9, "plain_gbps": total / t_plain / 1e9,
            "ratio": t_plain / t_ours, "copy_seconds": t_ours, "receive_buffers_pinned": pinned}


def overlap(ckpt: Path, uri: str, args: argparse.Namespace) -> dict[str, Any]:
    """Streamed forward (ring: every unit copied each pass) vs max(compute-only, copy-only)."""
    import torch

    ids = torch.randint(3, args.vocab, (1, args.seq))
    ref = reference(ckpt, args.device, torch.float32)
    sync = (lambda: torch.cuda.synchronize()) if args.device.startswith("cuda") else (lambda: None)
    with torch.no_grad():
        compute = best_of(args.repeats, lambda: ref(input_ids=ids.to(args.device)), sync)
    del ref
    with streamed(uri, args.device, None, args.layers) as m, torch.no_grad():
        bw = bandwidth(m, args)
        kept = best_of(args.repeats, lambda: m.hf_model(input_ids=ids), m.engine.placement.ops.synchronize)
        m.engine.placement.use_ring()
        ring = best_of(args.repeats, lambda: m.hf_model(input_ids=ids), m.engine.placement.ops.synchronize)
        part = m.get_cache_info()["plan"]["device"]
    copy = bw.get("copy_seconds") or 0.0
    bound = max(compute, copy)
    return {"compute_only_s": compute, "copy_only_s": copy, "streamed_ring_s": ring, "streamed_kept_s": kept,
            "ring_vs_bound": ring / bound, "kept_vs_compute": kept / compute, "bandwidth": bw, "device_part": part}


def report(res: dict[str, Any]) -> None:
    print(f"device: {res['device']}  model: {res['model_mb']:.0f} MB float32, {res['layers']} layers")
    p, g = res["fp32"], res["bf16"]
    print(f"fp32 parity: max relative error {p['max_relative_error']:.2e} (<= 1e-4: {'OK' if p['ok'] else 'FAIL'})")
    print(f"bf16 greedy over {len(g['reference'])} tokens: {'identical' if g['ok'] else 'DIFFERENT'}")
    o, bw = res["overlap"], res["overlap"]["bandwidth"]
    if bw["ours_gbps"] is not None:
        print(f"host->device: ours {bw['ours_gbps']:.1f} GB/s vs plain pinned copy_ {bw['plain_gbps']:.1f} GB/s "
              f"({bw['ratio']:.2f}x), receive buffers pinned: {bw['receive_buffers_pinned']}")
    else:
        print(f"host->device: {bw['note']}")
    print(f"forward: streamed (ring) {o['streamed_ring_s'] * 1e3:.1f} ms vs max(compute {o['compute_only_s'] * 1e3:.1f}, "
          f"copy {o['copy_only_s'] * 1e3:.1f}) ms = {o['ring_vs_bound']:.2f}x; all units kept on the device "
          f"{o['streamed_kept_s'] * 1e3:.1f} ms ({o['kept_vs_compute']:.2f}x compute-only)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    preflight()
    import torch

    from streaming_weights.client.device import resolve_device
    from streaming_weights.exceptions import ConfigurationError

    try:
        resolve_device(args.device)  # a missing device fails here, before the model is built
    except ConfigurationError as exc:
        sys.exit(f"gpu_check: {exc}")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        ckpt, chunks, nbytes = build_checkpoint(args, Path(tmp))
        srv = Served(chunks)
        try:
            ids = torch.randint(3, args.vocab, (1, 12), generator=torch.Generator().manual_seed(1))
            res = {"device": args.device, "model_mb": nbytes / 1e6, "layers": args.layers,
                   "fp32": fp32_parity(ckpt, srv.uri, args, ids), "bf16": bf16_greedy(ckpt, srv.uri, args, ids),
                   "overlap": overlap(ckpt, srv.uri, args)}
        finally:
            srv.close()
    res["seconds"] = time.perf_counter() - t0
    report(res)
    print(f"total {res['seconds']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str))
    return 0 if res["fp32"]["ok"] and res["bf16"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
