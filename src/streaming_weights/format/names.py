"""Unit names and storage keys.

A unit is named after the module path it holds (``model.layers.3``); the resident unit is ``resident``;
a row shard after its tensor and rows (``model.embed_tokens.weight.rows-0-4096``); an expert unit after
its experts module and expert index (``model.layers.3.mlp.experts.5``).
Names are restricted so that a unit name can never turn into a path outside the model directory.
"""

from __future__ import annotations

import re

from ..exceptions import ManifestError

RESIDENT_UNIT = "resident"
MANIFEST_FILE = "manifest.json"
#: Detached Ed25519 signature over the exact bytes of ``manifest.json`` (see format.signing).
SIGNATURE_FILE = MANIFEST_FILE + ".sig"
UNITS_DIR = "units"
FILES_DIR = "files"

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}$")


def check_name(name: str, what: str = "unit name") -> str:
    """Return ``name`` if it is a safe unit/file name, else raise ManifestError."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name:
        raise ManifestError(f"invalid {what} {name!r}: use letters, digits, '_', '-', '.' (no '..')")
    return name


def shard_unit_name(tensor: str, start: int, stop: int) -> str:
    """The name of the shard unit holding rows ``[start, stop)`` of ``tensor``: ``TENSOR.rows-START-STOP``."""
    return check_name(f"{tensor}.rows-{start}-{stop}")


def expert_unit_name(module: str, start: int, stop: int) -> str:
    """The name of the unit holding experts ``[start, stop)`` of the experts module at path ``module``:
    ``MODULE.START`` for one expert (``model.layers.3.mlp.experts.5``), ``MODULE.START-LAST`` for several."""
    return check_name(f"{module}.{start}" if stop == start + 1 else f"{module}.{start}-{stop - 1}")


def unit_path(name: str) -> str:
    """Relative path of a unit's file inside a model directory."""
    return f"{UNITS_DIR}/{check_name(name)}.safetensors"


def file_path(name: str) -> str:
    """Relative path of an auxiliary (tokenizer/generation config) file inside a model directory."""
    return f"{FILES_DIR}/{check_name(name, 'file name')}"


def join_key(prefix: str, rel: str) -> str:
    prefix = prefix.strip("/")
    return f"{prefix}/{rel}" if prefix else rel
