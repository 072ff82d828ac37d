"""What a generation request must satisfy before anything is planned or fetched (issue 23).

Each rule turns an input that would fail deep inside transformers (an empty prompt: "cannot reshape a tensor
of 0 elements"), be reported as something else (a request past the context: a memory budget error) or be
silently ignored (a negative temperature: greedy) into one specific error that says what to change.
:mod:`.generation` applies them to ``generate`` and ``generate_text``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..exceptions import ConfigurationError, ContextLengthError

#: Why an empty prompt is refused (a tokenizer that adds BOS encodes "" to it, and generates from it).
EMPTY_PROMPT = ("it encodes to no tokens (this tokenizer adds no BOS token), so there is nothing to continue; "
                "give some text")


def context_length(config: Any) -> int | None:
    """Positions a decoder-only model attends over (``max_position_embeddings``, GPT-2's ``n_positions``);
    ``None`` for an encoder-decoder (T5's relative positions have no such bound) or a config without one."""
    if getattr(config, "is_encoder_decoder", False):
        return None
    n = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def check_sampling(kwargs: dict) -> None:
    """Refuse sampling options that transformers ignores (greedy) or fails on deep inside ``generate``.

    Raises:
        ConfigurationError: ``temperature`` < 0 (0 means greedy), ``top_p`` outside (0, 1], ``top_k`` < 0.
    """
    t, p, k = kwargs.get("temperature"), kwargs.get("top_p"), kwargs.get("top_k")
    if t is not None and not (isinstance(t, (int, float)) and t >= 0):  # `not >=` also refuses NaN
        raise ConfigurationError(f"temperature= must be >= 0 (0 or do_sample=False: greedy), got {t!r}")
    if p is not None and not (isinstance(p, (int, float)) and 0 < p <= 1):
        raise ConfigurationError(f"top_p= must be in (0, 1] (1: no nucleus cut), got {p!r}")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
        raise ConfigurationError(f"top_k= must be an integer >= 0 (0: no top-k cut), got {k!r}")


def prompt_lengths(ids: Any, attention_mask: Any = None) -> list[int]:
    """Each row's prompt tokens: its attention mask's ones (left padding is no token), else the width."""
    rows = int(ids.shape[0]) if ids.dim() == 2 else 1
    if attention_mask is not None and tuple(attention_mask.shape) == tuple(ids.shape) and ids.dim() == 2:
        return [int(n) for n in attention_mask.sum(-1)]
    return [int(ids.shape[-1])] * rows


def check_prompt_rows(lengths: Sequence[int], *, what: str = "the prompt") -> None:
    """Refuse a prompt of no tokens (in a padded batch it would be all padding, continued from nothing).

    ``what``: how the message names it, ``"the prompt"`` (one, or rows of a batch) or ``"prompt"`` (a list:
    the message names the item's index).

    Raises:
        ConfigurationError: the first empty one, named.
    """
    empty = [i for i, n in enumerate(lengths) if n == 0]
    if empty:
        name = f"prompt {empty[0]}" if what == "prompt" else what
        row = f" (row {empty[0]} of the batch)" if what != "prompt" and len(lengths) > 1 else ""
        raise ConfigurationError(f"{name} is empty{row}: {EMPTY_PROMPT}")


def check_context(config: Any, prompt: int, new: int) -> None:
    """Refuse a sequence of ``prompt`` tokens that ``new`` generated tokens would run past the model's
    positions (:func:`context_length`; a model without one is not checked).

    Raises:
        ContextLengthError: naming the limit and how many new tokens fit.
    """
    limit = context_length(config)
    if limit is None or prompt + new <= limit:
        return
    fix = (f"lower max_new_tokens= to at most {limit - prompt}, or shorten the prompt" if prompt < limit else
           f"shorten the prompt to fewer than {limit} tokens")
    raise ContextLengthError(f"prompt ({prompt} tokens) + max_new_tokens ({new}) = {prompt + new} tokens exceeds "
                             f"the model's context (max_position_embeddings {limit}): {fix}")


__all__ = ["EMPTY_PROMPT", "check_context", "check_prompt_rows", "check_sampling", "context_length",
           "prompt_lengths"]
