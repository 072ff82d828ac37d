"""``StreamingConfig``: the original project's options, overridable from ``SURFING_*`` environment variables."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any

from .exceptions import ConfigurationError

ENV_PREFIX = "SURFING_"


def _coerce(value: str, typ: Any, name: str) -> Any:
    typ = typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))
    try:
        if typ.startswith("bool"):
            low = value.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(value)
        if typ.startswith("int"):
            return int(value)
        if typ.startswith("float"):
            return float(value)
        return value
    except ValueError:
        raise ConfigurationError(f"environment variable {ENV_PREFIX}{name.upper()}={value!r} is not a valid {typ}") from None


@dataclass
class StreamingConfig:
    """Client and server options.

    Every field can be overridden with ``SURFING_<FIELD>`` (e.g. ``SURFING_SERVER_PORT=9000``,
    ``SURFING_CACHE_SIZE=5``, ``SURFING_TOKEN``) via :meth:`from_env`.
    """

    server_host: str = "localhost"
    server_port: int = 8765
    use_ssl: bool = False
    cache_size: int = 3
    cache_size_mb: float | None = None
    enable_compression: bool = False  # kept for compatibility: weights go raw (compression costs ~30x throughput)
    prefetch_layers: bool = True
    prefetch_count: int = 1
    timeout_seconds: float = 30.0
    max_retries: int = 3
    model_name: str | None = None
    chunks_dir: str = "./chunks"
    token: str | None = field(default=None, repr=False)
    cache_policy: str = "order"

    def __post_init__(self) -> None:
        if self.cache_size < 0:
            raise ConfigurationError(f"cache_size must be >= 0, got {self.cache_size}")
        if self.prefetch_count < 0:
            raise ConfigurationError(f"prefetch_count must be >= 0, got {self.prefetch_count}")
        if self.timeout_seconds <= 0:
            raise ConfigurationError(f"timeout_seconds must be > 0, got {self.timeout_seconds}")
        if not 0 < self.server_port < 65536:
            raise ConfigurationError(f"server_port must be in 1..65535, got {self.server_port}")

    @property
    def websocket_uri(self) -> str:
        scheme = "wss" if self.use_ssl else "ws"
        return f"{scheme}://{self.server_host}:{self.server_port}"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> StreamingConfig:
        """Defaults, then ``SURFING_*`` variables, then explicit ``overrides``."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = ENV_PREFIX + f.name.upper()
            if key in env:
                values[f.name] = _coerce(env[key], f.type, f.name)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
