"""``surfing serve``: host chunked model(s) over WebSocket until Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any

from ..exceptions import ConfigurationError
from .options import add_common, add_s3_args, s3_backend


def _storage(args: argparse.Namespace) -> tuple[Any, str]:
    if args.chunks_path:
        if args.chunks_dir and args.chunks_dir != args.chunks_path:
            raise ConfigurationError(f"two chunk directories given: {args.chunks_path} and --chunks-dir {args.chunks_dir}")
        args.chunks_dir = args.chunks_path
    backend = s3_backend(args)
    if backend is None and not args.chunks_dir:
        raise ConfigurationError("pass --chunks-dir DIR (or --s3-bucket)")
    if backend is not None and args.chunks_dir:
        raise ConfigurationError("pass --chunks-dir or --s3-bucket, not both")
    prefix = ""
    if backend is None and args.index_dir:  # checkpoint folders served as they are, their index there
        from ..checkpoint import open_checkpoints

        backend = open_checkpoints(args.chunks_dir, index_root=args.index_dir)
    if args.redis_url:
        from ..storage import open_storage
        from ..storage.redis_cache import RedisCacheBackend

        if backend is None:
            backend, prefix = open_storage(args.chunks_dir)
        backend = RedisCacheBackend(backend, args.redis_url)
    return (backend if backend is not None else args.chunks_dir), prefix


def cmd_serve(args: argparse.Namespace) -> int:
    from ..server import WeightServer, run_server

    token = "" if args.token_file else args.token  # a token file replaces --token and $SURFING_TOKEN
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigurationError("--tls-cert and --tls-key go together")
    pacer = None
    if args.max_rate is not None:  # parsed first: a bad rate fails before anything is opened
        from ..server.pacing import TokenBucket, parse_rate

        pacer = TokenBucket(parse_rate(args.max_rate))
    storage, prefix = _storage(args)
    server = WeightServer(
        storage, prefix=prefix, host=args.host, port=args.port, cache_size_mb=args.cache_size, token=token,
        token_file=args.token_file, tls_cert=args.tls_cert, tls_key=args.tls_key, max_connections=args.max_connections,
        max_inflight_per_connection=args.max_inflight, pacer=pacer,
    )

    def ready(srv: Any) -> None:
        # the server itself logs the listen address and warns about a non-loopback bind without a token
        auth = "token auth" if srv.access.enabled else "NO auth"
        print(f"serving {', '.join(sorted(srv.models))} on {srv.listen_uri} ({auth}); Ctrl-C to stop", flush=True)

    asyncio.run(run_server(server, ready=ready))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve chunked model(s) and Hugging Face checkpoint folders over WebSocket")
    p.add_argument("chunks_path", nargs="?", metavar="DIR", help="same as --chunks-dir DIR")
    p.add_argument("--chunks-dir", "-d", help="a chunked model directory, a Hugging Face checkpoint folder "
                   "(config.json + *.safetensors, served as it is), or a directory of several")
    p.add_argument("--index-dir", default=None, metavar="DIR",
                   help="where checkpoint folders served as they are keep their index (unit hashes, signature); "
                        "default: the cache directory's index/ ($SURFING_CACHE_DIR)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    p.add_argument("--port", "-p", type=int, default=8765, help="TCP port (0 = any free port)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--token", default=None, help="bearer token clients must send (default $SURFING_TOKEN)")
    g.add_argument("--token-file", default=None,
                   help="tokens, one 'TOKEN [MODEL[,MODEL...]]' per line (no models: all); re-read on SIGHUP")
    p.add_argument("--tls-cert", default=None, help="PEM certificate (chain) to serve wss://")
    p.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    p.add_argument("--cache-size", type=float, default=100, metavar="MB", help="server blob cache (MiB)")
    p.add_argument("--max-connections", type=int, default=64)
    p.add_argument("--max-inflight", type=int, default=32, help="concurrent requests per connection")
    p.add_argument("--max-rate", default=None, metavar="RATE",
                   help="cap the bytes the server sends per second, all clients together: 1Gbit, 500Mbit, 200MB")
    p.add_argument("--redis-url", default=None, metavar="URL",
                   help="shared Redis byte cache in front of the storage (redis://host:port/db), for several servers")
    add_common(p)
    add_s3_args(p)
    p.set_defaults(func=cmd_serve, log_level=logging.INFO)
