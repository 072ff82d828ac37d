"""Corpus embeddings with an encoder (BERT family) whose layers stream: one fetch per block of texts.

A forward pass fetches every streamed layer once, whatever the batch holds. So the texts are sorted by
length (little padding) and run in large blocks: with a cache smaller than the model, a corpus costs
about one fetch of the streamed layers per block instead of one per small batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..exceptions import ConfigurationError, ModelError

POOLINGS = ("mean", "cls", "max")
#: Padded tokens per block when the caller gives no ``batch_size`` (and no memory budget chooses):
#: 256 texts of up to 128 tokens, more when shorter. Attention memory grows with block x length^2,
#: so long texts get smaller blocks.
DEFAULT_BLOCK_TOKENS = 32768
#: A block never holds fewer texts than this when they fit the model (``batch_size=None``).
MIN_BLOCK_TEXTS = 128


def plan_blocks(lengths: Sequence[int], batch_size: int | None = None,
                block_tokens: int = DEFAULT_BLOCK_TOKENS) -> list[list[int]]:
    """Split text indices into blocks, shortest texts first.

    With ``batch_size`` every block holds that many texts. Without, a block grows while its padded size
    (texts x longest length) stays within ``block_tokens``, and always to at least
    :data:`MIN_BLOCK_TEXTS` texts. Every index appears exactly once.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    if batch_size is not None:
        return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    blocks: list[list[int]] = []
    current: list[int] = []
    for i in order:  # ascending: the text being added is the block's longest
        if current and len(current) >= MIN_BLOCK_TEXTS and (len(current) + 1) * lengths[i] > block_tokens:
            blocks.append(current)
            current = []
        current.append(i)
    if current:
        blocks.append(current)
    return blocks


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(batch, seq, hidden) -> (batch, hidden): mean over the unmasked tokens, the first token (CLS), or the
    element-wise max over the unmasked tokens (sentence-transformers' three pooling modes)."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "max":
        return hidden.masked_fill(mask.unsqueeze(-1) == 0, torch.finfo(hidden.dtype).min).max(dim=1).values
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


def _max_length(model: Any, tok: Any) -> int:
    limit = getattr(model.hf_model.config, "max_position_embeddings", None) or 512
    tok_limit = getattr(tok, "model_max_length", None)
    return int(min(limit, tok_limit)) if isinstance(tok_limit, int) and tok_limit > 0 else int(limit)


def embed(model: Any, texts: Sequence[str], *, batch_size: int | None = None, pooling: str = "mean",
          normalize: bool = False, progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Embed ``texts``: a float tensor (N, hidden), row i for ``texts[i]``.

    Each text is tokenized with the model's tokenizer (special tokens added, truncated to the model's
    maximum length), pooled over its own tokens (``"mean"``, as sentence-transformers' mean pooling;
    ``"max"``, the element-wise max) or taken at its first token (``"cls"``), and L2-normalized when
    ``normalize``. Blocks come from :func:`plan_blocks`; ``progress(done, total)`` is called after each block.

    Raises:
        ConfigurationError: an unknown ``pooling``, ``batch_size < 1``, or a text that is not a string.
        ModelError: the model has no tokenizer.
    """
    if pooling not in POOLINGS:
        raise ConfigurationError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if batch_size is not None and batch_size < 1:
        raise ConfigurationError(f"batch_size must be >= 1, got {batch_size}")
    items = [texts] if isinstance(texts, str) else list(texts)
    bad = [i for i, t in enumerate(items) if not isinstance(t, str)]
    if bad:
        raise ConfigurationError(f"texts must be strings; item {bad[0]} is {type(items[bad[0]]).__name__}")
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ModelError(f"{getattr(model, 'model_name', 'this model')!r} ships no tokenizer: embed needs one")
    hidden_size = int(model.hf_model.config.hidden_size)
    if not items:
        return torch.empty(0, hidden_size)
    encoded = tok(items, truncation=True, max_length=_max_length(model, tok))
    features = [{k: encoded[k][i] for k in encoded.keys()} for i in range(len(items))]
    out = torch.empty(len(items), hidden_size)
    done = 0
    for block in plan_blocks([len(f["input_ids"]) for f in features], batch_size):
        batch = tok.pad([features[i] for i in block], padding=True, return_tensors="pt")
        hidden = model.forward(**batch).last_hidden_state
        out[block] = pool(hidden, batch["attention_mask"].to(hidden.device), pooling).to(out.dtype)
        done += len(block)
        if progress is not None:
            progress(done, len(items))
    return torch.nn.functional.normalize(out, p=2, dim=1) if normalize else out
