"""The ``surfing`` command: thin argument parsing over the library. Only this module prints or configures logging."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from typing import Any

from .exceptions import StreamingWeightsError


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# ---------------------------------------------------------------------------------------------- chunk
def _add_s3_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("S3 storage")
    g.add_argument("--s3", action="store_true", help="use S3 storage (implied by --s3-bucket)")
    g.add_argument("--s3-bucket")
    g.add_argument("--s3-prefix", default="")
    g.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL (or AWS_ENDPOINT_URL)")
    g.add_argument("--s3-region", default=None)
    g.add_argument("--s3-access-key", default=None)
    g.add_argument("--s3-secret-key", default=None)
    g.add_argument("--s3-session-token", default=None)
    g.add_argument("--s3-profile", default=None)


def _s3_backend(args: argparse.Namespace):
    if not (args.s3 or args.s3_bucket):
        return None
    if not args.s3_bucket:
        raise SystemExit("--s3 needs --s3-bucket")
    from .storage.s3 import S3Backend

    return S3Backend(
        args.s3_bucket, prefix=args.s3_prefix, endpoint_url=args.s3_endpoint, region_name=args.s3_region,
        aws_access_key_id=args.s3_access_key, aws_secret_access_key=args.s3_secret_key,
        aws_session_token=args.s3_session_token, profile_name=args.s3_profile,
    )


def cmd_chunk(args: argparse.Namespace) -> int:
    from .chunker import ModelChunker

    backend = _s3_backend(args)
    chunker = ModelChunker(
        args.source,
        output_dir=None if backend else (args.output_dir or "./chunks"),
        storage_backend=backend,
        dtype=args.dtype,
        compress=args.compress,
        name=args.name,
        progress=not args.quiet,
    )
    result = asyncio.run(chunker.chunk_model())
    print(
        f"chunked {result['name']!r} ({result['architecture']}, {result['dtype']}): {result['num_units']} units, "
        f"{result['total_size_mb']:.1f} MiB total, largest {result['largest_unit_mb']:.1f} MiB -> "
        f"{result['storage']}/{result['manifest']}"
    )
    return 0


# -------------------------------------------------------------------------------------------- inspect
def cmd_inspect(args: argparse.Namespace) -> int:
    from .client.source import open_unit_source

    async def run() -> list[Any]:
        source = open_unit_source(args.location, token=args.token or os.environ.get("SURFING_TOKEN"))
        try:
            names = [args.model] if args.model else await source.list_models()
            return [await source.get_manifest(n) for n in names]
        finally:
            await source.close()

    manifests = asyncio.run(run())
    for m in manifests:
        if args.json:
            print(m.to_bytes().decode())
            continue
        print(f"model        {m.name}")
        print(f"architecture {m.architecture} ({m.model_type}), dtype {m.dtype}, format v{m.format_version}")
        print(f"units        {len(m.units)} ({len(m.streamed)} streamed), {m.total_bytes / 2**20:.1f} MiB")
        print(f"files        {', '.join(f.name for f in m.files) or '-'}")
        if m.tied:
            print(f"tied         {', '.join(f'{a} -> {t}' for a, t in m.tied.items())}")
        print(f"{'order':>5}  {'role':9} {'unit':32} {'MiB':>9}  {'tensors':>7}  sha256")
        for u in m.units:
            print(f"{u.order:>5}  {u.role:9} {u.name:32} {u.bytes / 2**20:9.2f}  {len(u.tensors):>7}  {u.sha256}")
        print()
    return 0


# ------------------------------------------------------------------------------- generate / demo
def _stream_generate(model, prompt: str, *, chat: bool, max_new_tokens: int, out=None) -> None:
    import time

    import torch
    from transformers import TextStreamer

    tok = model.tokenizer
    if tok is None:
        raise SystemExit(f"model {model.model_name!r} has no tokenizer files in its manifest")
    if chat:
        enc = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
    else:
        enc = tok(prompt, return_tensors="pt")
    ids = enc["input_ids"]
    mask = enc.get("attention_mask", torch.ones_like(ids))
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    t0 = time.perf_counter()
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                   streamer=streamer)
    dt = time.perf_counter() - t0
    s = model.get_inference_stats()
    c = model.get_cache_info()
    tokens = s["generated_tokens"] or 1
    print(
        f"[{s['generated_tokens']} tokens in {dt:.2f} s, {s['generated_tokens'] / dt:.2f} tok/s | "
        f"cache {c['max_cache_size']}/{c['streamed_units']} units, hit rate {c['hit_rate']:.0%}, "
        f"{c['bytes_fetched'] / tokens / 2**20:.1f} MiB fetched/token, stall {s['stall_seconds']:.2f} s]",
        file=out or sys.stdout,
    )


def _servers(value: str) -> str | list[str]:
    """``ws://a:1,ws://b:2`` -> a failover list; a single location stays as it is."""
    parts = [p.strip() for p in value.split(",") if p.strip()]
    return parts if len(parts) > 1 else value


