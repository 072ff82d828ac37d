"""Streaming models: transformers' own classes on ``meta`` with hooks that stream each block's weights.

Public surface: :class:`StreamingBaseModel` (any mappable architecture), :class:`StreamingLlamaModel`,
:class:`StreamingBertModel`, :class:`StreamingT5Model`, :class:`StreamingGPTModel`.

Modules: :mod:`.base` (the facade: options, explicit loading, sync/async API, stats, lifecycle),
:mod:`.engine` (I/O thread, retrying source, unit cache, bindings, counters), :mod:`.loader` (meta
model, resident parts, ties, tokenizer), :mod:`.hooks` (the one tensor-assign path), :mod:`.architecture`
(which modules stream), :mod:`.families` (the seed-named classes).
"""

from .base import StreamingBaseModel
from .families import StreamingBertModel, StreamingGPTModel, StreamingLlamaModel, StreamingT5Model

__all__ = ["StreamingBaseModel", "StreamingBertModel", "StreamingGPTModel", "StreamingLlamaModel", "StreamingT5Model"]
