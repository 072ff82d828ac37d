"""Signed manifests: Ed25519 keys, detached signatures over the exact ``manifest.json`` bytes, trust checks.

A model directory may hold ``manifest.json.sig`` beside ``manifest.json``: the raw 64-byte Ed25519
signature of the manifest file's bytes, exactly as stored (never re-serialized, never hex). The manifest
carries every unit's and file's hash, so a valid signature vouches for the whole model. Keys are PEM files:
``KEY`` (PKCS#8 private key, mode 0600) and ``KEY.pub`` (SubjectPublicKeyInfo); a trusted key may also be
given as an OpenSSH ``ssh-ed25519`` line or the raw 32 public-key bytes.

Clients build a :class:`TrustPolicy` from ``trusted_keys`` (several at once: key rotation) and/or a
``manifest_sha256`` pin, and call :meth:`TrustPolicy.check` on the raw bytes before parsing them.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Union

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..exceptions import ConfigurationError, KeyNotFoundError, SignatureError
from .manifest import Manifest
from .names import MANIFEST_FILE, SIGNATURE_FILE, join_key

if TYPE_CHECKING:
    from ..storage.base import StorageBackend

SIGNATURE_BYTES = 64
_RAW_PUBLIC_BYTES = 32
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")

KeySpec = Union[str, "os.PathLike[str]", Ed25519PublicKey]


def key_id(key: Ed25519PublicKey) -> str:
    """A short fingerprint for messages: the first 16 hex digits of SHA-256 over the raw public key."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair() -> tuple[bytes, bytes]:
    """A new Ed25519 key pair as (private PKCS#8 PEM, public SubjectPublicKeyInfo PEM)."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public


def write_keypair(out: str | os.PathLike[str], *, force: bool = False) -> tuple[Path, Path]:
    """Write a new key pair to ``out`` (private, created with mode 0600) and ``out.pub``; returns both paths.
    Missing parent directories are created (the last one with mode 0700: it holds a private key).

    Raises:
        ConfigurationError: either file exists (and not ``force``), or cannot be written.
    """
    private_path = Path(out)
    public_path = private_path.with_name(private_path.name + ".pub")
    if not force:
        for p in (private_path, public_path):
            if p.exists():
                raise ConfigurationError(f"{p} already exists; refusing to overwrite a key (choose another --out)")
    private, public = generate_keypair()
    try:
        private_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (0 if force else os.O_EXCL)
        fd = os.open(private_path, flags, 0o600)  # never world-readable, not even for a moment
        with os.fdopen(fd, "wb") as f:
            f.write(private)
        public_path.write_bytes(public)
    except OSError as exc:
        raise ConfigurationError(f"cannot write key pair {private_path}: {exc.strerror or exc}") from None
    return private_path, public_path


def _read(path: str | os.PathLike[str], what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read {what} {os.fspath(path)!r}: {exc.strerror or exc}") from None


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """The Ed25519 private key in PEM file ``path``. Raises ConfigurationError (unreadable, not Ed25519)."""
    data = _read(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(f"{os.fspath(path)!r} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigurationError(f"{os.fspath(path)!r} is a {type(key).__name__}, not an Ed25519 key")
    return key


def parse_public_key(data: bytes, where: str) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM, an OpenSSH ``ssh-ed25519`` line or 32 raw bytes."""
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(data)
        elif data.lstrip().startswith(b"ssh-ed25519"):
            key = serialization.load_ssh_public_key(data.strip())
        elif len(data) == _RAW_PUBLIC_BYTES:
            key = Ed25519PublicKey.from_public_bytes(data)
        else:
            raise ValueError("expected a PEM public key, an ssh-ed25519 line or 32 raw bytes")
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(f"{where} is not an Ed25519 public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigurationError(f"{where} is a {type(key).__name__}, not an Ed25519 public key")
    return key


def load_public_key(spec: KeySpec) -> Ed25519PublicKey:
    """A trusted key: a loaded key as is, or read from a file. Raises ConfigurationError."""
    if isinstance(spec, Ed25519PublicKey):
        return spec
    return parse_public_key(_read(spec, "trusted key"), repr(os.fspath(spec)))


def sign_bytes(data: bytes, key: Ed25519PrivateKey) -> bytes:
    """The raw 64-byte detached signature of ``data``."""
    return key.sign(bytes(data))


@dataclass(frozen=True)
class TrustPolicy:
    """What a client accepts: manifests signed by one of ``keys`` and/or with SHA-256 ``manifest_sha256``.

    Both conditions must hold when both are set. Build it with :meth:`from_options`.
    """

    keys: tuple[Ed25519PublicKey, ...] = ()
    manifest_sha256: str | None = None

    @classmethod
    def from_options(cls, trusted_keys: Iterable[KeySpec] | KeySpec | None = None,
                     manifest_sha256: str | None = None) -> TrustPolicy | None:
        """The policy for the client options, or None when neither is set (nothing is checked).

        Raises:
            ConfigurationError: a key file is unreadable or not Ed25519; the pin is not 64 hex digits.
        """
        if isinstance(trusted_keys, (str, os.PathLike, Ed25519PublicKey)):
            trusted_keys = [trusted_keys]
        keys = tuple(load_public_key(k) for k in (trusted_keys or ()))
        pin = manifest_sha256.strip().lower() if manifest_sha256 else None
        if pin is not None and not _SHA256_HEX.match(pin):
            raise ConfigurationError(f"manifest_sha256 must be 64 hex digits, got {manifest_sha256!r}")
        if not keys and pin is None:
            return None
        return cls(keys, pin)

    @property
    def wants_signature(self) -> bool:
        return bool(self.keys)

    def check(self, data: bytes | bytearray | memoryview, signature: bytes | None, where: str) -> None:
        """Accept the manifest bytes from ``where`` or raise :class:`SignatureError` (before they are parsed)."""
        data = bytes(data)
        if self.manifest_sha256 is not None:
            got = hashlib.sha256(data).hexdigest()
            if got != self.manifest_sha256:
                raise SignatureError(f"manifest from {where} has SHA-256 {got}, but manifest_sha256 pins "
                                     f"{self.manifest_sha256}")
        if not self.keys:
            return
        if signature is None:
            raise SignatureError(f"manifest from {where} is not signed ({SIGNATURE_FILE} missing) but trusted keys "
                                 "are configured; sign it with `surfing sign MODEL_DIR --key KEY`")
        if len(signature) != SIGNATURE_BYTES:
            raise SignatureError(f"{SIGNATURE_FILE} from {where} is {len(signature)} bytes, not a raw "
                                 f"{SIGNATURE_BYTES}-byte Ed25519 signature")
        for key in self.keys:
            try:
                key.verify(signature, data)
                return
            except InvalidSignature:
                continue
        ids = ", ".join(key_id(k) for k in self.keys)
        raise SignatureError(f"manifest from {where} is not signed by a trusted key (trusted: {ids}); it was "
                             "changed after signing, re-chunked without re-signing, or signed with another key")


# ----------------------------------------------------------------------------------------- storage
async def read_signed_manifest(storage: StorageBackend, prefix: str = "") -> tuple[bytes, bytes | None]:
    """The stored ``manifest.json`` bytes under ``prefix`` and its signature (None when unsigned).

    Raises:
        KeyNotFoundError: no manifest there.
    """
    data = await storage.load(join_key(prefix, MANIFEST_FILE))
    try:
        signature: bytes | None = await storage.load(join_key(prefix, SIGNATURE_FILE))
    except KeyNotFoundError:
        signature = None
    return data, signature


async def sign_model(storage: StorageBackend, prefix: str, key: Ed25519PrivateKey) -> Manifest:
    """Sign the manifest stored under ``prefix`` in place (replacing any older signature: key rotation).

    The manifest is parsed first, so only a valid manifest is ever signed. Returns it.

    Raises:
        ConfigurationError: no manifest under ``prefix``.
        ManifestError: the manifest is malformed.
    """
    try:
        data = await storage.load(join_key(prefix, MANIFEST_FILE))
    except KeyNotFoundError:
        raise ConfigurationError(f"no {MANIFEST_FILE} in {storage.location}/{prefix}".rstrip("/")) from None
    manifest = Manifest.from_bytes(data)
    await storage.save(join_key(prefix, SIGNATURE_FILE), sign_bytes(data, key))
    return manifest


__all__ = [
    "SIGNATURE_BYTES", "SIGNATURE_FILE", "TrustPolicy", "generate_keypair", "key_id", "load_private_key",
    "load_public_key", "parse_public_key", "read_signed_manifest", "sign_bytes", "sign_model", "write_keypair",
]
