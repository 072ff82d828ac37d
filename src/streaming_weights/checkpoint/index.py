"""The index a served-as-is checkpoint keeps outside its folder: the manifest (with every unit's hashes), the
fingerprint of the checkpoint files it was computed from, and the manifest's signature.

Layout of one folder's index directory (``<index root>/<sha256 of the folder's resolved path>[:24]/``)::

    index.json          {"folder": path, "options": {...}, "fingerprint": {file: [size, mtime_ns, sha256]},
                         "ranges": {unit: the pieces of a unit read by range, or null}}
    manifest.json       the manifest served for the folder, byte for byte
    manifest.json.sig   a detached signature over manifest.json (``surfing sign FOLDER``), if any

A safetensors file's fingerprint hashes its header (tensor names, dtypes, shapes, byte ranges) and records
size and mtime (``mtime_ns``): its data is never read for it. Other files (config, tokenizer) are small and
hashed whole. The index is valid only while every file's fingerprint is unchanged; anything else (a
file added, removed, rewritten or touched) makes the checkpoint be indexed again, never served against a
stale hash. Files are written atomically (temporary file, then rename), so servers sharing an index
directory read a whole index or none.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from ..config import cache_dir_from_env
from ..exceptions import CheckpointError
from ..format.names import MANIFEST_FILE, SIGNATURE_FILE

INDEX_FILE = "index.json"
#: bumped when the way units are produced changes (an old index then re-indexes)
INDEX_VERSION = 1
_MAX_HEADER = 100 << 20


def default_index_root() -> Path:
    """``<cache dir>/index`` (:func:`~streaming_weights.config.cache_dir_from_env`)."""
    return Path(cache_dir_from_env()) / "index"


def index_dir_for(folder: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> Path:
    """The index directory of checkpoint ``folder`` (a local path, resolved; or a storage location such as
    ``s3://bucket/prefix``) under ``root`` (default :func:`default_index_root`)."""
    where = str(folder) if str(folder).startswith("s3://") else str(Path(folder).resolve())
    key = hashlib.sha256(where.encode()).hexdigest()[:24]
    return Path(root if root is not None else default_index_root()).expanduser() / key


def file_print(path: Path) -> list[Any]:
    """``[size, mtime_ns, sha256]`` of one checkpoint file: a safetensors file's header hash, another file's
    content hash.

    Raises:
        CheckpointError: the file cannot be read, or a safetensors header runs past the file.
    """
    try:
        st = path.stat()
        with open(path, "rb") as fh:
            if path.suffix != ".safetensors":
                return [st.st_size, st.st_mtime_ns, hashlib.sha256(fh.read()).hexdigest()]
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 0 or n > min(_MAX_HEADER, st.st_size - 8):
                raise CheckpointError(f"{path} is not a safetensors file (its header length runs past the file: "
                                    "truncated or corrupted); re-download or re-save the checkpoint")
            return [st.st_size, st.st_mtime_ns, hashlib.sha256(head + fh.read(n)).hexdigest()]
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint file {path}: {exc}") from exc


def fingerprint(folder: Path, names: list[str]) -> dict[str, list[Any]]:
    """``{file name: file_print}`` of ``names`` (relative to ``folder``)."""
    return {name: file_print(folder / name) for name in sorted(names)}


def stat_print(folder: Path, names: list[str]) -> dict[str, tuple[int, int]]:
    """``{file name: (size, mtime_ns)}``: the cheap check made before every read."""
    out = {}
    for name in names:
        try:
            st = (folder / name).stat()
        except OSError:
            out[name] = (-1, -1)
        else:
            out[name] = (st.st_size, st.st_mtime_ns)
    return out


def read_index(where: Path, folder: str, options: dict[str, Any],
               prints: dict[str, list[Any]]) -> tuple[bytes, dict[str, Any]] | None:
    """``(manifest bytes, ranges)`` indexed in ``where`` for ``folder``, if that index was made with ``options``
    from files whose fingerprints are ``prints``; ``None`` otherwise (no index, another folder, stale).
    ``ranges``: ``{unit: [[offset, length, header hex | [file, file offset]], ...] or None}`` as saved."""
    try:
        meta = json.loads((where / INDEX_FILE).read_text())
        data = (where / MANIFEST_FILE).read_bytes()
    except (OSError, ValueError):
        return None
    if (not isinstance(meta, dict) or meta.get("version") != INDEX_VERSION or meta.get("folder") != str(folder)
            or meta.get("options") != options or meta.get("fingerprint") != prints
            or meta.get("manifest_sha256") != hashlib.sha256(data).hexdigest()):
        return None
    ranges = meta.get("ranges")
    return data, ranges if isinstance(ranges, dict) else {}


def write_index(where: Path, folder: str, options: dict[str, Any], prints: dict[str, list[Any]],
                manifest: bytes, ranges: dict[str, Any] | None = None) -> None:
    """Save a new index (any older signature is removed first: it signed another manifest). ``ranges``: what
    :func:`read_index` returns with it (the units read by range need no plan on a later start).

    Raises:
        CheckpointError: the index directory cannot be written (name another with ``--index-dir``).
    """
    meta = {"version": INDEX_VERSION, "folder": str(folder), "options": options, "fingerprint": prints,
            "manifest_sha256": hashlib.sha256(manifest).hexdigest(), "ranges": ranges or {}}
    try:
        where.mkdir(parents=True, exist_ok=True)
        old = where / MANIFEST_FILE
        if not old.is_file() or old.read_bytes() != manifest:
            (where / SIGNATURE_FILE).unlink(missing_ok=True)
        save_atomic(where / MANIFEST_FILE, manifest)
        save_atomic(where / INDEX_FILE, json.dumps(meta, indent=1, sort_keys=True).encode())
    except OSError as exc:
        raise CheckpointError(f"cannot write the checkpoint index in {where}: {exc}; pass another --index-dir (or set "
                              "$SURFING_CACHE_DIR)") from exc


def save_atomic(path: Path, data: bytes | bytearray | memoryview) -> None:
    """Write ``path`` through a temporary file in its directory, renamed over it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


__all__ = ["INDEX_FILE", "INDEX_VERSION", "default_index_root", "file_print", "fingerprint", "index_dir_for",
           "read_index", "save_atomic", "stat_print", "write_index"]
