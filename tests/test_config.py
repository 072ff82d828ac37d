"""config.StreamingConfig and utils helpers."""

from __future__ import annotations

import hashlib
import subprocess

import pytest

from streaming_weights.config import DEFAULT_CACHE_SIZE, StreamingConfig
from streaming_weights.exceptions import ConfigurationError
from streaming_weights.utils import calculate_chunk_hash


def test_defaults():
    c = StreamingConfig()
    assert (c.server_host, c.server_port, c.use_ssl) == ("localhost", 8765, False)
    # cache_size None: the planner decides with a memory_budget, else DEFAULT_CACHE_SIZE (3) units.
    assert (c.cache_size, c.prefetch_count) == (None, 1)
    assert c.memory_budget is None and DEFAULT_CACHE_SIZE == 3
    assert c.timeout_seconds == 30.0 and c.model_name is None and c.chunks_dir == "./chunks"
    assert c.websocket_uri == "ws://localhost:8765"
    assert StreamingConfig(server_host="h.example", server_port=443, use_ssl=True).websocket_uri == "wss://h.example:443"


def test_token_not_in_repr():
    assert "s3cret" not in repr(StreamingConfig(token="s3cret"))


def test_env_overrides():
    env = {"SURFING_SERVER_HOST": "10.0.0.2", "SURFING_SERVER_PORT": "9000", "SURFING_CACHE_SIZE": "5",
           "SURFING_USE_SSL": "yes", "SURFING_TIMEOUT_SECONDS": "2.5",
           "SURFING_PREFETCH_COUNT": "4", "SURFING_MODEL_NAME": "m", "SURFING_CHUNKS_DIR": "/c",
           "SURFING_CACHE_SIZE_MB": "64", "SURFING_TOKEN": "tok", "UNRELATED": "x"}
    c = StreamingConfig.from_env(env)
    assert (c.server_host, c.server_port, c.cache_size, c.use_ssl) == ("10.0.0.2", 9000, 5, True)
    assert (c.timeout_seconds, c.prefetch_count) == (2.5, 4)
    assert (c.model_name, c.chunks_dir, c.cache_size_mb, c.token) == ("m", "/c", 64.0, "tok")
    assert c.websocket_uri == "wss://10.0.0.2:9000"
    # explicit overrides win over the environment; None means "not given"
    c = StreamingConfig.from_env(env, server_port=7000, cache_size=None)
    assert (c.server_port, c.cache_size) == (7000, 5)


def test_from_env_reads_os_environ(monkeypatch):
    monkeypatch.setenv("SURFING_SERVER_PORT", "9123")
    assert StreamingConfig.from_env().server_port == 9123
    assert StreamingConfig().server_port == 8765  # plain construction is not affected


@pytest.mark.parametrize("key, value", [
    ("SURFING_SERVER_PORT", "abc"), ("SURFING_SERVER_PORT", "70000"), ("SURFING_SERVER_PORT", "0"),
    ("SURFING_CACHE_SIZE", "-1"), ("SURFING_CACHE_SIZE", "1.5"), ("SURFING_USE_SSL", "maybe"),
    ("SURFING_TIMEOUT_SECONDS", "0"), ("SURFING_TIMEOUT_SECONDS", "soon"), ("SURFING_PREFETCH_COUNT", "-2"),
    ("SURFING_CACHE_SIZE_MB", "lots"),
])
def test_bad_env_values(key, value):
    with pytest.raises(ConfigurationError, match=key.removeprefix("SURFING_").lower() + "|" + key):
        StreamingConfig.from_env({key: value})


def test_bad_direct_values():
    for kw in ({"cache_size": -1}, {"server_port": 0}, {"timeout_seconds": -1}, {"prefetch_count": -1}):
        with pytest.raises(ConfigurationError):
            StreamingConfig(**kw)
    assert issubclass(ConfigurationError, ValueError)


