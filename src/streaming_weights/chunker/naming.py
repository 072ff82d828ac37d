"""The name and source id the chunker records for a checkpoint (the rule is documented in the README's
"Command line" section and docs/format.md).

* ``source_id``: the hub id as given, or the absolute, resolved path of a local source. Clients may name a
  model by it (the original API chunks and streams with the same ``model_name``).
* ``default_model_name``: the source's base name, made into what a user would call the model: a ``.gguf``
  file's stem without its quantization tag (``SmolLM2-135M-Instruct.Q4_1.gguf`` ->
  ``SmolLM2-135M-Instruct``; the tagged stem still names it, as an alias); a ``.safetensors`` file's folder;
  and for a folder with a generic name (``model``, ``checkpoint``, ``snapshots/<hash>`` …) the model card's
  title (a README.md ``# Name`` heading that is a plain name), the ``models--org--NAME`` folder of a
  Hugging Face cache, or else the parent folder's name.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..format.modelnames import strip_quant_suffix

#: Folder names that say nothing about the model inside them.
GENERIC_FOLDERS = frozenset({"model", "models", "checkpoint", "checkpoints", "weights", "hf", "main", "snapshots",
                             "export", "final", "output", "pretrained", "transformers", "safetensors"})
_HASH = re.compile(r"^[0-9a-f]{12,64}$")  # a hub snapshot folder (commit hash)
_PLAIN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}$")


def source_id(source: str | os.PathLike[str]) -> str:
    """What a manifest records as its ``source``: the absolute, resolved path of an existing local source,
    else the text as given (a hub id), without a trailing ``/``."""
    path = Path(source).expanduser()
    if path.exists():
        return str(path.resolve())
    return str(source).rstrip("/") or str(source)


def default_model_name(source: str | os.PathLike[str]) -> str:
    """The name a model chunked from ``source`` gets when none is given (see the module docstring).

    ``./models/llama/`` -> ``llama`` (resolved, so ``.`` names the current folder); ``org/name`` -> ``name``;
    ``SmolLM2-135M-Instruct.Q4_1.gguf`` -> ``SmolLM2-135M-Instruct``; ``all-MiniLM-L6-v2/model.safetensors``
    -> ``all-MiniLM-L6-v2``; ``pkg/model/`` (a generic folder) -> its model card's title, else ``pkg``.
    """
    path = Path(source).expanduser()
    exists = path.exists()
    if exists:
        path = path.resolve()
        if path.is_file() and path.suffix != ".gguf":
            path = path.parent  # a weights file only holds its folder's model
    if path.suffix == ".gguf":
        return strip_quant_suffix(path.stem)
    if path.suffix == ".safetensors":  # a weights file that is not there (yet): its own stem
        return path.stem
    return (_folder_name(path) if exists else path.name) or str(source)


def _folder_name(path: Path) -> str:
    if not _generic(path.name):
        return path.name
    title = _card_title(path / "README.md")
    if title:
        return title
    for part in reversed(path.parts[:-1]):
        if part.startswith("models--") and part.count("--") >= 2:  # the hub cache: models--org--name
            return part.rsplit("--", 1)[-1]
        if not _generic(part):
            return part
    return path.name or str(path)


def _generic(name: str) -> bool:
    return name.lower() in GENERIC_FOLDERS or bool(_HASH.match(name))


def _card_title(readme: Path) -> str | None:
    """The first ``# Title`` of a model card (after its front matter) when it is a plain model name."""
    try:
        with open(readme, encoding="utf-8", errors="replace") as fh:
            head = fh.read(64 * 1024)
    except OSError:
        return None
    lines = head.splitlines()
    if lines and lines[0].strip() == "---":  # YAML front matter: its '#' lines are comments
        end = next((i for i, ln in enumerate(lines[1:], 1) if ln.strip() == "---"), len(lines))
        lines = lines[end + 1:]
    for line in lines:
        if line.startswith("# "):
            title = line[2:].strip()
            return title if _PLAIN.match(title) and ".." not in title else None
    return None


__all__ = ["GENERIC_FOLDERS", "default_model_name", "source_id"]
