"""Surfing Weights: run transformer models larger than memory by streaming their weights.

Public surface (names from the original project's docs):

* chunking: :class:`ModelChunker`
* storage: :class:`StorageBackend`, :class:`FilesystemBackend`, :class:`MemoryBackend`, :class:`S3Backend`
* serving: :class:`WeightServer`, :class:`AdvancedWeightServer`
* models: :class:`StreamingBaseModel`, :class:`StreamingLlamaModel`, :class:`StreamingBertModel`,
  :class:`StreamingT5Model`, :class:`StreamingGPTModel`
* options and metrics: :class:`StreamingConfig`, :class:`StreamingMonitor`
* errors: :mod:`streaming_weights.exceptions`
* test doubles: :class:`streaming_weights.testing.FakeSource` (a unit source answered by a function)

Heavy submodules are imported on first use.
"""

from __future__ import annotations

import importlib

from .config import StreamingConfig
from .exceptions import *  # noqa: F401,F403

__version__ = "0.1.0"

_LAZY = {
    "ModelChunker": ".chunker",
    "StorageBackend": ".storage",
    "FilesystemBackend": ".storage",
    "MemoryBackend": ".storage",
    "S3Backend": ".storage.s3",
    "WeightServer": ".server",
    "AdvancedWeightServer": ".server",
    "StreamingBaseModel": ".models",
    "StreamingLlamaModel": ".models",
    "StreamingBertModel": ".models",
    "StreamingT5Model": ".models",
    "StreamingGPTModel": ".models",
    "StreamingMonitor": ".monitoring",
    "Manifest": ".format",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'streaming_weights' has no attribute {name!r}")


__all__ = ["StreamingConfig", "__version__", *_LAZY]