def test_calculate_chunk_hash_matches_sha256sum(tmp_path):
    p = tmp_path / "unit.safetensors"
    data = bytes(range(256)) * 9000  # > one 1 MiB read block
    p.write_bytes(data)
    assert calculate_chunk_hash(p) == hashlib.sha256(data).hexdigest()
    assert calculate_chunk_hash(str(p)) == subprocess.run(["sha256sum", str(p)], capture_output=True, text=True,
                                                          check=True).stdout.split()[0]
    (tmp_path / "empty").write_bytes(b"")
    assert calculate_chunk_hash(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()


# ---------------------------------------------------------------- per-field parsers, options mapping
from streaming_weights.config import opt, parse_list, parse_memory  # noqa: E402
from streaming_weights.exceptions import UnknownOptionError  # noqa: E402


@pytest.mark.parametrize("text, want", [("1234", 1234), ("600MB", 600_000_000), ("2GiB", 2 << 30),
                                        ("1.5 GB", 1_500_000_000), ("64mib", 64 << 20), ("auto", "auto")])
def test_parse_memory(text, want):
    assert parse_memory(text) == want


@pytest.mark.parametrize("text", ["lots", "12 parsecs", "-5MB", ""])
def test_parse_memory_rejects(text):
    with pytest.raises(ValueError):
        parse_memory(text)


def test_parse_list():
    assert parse_list("a, b,,c ") == ["a", "b", "c"] and parse_list("") == []


def test_every_field_declares_its_parser():
    import dataclasses

    for f in dataclasses.fields(StreamingConfig):
        assert "parse" in f.metadata, f.name  # declared with opt(): never parsed by its type's name


def test_a_new_field_is_one_line_with_its_parser():
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Extended(StreamingConfig):
        memory_budget: int | str | None = opt(None, parse=parse_memory)
        trusted_keys: list[str] = opt(parse=parse_list, factory=list)

    c = Extended.from_env({"SURFING_MEMORY_BUDGET": "600MB", "SURFING_TRUSTED_KEYS": "k1,k2"})
    assert (c.memory_budget, c.trusted_keys) == (600_000_000, ["k1", "k2"])
    with pytest.raises(ConfigurationError, match="SURFING_MEMORY_BUDGET"):
        Extended.from_env({"SURFING_MEMORY_BUDGET": "lots"})


def test_server_uri_from_env_one_or_many():
    assert StreamingConfig.from_env({"SURFING_SERVER_URI": "ws://a:1"}).location == "ws://a:1"
    assert StreamingConfig.from_env({"SURFING_SERVER_URI": "ws://a:1, ws://b:2"}).location == ["ws://a:1", "ws://b:2"]
    assert StreamingConfig.from_env({}).location == "ws://localhost:8765"


def test_resolve_explicit_wins_over_config_and_unknown_is_named():
    base = StreamingConfig(cache_size=4, prefetch_count=2)
    c = StreamingConfig.resolve(base, cache_size=7, prefetch_count=None)
    assert (c.cache_size, c.prefetch_count) == (7, 2) and base.cache_size == 4
    with pytest.raises(UnknownOptionError, match="'cache_sise'") as ei:
        StreamingConfig.resolve(base, cache_sise=3)
    assert isinstance(ei.value, TypeError) and isinstance(ei.value, ConfigurationError)
    with pytest.raises(ConfigurationError, match="max_retries"):
        StreamingConfig.resolve(base, max_retries=-1)


def test_memory_budget_and_ca_cert_from_env():
    c = StreamingConfig.from_env({"SURFING_MEMORY_BUDGET": "2GiB", "SURFING_CA_CERT": "/etc/ca.pem",
                                  "SURFING_CACHE_SIZE": ""})
    assert (c.memory_budget, c.ca_cert, c.cache_size) == (2 << 30, "/etc/ca.pem", None)
    assert StreamingConfig.from_env({"SURFING_MEMORY_BUDGET": "auto"}).memory_budget == "auto"


def test_the_resolved_options_are_immutable():
    """What a model runs with is fixed at construction: replace() makes a new object, nothing changes one."""
    import dataclasses

    c = StreamingConfig(cache_size=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.cache_size = 5  # type: ignore[misc]
    assert c.replace(cache_size=5).cache_size == 5 and c.cache_size == 2
