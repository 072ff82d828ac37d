"""Model names: what a chunked model is called, and which other spellings name it.

A manifest has one ``name`` (``--name``, else the chunker's default) and records its ``source``: the hub
id or the absolute local path it was chunked from. A client may name the model by either, or by a base
name (the last component of a path or hub id), so the ``model_name`` that chunked a model also reaches it.
These are pure string rules; :func:`~streaming_weights.storage.catalog.pick_model` applies them.
"""

from __future__ import annotations

import re

#: A GGUF file's quantization suffix: ``.Q4_1``, ``-Q4_K_M``, ``.IQ3_XS``, ``-f16``, ``.bf16``, ``-q8_0``…
QUANT_SUFFIX = re.compile(r"[.\-_](?:I?Q\d+(?:_[A-Z0-9]+)*|F16|F32|BF16|FP16|FP32)$", re.IGNORECASE)
#: Extensions a checkpoint file's name drops to give its base name.
WEIGHT_EXTENSIONS = (".gguf", ".safetensors", ".bin")


def strip_quant_suffix(name: str) -> str:
    """``name`` without a trailing GGUF quantization tag (``SmolLM2-135M-Instruct.Q4_1`` ->
    ``SmolLM2-135M-Instruct``); unchanged when it has none or is only a tag."""
    stripped = QUANT_SUFFIX.sub("", name)
    return stripped or name


def base_names(text: str) -> set[str]:
    """The base names of a path or hub id: its last component, and that without a weight file's extension
    (``/m/SmolLM2-135M-Instruct.Q4_1.gguf`` -> ``SmolLM2-135M-Instruct.Q4_1.gguf``, ``…Q4_1``;
    ``org/name`` -> ``name``). Empty for an empty text."""
    last = text.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    if not last:
        return set()
    out = {last}
    for ext in WEIGHT_EXTENSIONS:
        if last.endswith(ext) and len(last) > len(ext):
            out.add(last[: -len(ext)])
    return out


def aliases(name: str, source: str) -> set[str]:
    """The base names that may name a model called ``name`` chunked from ``source`` (a hub id, an absolute
    path, or in manifests written before source ids, a base name): its name with and without a
    quantization tag, and the source's base names."""
    out = {name, strip_quant_suffix(name)} | base_names(source)
    return out | {strip_quant_suffix(a) for a in base_names(source)}


def requested_bases(requested: str) -> set[str]:
    """The base names a requested model name may stand for (itself, when it is not a path)."""
    return base_names(requested) | {requested}


__all__ = ["QUANT_SUFFIX", "WEIGHT_EXTENSIONS", "aliases", "base_names", "requested_bases", "strip_quant_suffix"]
