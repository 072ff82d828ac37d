"""A multi-turn chat over one streaming model that keeps the model's KV cache across turns.

Each turn re-renders the whole conversation with the tokenizer's chat template (so the prompt is exactly
what the template says), then reuses the cached keys/values of the longest prefix that matches the tokens
already computed: earlier turns are not recomputed and their layers are not fetched again for them.
The cache is cropped to that prefix first, so a template that renders an earlier answer differently from
the generated tokens costs a little recomputation, never a wrong cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .exceptions import ConfigurationError
from .models.text import chat_ids


def common_prefix_length(a: Any, b: Any) -> int:
    """Length of the common prefix of two 1-D token id tensors."""
    n = min(int(a.shape[-1]), int(b.shape[-1]))
    if n == 0:
        return 0
    diff = (a[:n] != b[:n]).nonzero()
    return int(diff[0, 0]) if diff.numel() else n


def crop_cache(cache: Any, keep: int) -> bool:
    """Cut ``cache`` down to its first ``keep`` tokens; False when it cannot be (then start a fresh cache).

    transformers 5 ``DynamicCache.crop(n)`` takes a *negative* count of tokens to remove (a positive value,
    the 4.x "new length", raises); a negative count also meant "remove that many" in 4.x, so this call is
    right on both. Layers that cannot roll back (a sliding window already full, recurrent state) refuse,
    and a cache that does not end up exactly ``keep`` long is not trusted.
    """
    held = int(cache.get_seq_length())
    if held < keep:
        return False
    if held > keep:
        try:
            cache.crop(keep - held)
        except (ValueError, RuntimeError, NotImplementedError):
            return False
    return int(cache.get_seq_length()) == keep


@dataclass
class TurnStats:
    """What one turn cost: prompt tokens taken from the KV cache vs computed, tokens generated."""

    reused_tokens: int
    computed_tokens: int
    generated_tokens: int


@dataclass
class ChatSession:
    """Chat with ``model`` (a streaming model or any transformers-style model with ``tokenizer``/``generate``).

    Args:
        model: has ``.tokenizer`` (with a chat template) and ``.generate(**kwargs)``.
        system: optional system message, sent first.
        max_new_tokens: per answer (>= 1).

    Raises:
        ConfigurationError: the model has no tokenizer or its tokenizer has no chat template.
    """

    model: Any
    system: str | None = None
    max_new_tokens: int = 256
    messages: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        from transformers import DynamicCache

        tok = self.model.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise ConfigurationError("chat needs a model whose tokenizer has a chat template")
        if self.max_new_tokens < 1:
            raise ConfigurationError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.system:
            self.messages.append({"role": "system", "content": self.system})
        self._cache = DynamicCache()
        self._cached_ids: Any = None

    def _reusable(self, ids: Any) -> int:
        """Crop the KV cache to the prefix it shares with ``ids``; returns how many tokens it still holds."""
        from transformers import DynamicCache

        reuse = 0 if self._cached_ids is None else common_prefix_length(self._cached_ids, ids)
        reuse = min(reuse, int(ids.shape[-1]) - 1)  # generate needs at least one token to compute
        if reuse > 0 and crop_cache(self._cache, reuse):
            return reuse
        self._cache = DynamicCache()
        return 0

    def reply(self, text: str, *, streamer: Any = None) -> tuple[str, TurnStats]:
        """Add a user message, generate the answer greedily (streamed to ``streamer``), return it.

        A turn that raises (an interrupted generate, a conversation grown past the model's context) leaves the
        session as it was before the turn: the user message is taken back and the next turn starts a fresh
        KV cache.
        """
        import torch

        tok = self.model.tokenizer
        self.messages.append({"role": "user", "content": text})
        try:
            ids = torch.tensor([chat_ids(tok, self.messages)])
            reuse = self._reusable(ids[0])
            self._cached_ids = None  # until this turn completes, the cache's contents are not known
            # `cache=` is transformers 5's name for the KV cache argument (`past_key_values=` is deprecated)
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), cache=self._cache,
                                      max_new_tokens=self.max_new_tokens, do_sample=False, streamer=streamer)
        except BaseException:
            self.messages.pop()
            raise
        seq = out[0]
        answer = tok.decode(seq[ids.shape[-1]:], skip_special_tokens=True)
        self._cached_ids = seq[: self._cache.get_seq_length()]
        self.messages.append({"role": "assistant", "content": answer})
        return answer, TurnStats(reuse, int(ids.shape[-1]) - reuse, int(seq.shape[-1] - ids.shape[-1]))


__all__ = ["ChatSession", "TurnStats", "common_prefix_length", "crop_cache"]
