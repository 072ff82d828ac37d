"""``surfing demo``: chunk the packaged SmolLM2 once, serve it on loopback, stream a chat answer.

The chunks (~520 MiB, float32) are kept in the cache directory (``streaming_weights.demo.cache_dir``); the
demo says where, and ``make clean-cache`` removes them.
"""

from __future__ import annotations

import argparse
import logging

from .generate import stream_generate
from .options import add_common, positive_int
from .output import info


def cmd_demo(args: argparse.Namespace) -> int:
    from ..client.bridge import LoopThread
    from ..demo import SMOLLM2_NAME, demo_chunks_dir, demo_chunks_ready, dir_bytes, ensure_demo_chunks
    from ..models import StreamingLlamaModel
    from ..server import WeightServer

    where = demo_chunks_dir()
    if not demo_chunks_ready():
        info(f"Preparing {SMOLLM2_NAME} chunks once: about 520 MiB written to {where} (kept for later runs; "
             "`make clean-cache` deletes it, SURFING_CACHE_DIR moves it)...")
    else:
        info(f"Using the cached {SMOLLM2_NAME} chunks in {where} ({dir_bytes(where) / 2**20:.0f} MiB; "
             "`make clean-cache` deletes them)")
    chunks = ensure_demo_chunks(progress=not args.quiet)
    io = LoopThread("surfing-demo-server")
    server = WeightServer(str(chunks), host="127.0.0.1", port=0, token=None)
    io.run(server.start(), 60)
    try:
        uri = f"ws://127.0.0.1:{server.port}"
        info(f"Weight server on {uri}; streaming with a cache of {args.cache_size} of the model's layers.")
        with StreamingLlamaModel(SMOLLM2_NAME, uri, args.cache_size, prefetch_count=args.prefetch) as model:
            print(f"> {args.prompt}", flush=True)
            stream_generate(model, args.prompt, chat=True, max_new_tokens=args.max_new_tokens, quiet=args.quiet)
    finally:
        io.run(server.stop(), 30)
        io.close()
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="chunk, serve and stream the packaged SmolLM2-135M-Instruct")
    p.add_argument("--prompt", default="What is the capital of France? Answer in one sentence.")
    p.add_argument("--max-new-tokens", type=positive_int, default=24)
    p.add_argument("--cache-size", type=int, default=8)
    p.add_argument("--prefetch", type=int, default=2)
    add_common(p)
    p.set_defaults(func=cmd_demo, log_level=logging.INFO)
