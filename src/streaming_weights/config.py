"""``StreamingConfig``: every client and server option in one object, overridable from ``SURFING_*`` variables.

A field is declared with :func:`opt`, which names the parser that reads it from the environment, so
adding an option is one line::

    memory_budget: int | str | None = opt(None, parse=parse_memory)

Model constructors map their keyword arguments onto this object (:meth:`StreamingConfig.resolve`):
the issues that add options add fields here, not parameters to a growing ``__init__``.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, fields
from typing import Any, Callable

from .exceptions import ConfigurationError, UnknownOptionError

ENV_PREFIX = "SURFING_"
#: the bearer token's variable, read by :meth:`StreamingConfig.resolve` and :func:`token_from_env`
TOKEN_ENV = ENV_PREFIX + "TOKEN"


def cache_dir_from_env(env: dict[str, str] | None = None) -> str:
    """``$SURFING_CACHE_DIR``, else ``$XDG_CACHE_HOME/surfing-weights``, else ``~/.cache/surfing-weights``."""
    env = os.environ if env is None else env
    return env.get(ENV_PREFIX + "CACHE_DIR") or os.path.join(
        env.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "surfing-weights")


def bench_cpus_from_env(env: dict[str, str] | None = None) -> list[int] | None:
    """``$SURFING_BENCH_CPUS`` (``"1,0"``: the benchmark client's core, then the server's), or ``None``."""
    value = (os.environ if env is None else env).get(ENV_PREFIX + "BENCH_CPUS")
    return [int(c) for c in value.split(",")] if value else None


def token_from_env(env: dict[str, str] | None = None) -> str | None:
    """``$SURFING_TOKEN`` (or ``None`` if unset or empty): the default bearer token of clients and servers.
    This module and the CLI are the only places ``SURFING_*`` variables are read (tests/test_structure.py)."""
    return (os.environ if env is None else env).get(TOKEN_ENV) or None
#: streamed units kept between uses when neither ``cache_size`` nor ``memory_budget`` is given
DEFAULT_CACHE_SIZE = 3

Parser = Callable[[str], Any]


# ------------------------------------------------------------------------------------- parsers
# Each parser turns one environment string into the field's value or raises ValueError; the
# caller turns that into a ConfigurationError naming the variable.
def parse_str(value: str) -> str:
    return value


def parse_optional_str(value: str) -> str | None:
    return value or None


def parse_bool(value: str) -> bool:
    low = value.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected one of 1/0, true/false, yes/no, on/off")


def parse_int(value: str) -> int:
    return int(value.strip())


def parse_optional_int(value: str) -> int | None:
    return None if value.strip().lower() in ("", "none") else int(value)


def parse_float(value: str) -> float:
    return float(value.strip())


def parse_optional_float(value: str) -> float | None:
    return None if value.strip().lower() in ("", "none") else float(value)


def parse_list(value: str) -> list[str]:
    """Comma-separated items, blanks dropped (``"a, b,"`` -> ``["a", "b"]``)."""
    return [item.strip() for item in value.split(",") if item.strip()]


def parse_uris(value: str) -> str | list[str] | None:
    """One location, or several comma-separated servers (failover)."""
    items = parse_list(value)
    if not items:
        return None
    return items[0] if len(items) == 1 else items


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_memory(value: str | int) -> int | str:
    """A byte count: ``1234``, ``"600MB"``, ``"2GiB"``, ``"1.5 GB"``, or ``"auto"`` (kept as the string)."""
    if isinstance(value, int):
        return value
    if value.strip().lower() == "auto":
        return "auto"
    m = _MEMORY.match(value)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError("expected a size such as 600MB, 2GiB, 1234 or auto")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def opt(default: Any = None, *, parse: Parser | None = parse_str, repr: bool = True, factory: Any = None) -> Any:
    """A :class:`StreamingConfig` field read from ``SURFING_<NAME>`` with ``parse`` (``None``: not from the
    environment, e.g. objects such as an SSL context)."""
    kw: dict[str, Any] = {"repr": repr, "metadata": {"parse": parse}}
    if factory is not None:
        return dataclasses.field(default_factory=factory, **kw)
    return dataclasses.field(default=default, **kw)


@dataclass(frozen=True)
class StreamingConfig:
    """Client and server options.

    Every field with a parser can be overridden with ``SURFING_<FIELD>`` (e.g. ``SURFING_SERVER_PORT=9000``,
    ``SURFING_CACHE_SIZE=5``, ``SURFING_TOKEN``, ``SURFING_SERVER_URI=ws://a:1,ws://b:2``) via :meth:`from_env`.
    """

    server_host: str = opt("localhost", parse=parse_str)
    server_port: int = opt(8765, parse=parse_int)
    use_ssl: bool = opt(False, parse=parse_bool)
    #: streamed units kept between uses; ``None``: the memory planner's choice, or
    #: :data:`DEFAULT_CACHE_SIZE` without a ``memory_budget`` (an explicit value always wins)
    cache_size: int | None = opt(None, parse=parse_optional_int)
    cache_size_mb: float | None = opt(None, parse=parse_optional_float)
    prefetch_count: int = opt(1, parse=parse_int)
    #: mixture-of-experts: while layer i computes, apply layer i+1's router to layer i's hidden state and
    #: fetch the experts it predicts (pre-gating); off by default (see the benchmark's hit rate and stall)
    expert_prefetch: bool = opt(False, parse=parse_bool)
    timeout_seconds: float = opt(30.0, parse=parse_float)
    max_retries: int = opt(3, parse=parse_int)
    model_name: str | None = opt(None, parse=parse_optional_str)
    chunks_dir: str = opt("./chunks", parse=parse_str)
    token: str | None = opt(None, parse=parse_optional_str, repr=False)
    cache_policy: Any = opt("order", parse=parse_str)  # "order", "lru" or a client.policy.CachePolicy
    #: where a model streams from: ws(s):// URI, a list of them, s3://, a chunk directory or a UnitSource
    #: (``None``: :attr:`websocket_uri`).
    server_uri: Any = opt(None, parse=parse_uris)
    ssl_context: Any = opt(None, parse=None, repr=False)
    monitor: Any = opt(None, parse=None, repr=False)
    trace: bool = opt(False, parse=parse_bool)
    #: ``s3://`` locations: a ``storage.S3Options`` (endpoint, region, credentials); ``None``: boto3's defaults
    #: (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, profiles…)
    s3: Any = opt(None, parse=None)
    #: ``generate`` drafting: "auto" (prompt lookup for greedy single-sequence calls), "off", or a draft
    #: length N (validated by ``models.generation.parse_speculation`` where it is used).
    speculation: Any = opt("auto", parse=parse_str)
    ca_cert: str | None = opt(None, parse=parse_optional_str)  # PEM file of a private CA (wss://)
    dtype: Any = opt(None, parse=parse_optional_str)  # compute dtype: torch.dtype, "bfloat16"…; None/"auto": stored
    #: what the client may hold for the model: bytes, "600MB", "2GiB" or "auto" (see models.planner)
    memory_budget: int | str | None = opt(None, parse=parse_memory)
    trusted_keys: Any = opt(factory=list, parse=parse_list)  # Ed25519 public key files: manifests must be signed by one
    manifest_sha256: str | None = opt(None, parse=parse_optional_str)  # pin one exact manifest.json (SHA-256 hex)
    #: where compute runs: "cpu", "cuda", "cuda:N" or "mps" (checked when a model is built: ``client.device``)
    device: str = opt("cpu", parse=parse_str)
    #: quantized (int8 / int4) units in memory: "codes" (the compressed tier: cached as codes, expanded per use),
    #: "dequantized" (converted on arrival), "auto": codes under a memory budget on the CPU, else dequantized, or
    #: "kernel": codes, and the blocks' linear layers with int4 / int8-channel weights compute on them with torch's
    #: weight-only kernels (bfloat16 activations: numerics change; CPU only, else as "codes"; models.qlinear)
    quantized_in_memory: str = opt("auto", parse=parse_str)

    def __post_init__(self) -> None:
        checks = [("cache_size", self.cache_size is None or self.cache_size >= 0, ">= 0"), ("prefetch_count", self.prefetch_count >= 0, ">= 0"),
                  ("timeout_seconds", self.timeout_seconds > 0, "> 0"), ("max_retries", self.max_retries >= 0, ">= 0"),
                  ("server_port", 0 < self.server_port < 65536, "in 1..65535"),
                  ("cache_size_mb", self.cache_size_mb is None or self.cache_size_mb >= 0, ">= 0"),
                  ("quantized_in_memory", self.quantized_in_memory in ("auto", "codes", "dequantized", "kernel"),
                   "'auto', 'codes', 'dequantized' or 'kernel'")]
        for name, ok, want in checks:
            if not ok:
                raise ConfigurationError(f"{name} must be {want}, got {getattr(self, name)!r}")

    @property
    def websocket_uri(self) -> str:
        scheme = "wss" if self.use_ssl else "ws"
        return f"{scheme}://{self.server_host}:{self.server_port}"

    @property
    def location(self) -> Any:
        """Where a model streams from: :attr:`server_uri` if set, else :attr:`websocket_uri`."""
        return self.server_uri if self.server_uri is not None else self.websocket_uri

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> StreamingConfig:
        """Defaults, then ``SURFING_*`` variables, then explicit ``overrides`` (``None`` means not given)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = ENV_PREFIX + f.name.upper()
            parse = f.metadata.get("parse")
            if parse is None or key not in env:
                continue
            try:
                values[f.name] = parse(env[key])
            except ValueError as exc:
                raise ConfigurationError(f"environment variable {key}={env[key]!r} is not a valid {f.name}: {exc}") from None
        return cls(**values).replace(**overrides)

    def replace(self, **overrides: Any) -> StreamingConfig:
        """A copy with every non-``None`` override applied (validated again)."""
        unknown = sorted(set(overrides) - set(self.option_names()))
        if unknown:
            raise UnknownOptionError(f"unknown option {unknown[0]!r}; options are {self.option_names()}")
        given = {k: v for k, v in overrides.items() if v is not None}
        return dataclasses.replace(self, **given) if given else self

    @classmethod
    def resolve(cls, config: StreamingConfig | None = None, **options: Any) -> StreamingConfig:
        """The options a model runs with: ``config`` (default: :meth:`from_env`) with every explicit
        (non-``None``) keyword winning. An unknown keyword raises :class:`UnknownOptionError` naming it."""
        base = config if config is not None else cls.from_env()
        out = base.replace(**options)
        # a bearer token set in the environment applies to an explicit config too (never logged)
        return out if out.token is not None or token_from_env() is None else out.replace(token=token_from_env())
