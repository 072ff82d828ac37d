"""Streaming models: transformers' own classes on ``meta`` with hooks that stream each block's weights.

Public surface: :class:`StreamingBaseModel` (any mappable architecture), :class:`StreamingLlamaModel`,
:class:`StreamingBertModel`, :class:`StreamingT5Model`, :class:`StreamingGPTModel`.
"""

from .base import StreamingBaseModel
from .families import StreamingBertModel, StreamingGPTModel, StreamingLlamaModel, StreamingT5Model

__all__ = ["StreamingBaseModel", "StreamingBertModel", "StreamingGPTModel", "StreamingLlamaModel", "StreamingT5Model"]
