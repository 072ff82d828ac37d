"""Compatibility: the checkpoint readers moved to :mod:`streaming_weights.chunker.readers`."""

from __future__ import annotations

from .chunker.readers import (  # noqa: F401  (compatibility re-exports)
    TOKENIZER_FILES, BinSource, GGUFSource, SafetensorsSource, Source, anon_buffer, default_model_name, open_source,
)
