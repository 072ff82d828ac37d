"""Ed25519 keys, detached manifest signatures and the client's trust policy (format.signing)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat

import pytest
from cryptography.hazmat.primitives import serialization

from streaming_weights.exceptions import ConfigurationError, SecurityError, SignatureError
from streaming_weights.format import MANIFEST_FILE, Manifest
from streaming_weights.format.signing import (
    SIGNATURE_FILE,
    TrustPolicy,
    key_id,
    load_private_key,
    load_public_key,
    read_signed_manifest,
    sign_model,
    write_keypair,
)
from streaming_weights.storage import MemoryBackend

from tests.support.servers import build_model


@pytest.fixture
def keys(tmp_path):
    """Two key pairs: (private path, public path) each."""
    return write_keypair(tmp_path / "old"), write_keypair(tmp_path / "new")


@pytest.fixture
def signed(keys):
    """A model in memory signed with the first key: (storage, manifest bytes, signature bytes)."""
    storage = MemoryBackend()
    build_model(storage, "m", {"resident": 1000, "model.layers.0": 4000})
    asyncio.run(sign_model(storage, "", load_private_key(keys[0][0])))
    data, sig = asyncio.run(read_signed_manifest(storage, ""))
    return storage, data, sig


def test_keygen_writes_a_private_pem_readable_only_by_its_owner_and_a_public_pem(tmp_path):
    private, public = write_keypair(tmp_path / "k")
    assert public == tmp_path / "k.pub"
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600
    assert private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert key_id(load_private_key(private).public_key()) == key_id(load_public_key(public))
    with pytest.raises(ConfigurationError, match="already exists"):
        write_keypair(tmp_path / "k")
    before = key_id(load_public_key(public))
    write_keypair(tmp_path / "k", force=True)  # an explicit overwrite makes a new pair
    assert key_id(load_public_key(public)) == key_id(load_private_key(private).public_key()) != before


def test_signature_is_raw_64_bytes_over_the_exact_stored_manifest(signed, keys):
    storage, data, sig = signed
    assert len(sig) == 64  # raw bytes: hex would be 128, base64 88
    load_public_key(keys[0][1]).verify(sig, data)  # cryptography's own check over the stored bytes
    assert asyncio.run(storage.exists(SIGNATURE_FILE))


def test_trusted_key_accepts_and_every_tampering_is_refused(signed, keys):
    _, data, sig = signed
    policy = TrustPolicy.from_options([keys[0][1]])
    policy.check(data, sig, "here")
    changed = data.replace(b'"name": "m"', b'"name": "n"')
    assert changed != data
    with pytest.raises(SignatureError, match="not signed by a trusted key"):
        policy.check(changed, sig, "here")
    with pytest.raises(SignatureError, match="not signed"):
        policy.check(data, None, "here")
    with pytest.raises(SignatureError, match="64-byte"):
        policy.check(data, sig.hex().encode(), "here")  # a hex signature is not accepted
    assert issubclass(SignatureError, SecurityError)


def test_wrong_key_refused_and_several_trusted_keys_allow_rotation(signed, keys):
    storage, data, sig = signed
    (old_priv, old_pub), (new_priv, new_pub) = keys
    with pytest.raises(SignatureError, match=key_id(load_public_key(new_pub))):
        TrustPolicy.from_options([new_pub]).check(data, sig, "here")
    both = TrustPolicy.from_options([new_pub, old_pub])
    both.check(data, sig, "here")
    asyncio.run(sign_model(storage, "", load_private_key(new_priv)))  # re-sign with the new key
    data2, sig2 = asyncio.run(read_signed_manifest(storage, ""))
    assert data2 == data and sig2 != sig
    both.check(data2, sig2, "here")
    TrustPolicy.from_options([new_pub]).check(data2, sig2, "here")
    with pytest.raises(SignatureError):
        TrustPolicy.from_options([old_pub]).check(data2, sig2, "here")  # the retired key no longer verifies


def test_manifest_sha256_pins_one_exact_manifest(signed):
    _, data, _ = signed
    pin = hashlib.sha256(data).hexdigest()
    TrustPolicy.from_options(manifest_sha256=pin.upper()).check(data, None, "here")
    with pytest.raises(SignatureError, match="pins"):
        TrustPolicy.from_options(manifest_sha256=pin).check(data + b" ", None, "here")
    with pytest.raises(ConfigurationError, match="64 hex"):
        TrustPolicy.from_options(manifest_sha256="abc")
    assert TrustPolicy.from_options() is None and TrustPolicy.from_options([], None) is None


def test_public_keys_load_from_pem_openssh_or_raw_bytes_and_bad_files_are_configuration_errors(tmp_path, keys):
    key = load_public_key(keys[0][1])
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    ssh = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    (tmp_path / "raw").write_bytes(raw)
    (tmp_path / "ssh").write_bytes(ssh + b" me@host\n")
    assert {key_id(load_public_key(tmp_path / n)) for n in ("raw", "ssh")} == {key_id(key)}
    (tmp_path / "junk").write_bytes(b"not a key")
    with pytest.raises(ConfigurationError, match="not an Ed25519 public key"):
        load_public_key(tmp_path / "junk")
    with pytest.raises(ConfigurationError, match="cannot read trusted key"):
        TrustPolicy.from_options([tmp_path / "missing.pub"])
    with pytest.raises(ConfigurationError, match="private key"):
        load_private_key(keys[0][1])  # a public key is not a signing key


def test_sign_refuses_a_directory_without_a_manifest_and_a_malformed_manifest(keys):
    storage = MemoryBackend()
    key = load_private_key(keys[0][0])
    with pytest.raises(ConfigurationError, match=f"no {MANIFEST_FILE}"):
        asyncio.run(sign_model(storage, "", key))
    asyncio.run(storage.save(MANIFEST_FILE, b"{}"))
    with pytest.raises(Exception, match="format_version"):
        asyncio.run(sign_model(storage, "", key))
    assert not asyncio.run(storage.exists(SIGNATURE_FILE))  # nothing signed


def test_the_real_attack_reweighted_unit_with_a_consistently_rehashed_manifest_is_refused(signed, keys):
    """Change a unit's weights, recompute its hashes in the manifest (a fully consistent model), keep the
    old signature: the unit hashes all match, only the signature catches it."""
    storage, data, sig = signed
    manifest = Manifest.from_bytes(data)
    forged = _reweighted(storage, manifest, "model.layers.0")
    assert forged.unit("model.layers.0").blake3 != manifest.unit("model.layers.0").blake3
    with pytest.raises(SignatureError):
        TrustPolicy.from_options([keys[0][1]]).check(forged.to_bytes(), sig, "here")


def _reweighted(storage, manifest: Manifest, unit: str) -> Manifest:
    """Write a different, valid unit ``unit`` and return the manifest re-hashed to match it."""
    import dataclasses

    from streaming_weights.format import Digests, encode_tensors

    from tests.support.servers import unit_tensors

    entry = manifest.unit(unit)
    tensors = unit_tensors(unit, entry.data_bytes, seed=99)
    data = bytes(encode_tensors(tensors))
    asyncio.run(storage.save(entry.path, data))
    d = Digests.of(data)
    new = dataclasses.replace(entry, bytes=len(data), sha256=d.sha256, blake3=d.blake3)
    units = tuple(new if u.name == unit else u for u in manifest.units)
    return dataclasses.replace(manifest, units=units)
