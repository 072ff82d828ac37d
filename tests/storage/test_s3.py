"""S3Backend against a real S3 server (rclone ``serve s3`` started by the ``s3_server`` fixture)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from streaming_weights import ModelChunker
from streaming_weights.client import StorageSource
from streaming_weights.exceptions import (
    AuthenticationError,
    ConfigurationError,
    InvalidKeyError,
    KeyNotFoundError,
    StorageError,
)
from streaming_weights.netutil import free_port
from streaming_weights.storage import open_storage
from streaming_weights.storage.s3 import S3Backend

pytestmark = pytest.mark.s3

MiB = 1 << 20


def run(coro):
    return asyncio.run(coro)


def source_tensors(src: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(src.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


async def read_all_units(backend, prefix: str, name: str) -> dict[str, torch.Tensor]:
    """Every tensor of every unit, fetched (hash-verified) through StorageSource."""
    source = StorageSource(backend, prefix)
    try:
        assert await source.list_models() == [name]
        manifest = await source.get_manifest(name)
        tensors: dict[str, torch.Tensor] = {}
        for unit in manifest.units:
            fetched = await source.fetch_unit(manifest, unit.name)
            tensors.update({k: v.clone() for k, v in fetched.tensors.items()})
        for f in manifest.files:
            await source.fetch_file(manifest, f.name)
        return tensors
    finally:
        await source.close()


def assert_same_weights(streamed: dict[str, torch.Tensor], src: Path, tied: tuple[str, ...] = ()) -> None:
    ref = source_tensors(src)
    assert set(ref) - set(tied) <= set(streamed), sorted(set(ref) - set(streamed))
    for k, v in ref.items():
        if k in streamed:
            assert streamed[k].dtype == v.dtype and torch.equal(streamed[k], v), k


# ------------------------------------------------------------------------------------ basic operations
def test_round_trip_list_ranges_and_delete(s3_server, s3_bucket):
    async def go():
        s3 = s3_server.backend(s3_bucket, "models/a")
        assert s3.location == f"s3://{s3_bucket}/models/a"
        await s3.save("manifest.json", b'{"x": 1}')
        await s3.save("units/l0.safetensors", bytes(range(256)) * 4)
        await s3.save("units/l1.safetensors", b"")
        assert await s3.load("manifest.json") == b'{"x": 1}'
        assert await s3.exists("units/l0.safetensors")
        assert not await s3.exists("units/nope")
        assert await s3.size("units/l0.safetensors") == 1024
        assert await s3.load("units/l1.safetensors") == b""
        assert await s3.list() == ["manifest.json", "units/l0.safetensors", "units/l1.safetensors"]
        assert await s3.list("units/") == ["units/l0.safetensors", "units/l1.safetensors"]
        assert await s3.list("units/l0") == ["units/l0.safetensors"]
        # ranges: inside, clipped at the end, past the end
        assert await s3.read_range("units/l0.safetensors", 10, 5) == bytes(range(10, 15))
        assert await s3.read_range("units/l0.safetensors", 1020, 100) == bytes(range(252, 256))
        assert await s3.read_range("units/l0.safetensors", 5000, 10) == b""
        buf = bytearray(300)
        assert await s3.read_into("units/l0.safetensors", buf, offset=900) == 124
        assert bytes(buf[:124]) == (bytes(range(256)) * 4)[900:]
        # the key lives under the prefix in the bucket
        raw = s3_server.client().get_object(Bucket=s3_bucket, Key="models/a/manifest.json")["Body"].read()
        assert raw == b'{"x": 1}'
        # overwrite, delete
        await s3.save("manifest.json", b"v2")
        assert await s3.load("manifest.json") == b"v2"
        await s3.delete("manifest.json")
        assert not await s3.exists("manifest.json")
        await s3.delete("manifest.json")  # deleting a missing key is fine
        assert s3.stats["get_requests"] >= 6 and s3.stats["put_requests"] >= 4
        await s3.close()
        await s3.close()

    run(go())


def test_invalid_keys_are_refused(s3_server, s3_bucket):
    s3 = s3_server.backend(s3_bucket)
    for bad in ("../x", "/abs", "a/../../b", "", "a\\b"):
        with pytest.raises(InvalidKeyError):
            run(s3.load(bad))
    with pytest.raises(InvalidKeyError):
        run(s3.list("../"))


def test_large_object_multipart_and_parallel_ranged_gets(s3_server, s3_bucket):
    data = os.urandom(40 * MiB + 12345)

    async def go():
        s3 = s3_server.backend(s3_bucket, "big", part_size=8 * MiB, max_concurrency=6)
        await s3.save("units/huge.safetensors", data)
        puts = s3.stats["put_requests"]
        assert puts == 1 + 6 + 1, s3.stats  # create + 6 parts + complete: a multipart upload
        assert await s3.size("units/huge.safetensors") == len(data)

        before = dict(s3.stats)
        assert await s3.load("units/huge.safetensors") == data
        gets = s3.stats["get_requests"] - before["get_requests"]
        assert gets == 6, s3.stats  # ceil(40 MiB / 8 MiB) ranged GETs
        assert s3.stats["get_bytes"] - before["get_bytes"] == len(data)

        buf = bytearray(len(data))
        assert await s3.read_into("units/huge.safetensors", buf) == len(data)
        assert buf == data
        # a big range from the middle: clipped at the end of the object
        buf = bytearray(20 * MiB)
        n = await s3.read_into("units/huge.safetensors", buf, offset=25 * MiB)
        assert n == len(data) - 25 * MiB and buf[:n] == data[25 * MiB :]
        await s3.close()

    run(go())


def test_parallel_gets_overlap(s3_server, s3_bucket):
    """Several units loaded at once share the backend's pool without deadlock or mixing bytes."""
    blobs = {f"u{i}": os.urandom(3 * MiB + i) for i in range(6)}

    async def go():
        s3 = s3_server.backend(s3_bucket, part_size=1 * MiB, max_concurrency=4)
        await asyncio.gather(*(s3.save(k, v) for k, v in blobs.items()))
        got = await asyncio.gather(*(s3.load(k) for k in blobs))
        assert got == list(blobs.values())
        await s3.close()

    run(go())


