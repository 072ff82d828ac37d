"""``surfing chunk`` (split a model into units + manifest) and ``surfing inspect`` (summarize one)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from .options import add_common, add_connection_args, add_s3_args, resolve_token, s3_backend, ssl_context, trust_kwargs


class PlainProgress:
    """Chunk progress as a few plain stderr lines (each quarter of the bytes), for logs that are not a TTY."""

    def __init__(self, steps: int = 4) -> None:
        self.steps = steps
        self._shown = 0

    def __call__(self, p: Any) -> None:
        step = p.bytes_done * self.steps // max(p.bytes_total, 1)
        if step > self._shown or p.units_done == p.units_total:
            self._shown = step
            print(f"chunking: {p.units_done}/{p.units_total} units, {p.bytes_done / 2**20:.1f}/"
                  f"{p.bytes_total / 2**20:.1f} MiB", file=sys.stderr, flush=True)


def cmd_chunk(args: argparse.Namespace) -> int:
    from ..chunker import ModelChunker, default_model_name

    backend = s3_backend(args)
    name = args.name or default_model_name(args.source)
    tty = sys.stderr.isatty()
    chunker = ModelChunker(
        args.source,
        output_dir=None if backend else (args.output_dir or str(Path("chunks") / name)),
        storage_backend=backend, dtype=args.dtype, compress=args.compress, quantize=args.quantize, name=name,
        force=args.force, shard_size=args.shard_size, expert_units=args.experts == "units",
        progress=tty and not args.quiet, on_progress=None if tty or args.quiet else PlainProgress(),
    )
    result = asyncio.run(chunker.chunk_model())
    if args.quiet:  # errors only; the exit status says it worked
        return 0
    print(
        f"chunked {result['name']!r} ({result['architecture']}, {result['dtype']}"
        f"{', ' + result['quantize'] if result['quantize'] else ''}): {result['num_units']} units"
        f"{' (' + str(result['num_shards']) + ' row shards)' if result['num_shards'] else ''}"
        f"{' (' + str(result['num_experts']) + ' expert units)' if result.get('num_experts') else ''}, "
        f"{result['total_size_mb']:.1f} MiB total, largest {result['largest_unit_mb']:.1f} MiB -> "
        f"{result['storage']}/{result['manifest']}"
    )
    return 0


def _print_manifest(m: Any) -> None:
    print(f"model        {m.name}")
    print(f"architecture {m.architecture} ({m.model_type}), dtype {m.dtype}, format v{m.format_version}")
    shards = (f", {len(m.shards)} row shards" if m.shards else "") + (
        f", {len(m.experts)} expert units in {len(m.expert_groups())} layers" if m.experts else "")
    print(f"units        {len(m.units)} ({len(m.streamed)} streamed{shards}), {m.total_bytes / 2**20:.1f} MiB")
    print(f"files        {', '.join(f.name for f in m.files) or '-'}")
    if m.tied:
        print(f"tied         {', '.join(f'{a} -> {t}' for a, t in m.tied.items())}")
    print(f"{'order':>5}  {'role':9} {'unit':32} {'MiB':>9}  {'tensors':>7}  sha256")
    for u in m.units:
        name = u.name if u.role != "shard" else f"{u.shard_tensor}[{u.rows[0]}:{u.rows[1]}]"
        print(f"{u.order:>5}  {u.role:9} {name:32} {u.bytes / 2**20:9.2f}  {len(u.tensors):>7}  {u.sha256}")
    print()


def cmd_inspect(args: argparse.Namespace) -> int:
    from ..client.open import open_unit_source
    from .options import parse_servers

    location = parse_servers(args.location)

    async def run() -> list[Any]:
        source = open_unit_source(location, token=resolve_token(args), ssl_context=ssl_context(args),
                                  **trust_kwargs(args))
        try:
            names = [args.model] if args.model else await source.list_models()
            return [await source.get_manifest(n) for n in names]
        finally:
            await source.close()

    for m in asyncio.run(run()):
        if args.json:
            print(m.to_bytes().decode())
        else:
            _print_manifest(m)
        if args.memory:
            print_plan(m, args.memory)
    return 0


def print_plan(manifest: Any, memory: str) -> None:
    """The memory plan a client of ``manifest`` would use under ``--memory`` (tokenizer not counted)."""
    from ..config import StreamingConfig
    from ..memory import resolve_budget
    from ..models.planner import plan_memory

    budget, where = resolve_budget(memory)
    plan = plan_memory(manifest, StreamingConfig(), budget=budget, budget_from=where)
    print(f"memory plan for {manifest.name} (a client also holds its tokenizer):")
    print("  " + plan.describe().replace("\n", "\n  "))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chunk", help="split a model into per-layer safetensors units + manifest")
    p.add_argument("source", help="HF model directory, .gguf file, or hub id")
    p.add_argument("--output-dir", "-o", help="model directory to write (default chunks/NAME)")
    p.add_argument("--name", help="model name recorded in the manifest (default: SOURCE's base name)")
    p.add_argument("--force", action="store_true",
                   help="replace a different model already in the output directory (clears it first)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None)
    p.add_argument("--compress", action="store_true", help="store float16 (same as --dtype float16)")
    p.add_argument("--quantize", choices=["int8", "int4", "int8-channel"], default=None,
                   help="store linear/embedding weights quantized: int8 (groups of 64, ~0.26x float32 bytes), "
                        "int4 (groups of 32, ~0.16x) or int8-channel (one scale per row, what "
                        "quantized_in_memory='kernel' computes on); lossy, see docs/format.md")
    p.add_argument("--experts", choices=("units", "layer"), default="units",
                   help="mixture-of-experts models: 'units' (default) stores each expert as its own unit, fetched "
                        "only when the router picks it; 'layer' keeps the experts in their layer's unit")
    p.add_argument("--shard-size", default="auto", metavar="auto|off|SIZE",
                   help="split the embedding / LM head weights into row-shard units a client can stream: auto "
                        "(default: only weights larger than the largest layer and 16 MiB, in layer-sized shards), "
                        "off, or a size such as 64MB / 1GiB (every such weight, shards of at most SIZE)")
    add_common(p)
    add_s3_args(p)
    p.set_defaults(func=cmd_chunk)

    p = sub.add_parser("inspect", help="summarize a chunked model (directory, s3:// or ws:// server)")
    p.add_argument("location", help="chunk directory, s3://bucket/prefix, ws(s)://host:port or host:port")
    p.add_argument("--model", default=None)
    p.add_argument("--json", action="store_true", help="print the raw manifest")
    p.add_argument("--memory", default=None, metavar="auto|SIZE",
                   help="also print the memory plan a client would use with this budget (e.g. 600MB, auto)")
    add_connection_args(p, with_server=False)
    add_common(p)
    p.set_defaults(func=cmd_inspect)
