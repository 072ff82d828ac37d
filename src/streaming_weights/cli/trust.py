"""``surfing keygen`` and ``surfing sign``: Ed25519 keys and signed manifests (``format.signing``).

Clients check the signature with ``--trust-key KEY.pub`` (on every command that streams a model).
"""

from __future__ import annotations

import argparse
import asyncio

from .options import add_common


def cmd_keygen(args: argparse.Namespace) -> int:
    from ..format.signing import key_id, load_public_key, write_keypair

    private, public = write_keypair(args.out, force=args.force)
    print(f"private key: {private} (keep it secret: it signs models)")
    print(f"public key:  {public} (give it to clients: --trust-key {public}); key id {key_id(load_public_key(public))}")
    return 0


async def _sign_all(location: str, key_path: str, index_dir: str | None = None) -> list[tuple[str, str]]:
    """Sign every model under ``location`` (a model directory, a directory of several, or s3://bucket/prefix).
    A Hugging Face checkpoint folder's signature goes beside its index (in ``index_dir``), never into it."""
    from ..exceptions import ConfigurationError
    from ..format.signing import load_private_key, sign_model
    from ..storage import open_storage
    from ..storage.catalog import discover_models

    key = load_private_key(key_path)
    if index_dir is not None:
        from ..checkpoint import open_checkpoints

        storage, prefix = open_checkpoints(location, index_root=index_dir), ""
    else:
        storage, prefix = open_storage(location)
    try:
        found = await discover_models(storage, prefix)
        if not found:
            raise ConfigurationError(f"no chunked model (manifest.json) under {location}")
        signed = []
        for name, (model_prefix, _) in sorted(found.items()):
            await sign_model(storage, model_prefix, key)
            beside_index = getattr(storage, "signature_location", lambda _p: None)(model_prefix)
            signed.append((name, beside_index or f"{storage.location}/{model_prefix}".rstrip("/")))
        return signed
    finally:
        await storage.close()


def cmd_sign(args: argparse.Namespace) -> int:
    from ..format.signing import SIGNATURE_FILE, key_id, load_private_key

    signed = asyncio.run(_sign_all(args.model_dir, args.key, args.index_dir))
    kid = key_id(load_private_key(args.key).public_key())
    for name, where in signed:
        print(f"signed {name}: {where}/{SIGNATURE_FILE} (key id {kid})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keygen", help="create an Ed25519 key pair for signing models (KEY and KEY.pub)")
    p.add_argument("--out", "-o", required=True, metavar="KEY", help="private key file; the public key goes to KEY.pub")
    p.add_argument("--force", action="store_true", help="overwrite existing key files")
    add_common(p)
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("sign", help="sign chunked model(s): writes manifest.json.sig beside each manifest (for a "
                       "checkpoint folder served as it is: beside its index, not into the folder)")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a chunked model directory, a Hugging Face checkpoint "
                   "folder, a directory of several, or s3://bucket/prefix")
    p.add_argument("--index-dir", default=None, metavar="DIR",
                   help="the index directory `surfing serve --index-dir` uses for checkpoint folders")
    p.add_argument("--key", "-k", required=True, metavar="KEY", help="private key from `surfing keygen`")
    add_common(p)
    p.set_defaults(func=cmd_sign)