# --------------------------------------------------------------------------------------------- errors
def test_missing_key(s3_server, s3_bucket):
    s3 = s3_server.backend(s3_bucket, "p")
    for op in (s3.load("nope"), s3.size("nope"), s3.read_range("nope", 0, 10),
               s3.read_into("nope", bytearray(10))):
        with pytest.raises(KeyNotFoundError, match="nope"):
            run(op)
    assert run(s3.exists("nope")) is False


def test_missing_bucket(s3_server):
    s3 = s3_server.backend("no-such-bucket-here")
    for op in (s3.load("k"), s3.save("k", b"x"), s3.list(), s3.exists("k"), s3.size("k"), s3.check()):
        with pytest.raises(StorageError, match="no-such-bucket-here") as info:
            run(op)
        assert not isinstance(info.value, KeyNotFoundError)
        assert "does not exist" in str(info.value)


@pytest.mark.parametrize("which", ["secret", "access_key"])
def test_bad_credentials(s3_server, s3_bucket, which):
    kw = {"aws_access_key_id": s3_server.access_key, "aws_secret_access_key": "wrong-secret"}
    if which == "access_key":
        kw = {"aws_access_key_id": "unknown-key", "aws_secret_access_key": s3_server.secret_key}
    s3 = S3Backend(s3_bucket, endpoint_url=s3_server.endpoint_url, **kw)
    for op in (s3.load("k"), s3.save("k", b"x"), s3.list(), s3.exists("k"), s3.check()):
        with pytest.raises(AuthenticationError, match="credentials"):
            run(op)


def test_unreachable_endpoint(s3_bucket):

    s3 = S3Backend(s3_bucket, endpoint_url=f"http://127.0.0.1:{free_port()}", aws_access_key_id="a",
                   aws_secret_access_key="b", max_attempts=1, connect_timeout=1)
    with pytest.raises(StorageError, match="cannot talk to"):
        run(s3.load("k"))