def cmd_generate(args: argparse.Namespace) -> int:
    from .models import StreamingBaseModel

    with StreamingBaseModel(args.model, _servers(args.server), args.cache_size, prefetch_count=args.prefetch,
                            token=args.token, cache_policy=args.policy) as model:
        _stream_generate(model, args.prompt, chat=args.chat, max_new_tokens=args.max_new_tokens)
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    import torch

    from .models import StreamingBaseModel

    with StreamingBaseModel(args.model, _servers(args.server), args.cache_size, token=args.token) as model:
        if model.tokenizer is None:
            raise SystemExit(f"model {model.model_name!r} has no tokenizer files in its manifest")
        enc = model.tokenizer(list(args.text), padding=True, truncation=True, return_tensors="pt")
        out = model.forward(**enc)
        mask = enc["attention_mask"].unsqueeze(-1).to(out.last_hidden_state.dtype)
        emb = (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        if args.normalize:
            emb = torch.nn.functional.normalize(emb, p=2, dim=1)
    print(json.dumps({"model": model.model_name, "dim": emb.shape[1],
                      "embeddings": [[float(x) for x in row] for row in emb]}))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .client.bridge import LoopThread
    from .demo import SMOLLM2_NAME, ensure_demo_chunks
    from .models import StreamingLlamaModel
    from .server import WeightServer

    print("Preparing SmolLM2-135M-Instruct chunks (once; cached afterwards)...", file=sys.stderr)
    chunks = ensure_demo_chunks(progress=True)
    io = LoopThread("surfing-demo-server")
    server = WeightServer(str(chunks), host="127.0.0.1", port=0, token=None)
    io.run(server.start(), 60)
    try:
        uri = f"ws://127.0.0.1:{server.port}"
        print(f"Weight server on {uri}; streaming with a cache of {args.cache_size} of the model's layers.\n",
              file=sys.stderr)
        with StreamingLlamaModel(SMOLLM2_NAME, uri, args.cache_size, prefetch_count=args.prefetch) as model:
            print(f"> {args.prompt}")
            _stream_generate(model, args.prompt, chat=True, max_new_tokens=args.max_new_tokens)
    finally:
        io.run(server.stop(), 30)
        io.close()
    return 0


def _register_client_commands(sub) -> None:
    p = sub.add_parser("generate", help="stream a model from a server and generate text")
    p.add_argument("--server", default=os.environ.get("SURFING_SERVER", "ws://localhost:8765"),
                   help="ws(s):// URI (comma-separated list: failover), s3://bucket/prefix or a chunk directory")
    p.add_argument("--model", default=None, help="model name (default: the only hosted model)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--cache-size", type=int, default=4)
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--policy", choices=["order", "lru"], default="order")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--token", default=None)
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("embed", help="mean-pooled sentence embeddings (JSON) from a streamed encoder")
    p.add_argument("--server", default=os.environ.get("SURFING_SERVER", "ws://localhost:8765"))
    p.add_argument("--model", default=None)
    p.add_argument("--text", nargs="+", required=True)
    p.add_argument("--normalize", action="store_true")
    p.add_argument("--cache-size", type=int, default=2)
    p.add_argument("--token", default=None)
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("demo", help="chunk, serve and stream the packaged SmolLM2-135M-Instruct")
    p.add_argument("--prompt", default="What is the capital of France? Answer in one sentence.")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--cache-size", type=int, default=8)
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.set_defaults(func=cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="surfing", description="Stream transformer weights layer by layer.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("chunk", help="split a model into per-layer safetensors units + manifest")
    p.add_argument("source", help="HF model directory, .gguf file, or hub id")
    p.add_argument("--output-dir", "-o", help="model directory to write (default ./chunks)")
    p.add_argument("--name", help="model name recorded in the manifest (default: SOURCE as given)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None)
    p.add_argument("--compress", action="store_true", help="store float16 (same as --dtype float16)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="count", default=0)
    _add_s3_args(p)
    p.set_defaults(func=cmd_chunk)

    p = sub.add_parser("inspect", help="summarize a chunked model (directory, s3:// or ws:// server)")
    p.add_argument("location")
    p.add_argument("--model", default=None)
    p.add_argument("--token", default=None)
    p.add_argument("--json", action="store_true", help="print the raw manifest")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.set_defaults(func=cmd_inspect)

    for register in _EXTRA_COMMANDS:
        register(sub)
    return parser


_EXTRA_COMMANDS: list = [_register_client_commands]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(getattr(args, "verbose", 0))
    try:
        return int(args.func(args) or 0)
    except StreamingWeightsError as exc:
        print(f"surfing {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


# ---------------------------------------------------------------------------------------------- serve
def cmd_serve(args: argparse.Namespace) -> int:
    from .server import WeightServer, run_server

    token = args.token
    if args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as exc:
            raise SystemExit(f"surfing serve: cannot read --token-file: {exc}") from None
        if not token:
            raise SystemExit("surfing serve: --token-file is empty")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise SystemExit("surfing serve: --tls-cert and --tls-key go together")
    backend = _s3_backend(args)
    if backend is None and not args.chunks_dir:
        raise SystemExit("surfing serve: pass --chunks-dir DIR (or --s3-bucket)")
    if backend is not None and args.chunks_dir:
        raise SystemExit("surfing serve: pass --chunks-dir or --s3-bucket, not both")
    prefix = ""
    if args.redis_url:
        from .storage import open_storage
        from .storage.redis_cache import RedisCacheBackend

        if backend is None:
            backend, prefix = open_storage(args.chunks_dir)
        backend = RedisCacheBackend(backend, args.redis_url)
    server = WeightServer(
        backend if backend is not None else args.chunks_dir, prefix=prefix,
        host=args.host, port=args.port, cache_size_mb=args.cache_size, token=token,
        tls_cert=args.tls_cert, tls_key=args.tls_key, max_connections=args.max_connections,
        max_inflight_per_connection=args.max_inflight,
    )

    def ready(srv: WeightServer) -> None:
        auth = "token auth" if srv.token else "NO auth"
        print(f"serving {', '.join(sorted(srv.models))} on {srv.uri} ({auth}); Ctrl-C to stop", flush=True)

    asyncio.run(run_server(server, ready=ready))
    return 0


def _register_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve chunked model(s) over WebSocket")
    p.add_argument("--chunks-dir", "-d", help="a chunked model directory, or a directory of several")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    p.add_argument("--port", "-p", type=int, default=8765, help="TCP port (0 = any free port)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--token", default=None, help="bearer token clients must send (default $SURFING_TOKEN)")
    g.add_argument("--token-file", default=None, help="read the bearer token from this file")
    p.add_argument("--tls-cert", default=None, help="PEM certificate (chain) to serve wss://")
    p.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    p.add_argument("--cache-size", type=float, default=100, metavar="MB", help="server blob cache (MiB)")
    p.add_argument("--max-connections", type=int, default=64)
    p.add_argument("--max-inflight", type=int, default=32, help="concurrent requests per connection")
    p.add_argument("--redis-url", default=None, metavar="URL",
                   help="shared Redis byte cache in front of the storage (redis://host:port/db), for several servers")
    p.add_argument("-v", "--verbose", action="count", default=0)
    _add_s3_args(p)
    p.set_defaults(func=cmd_serve)


_EXTRA_COMMANDS.append(_register_serve)


# ---------------------------------------------------------------------------------------------- bench
def cmd_bench(args: argparse.Namespace) -> int:
    import time

    from .benchmarks import CASES, run_suite

    cases = [c.strip() for c in args.cases.split(",") if c.strip()] if args.cases else None
    unknown = [c for c in cases or [] if c not in CASES]
    if unknown:
        raise SystemExit(f"surfing bench: unknown case(s) {unknown}; choose from {', '.join(CASES)}")
    t0 = time.perf_counter()

    def progress(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    results = run_suite(args.out, quick=args.quick, cases=cases, progress=progress, chunks_dir=args.chunks_dir)
    failed = 0
    for name, case in results["cases"].items():
        if "error" in case:
            failed += 1
            print(f"{name:11} FAILED: {case['error']}")
            continue
        for rname, r in case.get("ratios", {}).items():
            goal = f"  (goal {r['goal']})" if "goal" in r else ""
            print(f"{name:11} {rname:45} {r['median']:9.3g}  [{r['min']:.3g}..{r['max']:.3g}, n={r['n']}]{goal}")
    print(f"wrote {args.out}/results.json, {args.out}/REPORT.md and {sum(len(v) for v in results['plots'].values())} "
          f"plots in {results['seconds']:.0f} s")
    return 1 if failed else 0


def _register_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmark suite: transfer, overlap, cache policy, memory, peers (writes bench/)")
    p.add_argument("--quick", action="store_true", help="tiny random-init model, one run per case (~1 min)")
    p.add_argument("--out", default="bench", help="output directory (default bench/)")
    p.add_argument("--cases", default=None,
                   help="comma-separated subset of: transfer,overlap,cache,memory,cold_start,peers,chunker")
    p.add_argument("--chunks-dir", default=None, help="benchmark this chunked LLaMA-family model instead")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.set_defaults(func=cmd_bench)


_EXTRA_COMMANDS.append(_register_bench)


if __name__ == "__main__":
    raise SystemExit(main())
