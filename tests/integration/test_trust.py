"""keygen -> sign -> serve -> a client with trusted keys, over ws://, a directory and S3; and the attack the
signature exists for: a unit's weights replaced and the manifest re-hashed consistently, old signature kept."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from streaming_weights import StreamingLlamaModel
from streaming_weights.cli import main as cli
from streaming_weights.client.open import open_unit_source
from streaming_weights.exceptions import ConfigurationError, SignatureError
from streaming_weights.format import MANIFEST_FILE, Digests, Manifest, encode_tensors
from streaming_weights.format.signing import SIGNATURE_FILE

from tests.support.streaming import served

IDS = torch.tensor([[5, 17, 33, 2, 9, 41, 7]])


@pytest.fixture(scope="module")
def reference(tiny_chunks):
    src, chunks = tiny_chunks("llama", layers=2)
    ref = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(input_ids=IDS).logits
    return chunks, want


@pytest.fixture
def signed(reference, tmp_path):
    """A private copy of the chunked model signed through the CLI: (dir, private key, public key, old public key)."""
    chunks = tmp_path / "llama"
    shutil.copytree(reference[0], chunks)
    for name in ("old", "key"):
        assert cli(["keygen", "--out", str(tmp_path / name), "-q"]) == 0
    assert cli(["sign", str(chunks), "--key", str(tmp_path / "key"), "-q"]) == 0
    return chunks, tmp_path / "key", tmp_path / "key.pub", tmp_path / "old.pub"


def logits(location, **trust) -> torch.Tensor:
    with StreamingLlamaModel("llama", location, cache_size=1, **trust) as m:
        return m.hf_model(input_ids=IDS).logits


def forge(chunks: Path, unit: str = "model.layers.0") -> None:
    """Scale every weight of ``unit``, write it back, and re-hash the manifest to match: a fully
    consistent model whose only flaw is that its signature is over the old manifest."""
    manifest = Manifest.from_bytes((chunks / MANIFEST_FILE).read_bytes())
    entry = manifest.unit(unit)
    tensors = {n: t * 3 for n, t in load_file(str(chunks / entry.path)).items()}
    data = bytes(encode_tensors(tensors))
    (chunks / entry.path).write_bytes(data)
    d = Digests.of(data)
    new = dataclasses.replace(entry, bytes=len(data), sha256=d.sha256, blake3=d.blake3)
    forged = dataclasses.replace(manifest, units=tuple(new if u.name == unit else u for u in manifest.units))
    (chunks / MANIFEST_FILE).write_bytes(forged.to_bytes())


@pytest.mark.parametrize("kind", ["ws", "dir"])
def test_signed_model_runs_for_a_trusting_client_with_parity(signed, reference, kind):
    chunks, _, pub, old = signed
    assert (chunks / SIGNATURE_FILE).stat().st_size == 64
    with (served(chunks) if kind == "ws" else contextlib.nullcontext(str(chunks))) as where:
        got = logits(where, trusted_keys=[str(old), str(pub)])  # several trusted keys at once
    torch.testing.assert_close(got, reference[1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["ws", "dir"])
def test_reweighted_unit_with_consistent_manifest_is_run_without_trust_and_refused_with_it(signed, reference, kind):
    chunks, _, pub, _ = signed
    forge(chunks)
    with (served(chunks) if kind == "ws" else contextlib.nullcontext(str(chunks))) as where:
        assert not torch.allclose(logits(where), reference[1], atol=1e-3)  # the attack works on a trusting client
        with pytest.raises(SignatureError, match="not signed by a trusted key"):
            logits(where, trusted_keys=[str(pub)])


def test_wrong_key_and_unsigned_model_are_refused_and_rotation_re_signs(signed, reference, tmp_path):
    chunks, key, pub, old = signed
    with served(chunks) as uri:
        with pytest.raises(SignatureError, match="not signed by a trusted key"):
            logits(uri, trusted_keys=[str(old)])
    (chunks / SIGNATURE_FILE).unlink()
    with served(chunks) as uri:
        with pytest.raises(SignatureError, match="is not signed"):
            logits(uri, trusted_keys=[str(pub)])
        torch.testing.assert_close(logits(uri), reference[1], rtol=0, atol=1e-5)  # no trust asked: still served
    assert cli(["sign", str(chunks), "--key", str(tmp_path / "old"), "-q"]) == 0  # rotate back to "old"
    with served(chunks) as uri:
        torch.testing.assert_close(logits(uri, trusted_keys=[str(old)]), reference[1], rtol=0, atol=1e-5)


def test_manifest_sha256_pins_one_manifest_and_env_supplies_trusted_keys(signed, reference, monkeypatch):
    chunks, _, pub, old = signed
    pin = hashlib.sha256((chunks / MANIFEST_FILE).read_bytes()).hexdigest()
    torch.testing.assert_close(logits(str(chunks), manifest_sha256=pin), reference[1], rtol=0, atol=1e-5)
    with pytest.raises(SignatureError, match="pins"):
        logits(str(chunks), manifest_sha256="0" * 64)
    monkeypatch.setenv("SURFING_TRUSTED_KEYS", f"{old}")
    with pytest.raises(SignatureError):
        logits(str(chunks))
    monkeypatch.setenv("SURFING_TRUSTED_KEYS", f"{old},{pub}")
    torch.testing.assert_close(logits(str(chunks)), reference[1], rtol=0, atol=1e-5)


def test_cli_trust_key_on_a_client_command(signed, capsys):
    chunks, _, pub, old = signed
    with served(chunks) as uri:
        assert cli(["inspect", uri, "--trust-key", str(pub)]) == 0
        assert "llama" in capsys.readouterr().out
        assert cli(["inspect", uri, "--trust-key", str(old)]) == 2
        assert "not signed by a trusted key" in capsys.readouterr().err


def test_trust_cannot_be_asked_of_a_source_that_never_sees_manifest_bytes(signed):
    from streaming_weights.testing import FakeSource

    chunks, _, pub, _ = signed
    with pytest.raises(ConfigurationError, match="cannot verify manifest signatures"):
        open_unit_source(FakeSource(chunks_dir=str(chunks)), trusted_keys=[str(pub)])


@pytest.mark.s3
def test_signing_an_s3_model_and_verifying_it_from_s3(signed, reference, s3_server, s3_bucket, monkeypatch):
    chunks, key, pub, _ = signed
    (chunks / SIGNATURE_FILE).unlink()
    backend = s3_server.backend(s3_bucket)

    async def upload():
        for path in sorted(p for p in chunks.rglob("*") if p.is_file()):
            await backend.save(f"models/llama/{path.relative_to(chunks).as_posix()}", path.read_bytes())
        await backend.close()

    asyncio.run(upload())
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    location = f"s3://{s3_bucket}/models/llama"
    assert cli(["sign", location, "--key", str(key), "-q"]) == 0
    torch.testing.assert_close(logits(location, trusted_keys=[str(pub)]), reference[1], rtol=0, atol=1e-5)
    forged = chunks.parent / "forged"
    shutil.copytree(chunks, forged)
    forge(forged)

    async def tamper():
        b = s3_server.backend(s3_bucket)
        for rel in (MANIFEST_FILE, "units/model.layers.0.safetensors"):
            await b.save(f"models/llama/{rel}", (forged / rel).read_bytes())
        await b.close()

    asyncio.run(tamper())
    with pytest.raises(SignatureError):
        logits(location, trusted_keys=[str(pub)])


def _terabyte_manifest(chunks: Path) -> bytes:
    import json

    obj = json.loads((chunks / MANIFEST_FILE).read_bytes())
    obj["units"][1]["bytes"] = 1 << 40
    return json.dumps(obj).encode()


def test_a_terabyte_unit_manifest_is_refused_with_a_specific_error_everywhere(signed):
    """A directory source and a server refuse it at once; a client fed it by a hostile server refuses it too."""
    from streaming_weights.client.transport import WebSocketSource
    from streaming_weights.exceptions import ManifestLimitError
    from streaming_weights.server import WeightServer

    chunks, _, _, _ = signed
    hostile = _terabyte_manifest(chunks)

    async def from_a_hostile_server():
        async with WeightServer(str(chunks), port=0) as server:
            server.models["llama"].manifest_bytes = hostile  # what a compromised server would send
            async with WebSocketSource(server.uri) as source:
                await source.get_manifest("llama")

    with pytest.raises(ManifestLimitError, match="1099511627776 bytes"):
        asyncio.run(from_a_hostile_server())
    (chunks / MANIFEST_FILE).write_bytes(hostile)
    with pytest.raises(ManifestLimitError, match="1099511627776 bytes"):
        logits(str(chunks))
    with pytest.raises(ManifestLimitError, match="limit"):
        asyncio.run(WeightServer(str(chunks), port=0).start())