def test_environment_credentials_and_endpoint(s3_server, s3_bucket, monkeypatch):
    """Credentials and AWS_ENDPOINT_URL from the standard variables, through open_storage('s3://…')."""
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    backend, prefix = open_storage(f"s3://{s3_bucket}/some/dir")
    # presented through the storage layouts (checkpoint folders read as models): an S3Backend underneath
    assert isinstance(getattr(backend, "base", backend), S3Backend) and prefix == "some/dir"
    assert backend.endpoint_url == s3_server.endpoint_url
    run(backend.save(f"{prefix}/x", b"hello"))
    assert run(backend.load(f"{prefix}/x")) == b"hello"


def test_profile_credentials(s3_server, s3_bucket, tmp_path, monkeypatch):
    creds = tmp_path / "credentials"
    creds.write_text(f"[surfing]\naws_access_key_id = {s3_server.access_key}\n"
                     f"aws_secret_access_key = {s3_server.secret_key}\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    s3 = S3Backend(s3_bucket, "p", profile_name="surfing", endpoint_url=s3_server.endpoint_url)
    run(s3.save("k", b"via profile"))
    assert run(s3.load("k")) == b"via profile"
    with pytest.raises(ConfigurationError, match="nope"):
        S3Backend(s3_bucket, profile_name="nope", endpoint_url=s3_server.endpoint_url)


# ---------------------------------------------------------------------------- chunking straight to S3
def test_chunk_to_s3_backend_and_stream_back(s3_server, s3_bucket, tiny_source):
    src = tiny_source("llama")
    s3 = s3_server.backend(s3_bucket, "models/llama")
    result = run(ModelChunker(str(src), storage_backend=s3, name="llama").chunk_model())
    assert result["storage"] == f"s3://{s3_bucket}/models/llama"
    keys = run(s3.list())
    assert "manifest.json" in keys and sum(k.startswith("units/") for k in keys) == result["num_units"]

    # read through a fresh backend at the bucket root: "models" is a dir of models
    streamed = run(read_all_units(s3_server.backend(s3_bucket), "models", "llama"))
    assert_same_weights(streamed, src)


def test_chunk_with_original_keywords(s3_server, s3_bucket, tiny_source):
    src = tiny_source("llama")
    chunker = ModelChunker(
        str(src), name="llama", s3_bucket=s3_bucket, s3_prefix="orig/llama", s3_endpoint=s3_server.endpoint_url,
        aws_access_key_id=s3_server.access_key, aws_secret_access_key=s3_server.secret_key,
    )
    assert isinstance(chunker.storage, S3Backend)
    result = run(chunker.chunk_model())
    assert result["storage"] == f"s3://{s3_bucket}/orig/llama"
    streamed = run(read_all_units(s3_server.backend(s3_bucket, "orig"), "llama", "llama"))
    assert_same_weights(streamed, src)


def test_cli_chunk_to_s3(s3_server, s3_bucket, tiny_source, monkeypatch, capsys):
    from streaming_weights.cli import main as cli_main

    src = tiny_source("llama")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    assert cli_main(["chunk", str(src), "--name", "llama", "--s3-bucket", s3_bucket, "--s3-prefix", "cli/llama",
                     "--s3-endpoint", s3_server.endpoint_url, "--s3-access-key", s3_server.access_key,
                     "--s3-secret-key", s3_server.secret_key]) == 0
    out, err = capsys.readouterr()
    assert f"s3://{s3_bucket}/cli/llama" in out, err
    streamed = run(read_all_units(s3_server.backend(s3_bucket, "cli/llama"), "", "llama"))
    assert_same_weights(streamed, src)

    # read back with credentials + endpoint from the standard AWS variables (s3:// location)

    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    assert cli_main(["inspect", f"s3://{s3_bucket}/cli"]) == 0
    assert "LlamaForCausalLM" in capsys.readouterr().out
    # wrong secret: a specific, readable error and exit status 2
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    assert cli_main(["inspect", f"s3://{s3_bucket}/cli"]) == 2
    assert "credentials" in capsys.readouterr().err
