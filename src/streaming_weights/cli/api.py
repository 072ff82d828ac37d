"""``surfing api``: an OpenAI-compatible HTTP endpoint over one streamed model (logic in :mod:`..api`)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from .options import add_common, add_trust_args, open_model, positive_int, read_token_file


def _non_negative_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds (a number), got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _stopped_line(report) -> str:
    """One line saying how the server stopped and what happened to the requests in flight."""
    how = f"stopped ({report.signal})" if report.signal else "stopped"
    if report.forced:
        how = f"stopped ({report.signal} twice: no grace)"
    d = report.drain
    if not d.in_flight:
        return f"{how}: no request in flight"
    parts = [f"{n} {what}" for n, what in ((d.finished, "finished"), (d.cancelled, "cancelled with a 503")) if n]
    return f"{how}: {d.in_flight} request{'s' if d.in_flight != 1 else ''} in flight, " + ", ".join(parts)


def api_parts(args: argparse.Namespace) -> tuple[Any, list[str] | None, Any]:
    """What ``surfing api ARGS`` serves: ``(model, accepted tokens, ApiSettings)``; the model is opened last."""
    from ..api import ApiSettings

    tokens = [read_token_file(args.api_token_file)] if args.api_token_file else None
    settings = ApiSettings(window=args.batch_window_ms / 1000, max_batch=args.max_batch, max_queue=args.max_queue,
                           speculation=args.speculation, default_max_tokens=args.default_max_tokens,
                           shutdown_grace=args.shutdown_grace)
    return open_model(args), tokens, settings


def cmd_api(args: argparse.Namespace) -> int:
    from ..api.serve import serve_api

    model, tokens, settings = api_parts(args)
    auth = "bearer token auth" if tokens else "NO auth"

    def ready(server) -> None:
        print(f"serving {model.model_name} at {server.url}/v1 ({auth}); Ctrl-C to stop", flush=True)

    report = serve_api(model, host=args.host, port=args.port, tokens=tokens, settings=settings, ready=ready,
                       log_level="info" if args.verbose else "warning")
    print(_stopped_line(report), flush=True)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("api", help="OpenAI-compatible HTTP API (completions, chat, embeddings) over a streamed model")
    p.add_argument("--server", default=os.environ.get("SURFING_SERVER", "ws://localhost:8765"),
                   help="weight server URI (comma-separated: failover), s3://bucket/prefix or a chunk directory")
    p.add_argument("--ca-cert", default=None, metavar="FILE", help="PEM CA certificate(s) to trust for wss://")
    # --token-file is the token the API's own clients must send; the weight server's is --server-token(-file).
    p.add_argument("--server-token", dest="token", default=None, help="bearer token for the weight server")
    p.add_argument("--server-token-file", dest="token_file", default=None, metavar="FILE",
                   help="read the weight server's bearer token from FILE")
    p.add_argument("--token-file", dest="api_token_file", default=None, metavar="FILE",
                   help="require `Authorization: Bearer <token>` with the token in FILE (the weight server's format)")
    p.add_argument("--model", default=None, help="model name (default: the only hosted model)")
    p.add_argument("--cache-size", type=int, default=None,
                   help="streamed layers kept between uses (overrides --memory; default: planned from --memory)")
    p.add_argument("--memory", default="auto", metavar="auto|SIZE",
                   help="memory the client may use for the model, e.g. 600MB, 2GiB or auto (default: auto)")
    p.add_argument("--device", default=None, help="where compute runs: cpu (default), cuda, cuda:N or mps")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    p.add_argument("--port", "-p", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--max-batch", type=positive_int, default=8, help="most requests in one batch (default 8)")
    p.add_argument("--batch-window-ms", type=float, default=30.0, help="wait for more requests (default 30 ms)")
    p.add_argument("--max-queue", type=positive_int, default=64, help="waiting requests before 429 (default 64)")
    p.add_argument("--speculation", default=None, help="auto | off | N, for single greedy requests")
    p.add_argument("--default-max-tokens", type=positive_int, default=None, metavar="N",
                   help="new tokens of a chat request without max_tokens (default: the model's generation config "
                        "max_new_tokens / max_length, else 256; never past the context)")
    p.add_argument("--shutdown-grace", type=_non_negative_seconds, default=10.0, metavar="SECONDS",
                   help="on Ctrl-C / SIGTERM, how long requests in flight may finish before they are cancelled "
                        "with a 503 (default 10)")
    p.add_argument("--dtype", default=None, choices=["auto", "float32", "float16", "bfloat16"],
                   help="compute dtype; units travel as stored and convert on arrival (default auto: as stored)")
    add_trust_args(p)
    add_common(p)
    p.set_defaults(func=cmd_api)
