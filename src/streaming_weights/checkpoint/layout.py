"""Which folders are Hugging Face checkpoints to serve as they are, and which of their files count.

Light on purpose (no torch): storage listings are checked with it on every rescan.
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path

from ..format.names import MANIFEST_FILE

CONFIG_FILE = "config.json"
#: files larger than this that are not safetensors (other weight formats) are not part of the served model
_MAX_AUX_BYTES = 64 << 20
OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".gguf", ".h5", ".msgpack", ".onnx", ".ot")


def checkpoint_prefixes(keys: list[str]) -> list[str]:
    """The folders (key prefixes, ``""`` for the root) of a listing that hold a ``config.json`` and at least
    one ``*.safetensors`` file directly, and no ``manifest.json`` (a chunked model stays a chunked model)."""
    configs, weights, manifests = set(), set(), set()
    for key in keys:
        folder, name = posixpath.split(key)
        if name == CONFIG_FILE:
            configs.add(folder)
        elif name.endswith(".safetensors"):
            weights.add(folder)
        elif name == MANIFEST_FILE:
            manifests.add(folder)
    chunked = {f for f in manifests}
    found = (configs & weights) - chunked
    # a chunked model's units/ folder never holds a config.json; a checkpoint inside a checkpoint is not one
    return sorted(f for f in found if not any(f.startswith(p + "/") for p in found | chunked if p and p != f))


def checkpoint_files(folder: Path) -> list[str]:
    """The files of checkpoint ``folder`` its served model depends on (relative names): every file directly in
    it but other weight formats and large unrelated files, plus the ``config.json`` of its sub-folders
    (sentence-transformers modules)."""
    out = []
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_file():
            if entry.name.endswith(".safetensors"):
                out.append(entry.name)
            elif not entry.name.endswith(OTHER_WEIGHTS) and entry.stat().st_size <= _MAX_AUX_BYTES:
                out.append(entry.name)
        elif entry.is_dir() and (Path(entry.path) / CONFIG_FILE).is_file():
            out.append(f"{entry.name}/{CONFIG_FILE}")
    return out


__all__ = ["CONFIG_FILE", "OTHER_WEIGHTS", "checkpoint_files", "checkpoint_prefixes"]
