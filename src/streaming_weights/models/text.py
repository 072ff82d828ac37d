"""Text in, text out: the one place that knows chat templates, end-of-sequence ids and padding.

Every path that turns user text into token ids (``generate_text``, ``surfing generate`` / ``chat``, the
OpenAI-compatible API, :class:`~streaming_weights.chat.ChatSession`) and that batches rows of ids goes through
these functions, so a rule (which special tokens, which EOS ids, which side pads) is written once.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..exceptions import ModelError

Message = dict[str, Any]


def has_chat_template(tok: Any) -> bool:
    return bool(getattr(tok, "chat_template", None))


def chat_ids(tok: Any, messages: Sequence[Message]) -> list[int]:
    """Ids of ``messages`` rendered by the tokenizer's chat template with the generation prompt; the template
    brings its own special tokens (none are added on top).

    Raises:
        ModelError: the tokenizer has no chat template.
        Whatever the template raises for a conversation it rejects (e.g. roles out of order).
    """
    if not has_chat_template(tok):
        raise ModelError("this model's tokenizer has no chat template (use a plain prompt)")
    text = tok.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    return list(tok(text, add_special_tokens=False)["input_ids"])


def prompt_ids(tok: Any, prompt: str, *, chat: bool = False) -> list[int]:
    """Ids of one prompt: as one user message in the chat template (``chat=True``), else with the tokenizer's
    own special tokens."""
    return chat_ids(tok, [{"role": "user", "content": prompt}]) if chat else list(tok(prompt)["input_ids"])


def eos_ids(generation_config: Any, tok: Any) -> list[int]:
    """The ids that end a sequence: the generation config's ``eos_token_id`` (an int or a list), then the
    tokenizer's if it is not among them."""
    eos = getattr(generation_config, "eos_token_id", None)
    ids = [] if eos is None else [int(eos)] if isinstance(eos, int) else [int(i) for i in eos]
    if tok is not None and getattr(tok, "eos_token_id", None) is not None and int(tok.eos_token_id) not in ids:
        ids.append(int(tok.eos_token_id))
    return ids


def pad_id(tok: Any, eos: Sequence[int]) -> int:
    """The id padding uses (masked out): the tokenizer's pad token, else the first EOS id.

    Raises:
        ModelError: the tokenizer has neither.
    """
    if getattr(tok, "pad_token_id", None) is not None:
        return int(tok.pad_token_id)
    if not eos:
        raise ModelError("the tokenizer has neither a pad nor an EOS token to batch with")
    return int(eos[0])


def left_pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of ``rows`` left-padded with ``pad`` to the longest (decoder batches:
    every row's next token is at the same position)."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + list(r) for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return ids, mask


__all__ = ["chat_ids", "eos_ids", "has_chat_template", "left_pad", "pad_id", "prompt_ids"]
