"""Options shared by several commands: verbosity, client connection flags, S3 storage flags.

Each helper turns CLI flags into the keyword arguments of a library call; none holds logic of its own.
"""

from __future__ import annotations

import argparse
import os
import ssl
from pathlib import Path
from typing import Any

from ..exceptions import ConfigurationError


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (``--max-new-tokens 0`` is a usage error, not a transformers traceback)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value != value:  # NaN
        raise argparse.ArgumentTypeError(f"{text!r} is not a number")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a number >= 0 (``--temperature -1`` is a usage error, not silently greedy)."""
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0 is greedy), got {text}")
    return value


def probability(text: str) -> float:
    """argparse type: a number in (0, 1] (``--top-p``)."""
    value = _number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def add_common(p: argparse.ArgumentParser) -> None:
    """``-v`` (repeatable: more log detail, tracebacks) and ``-q`` (errors only, no progress bars)."""
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output; show tracebacks")
    p.add_argument("-q", "--quiet", action="store_true", help="errors only: no progress bars, no info lines")


def add_connection_args(p: argparse.ArgumentParser, *, with_server: bool = True) -> None:
    """``--server`` (optional), ``--token`` / ``--token-file`` and ``--ca-cert``: how a client reaches a server."""
    if with_server:
        p.add_argument("--server", default=os.environ.get("SURFING_SERVER", "ws://localhost:8765"),
                       help="ws(s)://host:port or host:port (comma-separated list: failover), s3://bucket/prefix "
                            "or a chunk directory (default $SURFING_SERVER or ws://localhost:8765)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--token", default=None, help="bearer token (default $SURFING_TOKEN); prefer --token-file")
    g.add_argument("--token-file", default=None, metavar="FILE",
                   help="read the bearer token from FILE (keeps it out of argv and ps)")
    p.add_argument("--ca-cert", default=None, metavar="FILE",
                   help="PEM CA certificate(s) to trust for wss:// (a private CA; default: the system store)")
    add_trust_args(p)


def add_trust_args(p: argparse.ArgumentParser) -> None:
    """``--trust-key KEY.pub`` (repeatable: key rotation) and ``--manifest-sha256 HEX``: refuse any manifest
    not signed by a trusted key / not the pinned one (default ``$SURFING_TRUSTED_KEYS``)."""
    p.add_argument("--trust-key", action="append", default=None, metavar="KEY.pub",
                   help="only use models whose manifest is signed by this Ed25519 public key (repeatable)")
    p.add_argument("--manifest-sha256", default=None, metavar="HEX", help="only use this exact manifest (SHA-256)")


def add_client_args(p: argparse.ArgumentParser, *, cache_size: int = 4, memory: str | None = None) -> None:
    """Flags of every command that streams a model: connection, ``--model`` and ``--cache-size``."""
    add_connection_args(p)
    p.add_argument("--model", default=None, help="model name, or the path / hub id it was chunked from "
                   "(default: the only hosted model)")
    p.add_argument("--cache-size", type=int, default=None,
                   help=f"streamed layers kept between uses (overrides --memory; default: planned from --memory, "
                        f"else {cache_size})")
    p.add_argument("--memory", default=memory, metavar="auto|SIZE",
                   help="memory the client may use for the model, e.g. 600MB, 2GiB or auto (what this process's "
                        f"cgroup / the system has left); plans the cache (default: {memory or 'none'})")
    p.set_defaults(cache_size_fallback=cache_size)
    p.add_argument("--device", default=None, help="where compute runs: cpu (default), cuda, cuda:N or mps ($SURFING_DEVICE)")
    p.add_argument("--dtype", default=None, choices=["auto", "float32", "float16", "bfloat16"],
                   help="compute dtype; units travel as stored and convert on arrival (default auto: as stored)")


def read_token_file(path: str) -> str:
    """The token in ``path`` (surrounding whitespace stripped). Raises ConfigurationError if unreadable/empty."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigurationError(f"cannot read --token-file {path}: {exc.strerror or exc}") from None
    if not token:
        raise ConfigurationError(f"--token-file {path} is empty")
    return token


def resolve_token(args: argparse.Namespace) -> str | None:
    """``--token-file`` > ``--token`` > ``$SURFING_TOKEN`` > none."""
    if getattr(args, "token_file", None):
        return read_token_file(args.token_file)
    return getattr(args, "token", None) or os.environ.get("SURFING_TOKEN") or None


def ssl_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    """A client TLS context trusting ``--ca-cert`` too (None: the library's default, the system store)."""
    path = getattr(args, "ca_cert", None)
    if not path:
        return None
    from ..client.open import client_ssl_context

    return client_ssl_context(path)


def parse_servers(value: str) -> str | list[str]:
    """``--server`` -> one location or a failover list; ``host:port`` means ``ws://host:port``.

    Raises ConfigurationError for ``http(s)://`` (the library's normalize_uri says to use ws:// or wss://).
    """
    from ..client.open import normalize_uri

    parts = [normalize_uri(p) for p in value.split(",") if p.strip()]
    if not parts:
        raise ConfigurationError("--server is empty")
    return parts if len(parts) > 1 else parts[0]


def model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of a streaming model class built from the client flags."""
    return dict(model_name=args.model, websocket_uri=parse_servers(args.server), cache_size=cache_size_of(args),
                memory_budget=getattr(args, "memory", None),
                token=resolve_token(args), ssl_context=ssl_context(args), device=getattr(args, "device", None),
                dtype=getattr(args, "dtype", None),
                **trust_kwargs(args))


def cache_size_of(args: argparse.Namespace) -> int | None:
    """``--cache-size`` if given; else ``None`` (the planner's choice) with ``--memory``; else the command's default."""
    if getattr(args, "cache_size", None) is not None:
        return args.cache_size
    return None if getattr(args, "memory", None) else getattr(args, "cache_size_fallback", None)


def trust_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``trusted_keys`` / ``manifest_sha256`` from ``--trust-key`` / ``--manifest-sha256`` (None: not given)."""
    return dict(trusted_keys=getattr(args, "trust_key", None), manifest_sha256=getattr(args, "manifest_sha256", None))


def open_model(args: argparse.Namespace, cls: Any = None, **extra: Any) -> Any:
    """The streaming model the client flags describe (``cls`` default: StreamingBaseModel)."""
    if cls is None:
        from ..models import StreamingBaseModel as cls
    return cls(**{**model_kwargs(args), **extra})


# --------------------------------------------------------------------------------------- S3 storage
def add_s3_args(p: argparse.ArgumentParser) -> None:
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


def s3_backend(args: argparse.Namespace) -> Any:
    """An S3Backend from the ``--s3-*`` flags, or None when S3 was not asked for."""
    if not (args.s3 or args.s3_bucket):
        return None
    if not args.s3_bucket:
        raise ConfigurationError("--s3 needs --s3-bucket")
    return s3_options(args).backend(args.s3_bucket, args.s3_prefix)


def s3_options(args: argparse.Namespace) -> Any:
    """The ``--s3-*`` endpoint, region and credential flags as :class:`~..storage.S3Options`."""
    from ..storage import S3Options

    return S3Options(endpoint_url=args.s3_endpoint, region_name=args.s3_region, aws_access_key_id=args.s3_access_key,
                     aws_secret_access_key=args.s3_secret_key, aws_session_token=args.s3_session_token,
                     profile_name=args.s3_profile)
