"""Prompts to token ids, with the same rule as ``generate_text`` (issue 13), and the context-length check.

Plain prompts are encoded with the tokenizer's special tokens (``tokenizer(prompt)``); chat messages go
through the tokenizer's chat template with the generation prompt, and the rendered text is encoded without
adding special tokens again (the template already holds them).
"""

from __future__ import annotations

from typing import Any

from ..models.generation import encode_prompts
from .errors import invalid


class PromptEncoder:
    """Encodes and checks prompts for one tokenizer / model config."""

    def __init__(self, tokenizer: Any, config: Any) -> None:
        self.tok = tokenizer
        self.vocab = int(getattr(config, "vocab_size", 0) or len(tokenizer))
        self.context = int(getattr(config, "max_position_embeddings", 0) or getattr(config, "n_positions", 0)
                           or 0) or None

    def completion(self, prompt: str | list[str] | list[int] | list[list[int]],
                   max_tokens: int | None) -> list[list[int]]:
        """One id list per prompt (a string, a list of strings, token ids, or lists of token ids)."""
        if isinstance(prompt, str):
            prompts: list[Any] = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        if not prompts:
            raise invalid("prompt: must not be empty", param="prompt")
        out = []
        for p in prompts:
            ids = encode_prompts(self.tok, [p])[0] if isinstance(p, str) else list(p)
            bad = [i for i in ids if not 0 <= i < self.vocab]
            if bad:
                raise invalid(f"prompt: token id {bad[0]} is outside the vocabulary (0..{self.vocab - 1})",
                              param="prompt")
            out.append(self.check(ids, max_tokens, "prompt"))
        return out

    def chat(self, messages: list[dict[str, Any]], max_tokens: int | None) -> list[int]:
        """The ids of the chat template rendered with ``add_generation_prompt=True``."""
        if not getattr(self.tok, "chat_template", None):
            raise invalid("this model's tokenizer has no chat template: use /v1/completions", param="messages",
                          code="unsupported_model")
        try:
            text = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # noqa: BLE001 - a template rejecting the conversation (e.g. role order)
            raise invalid(f"messages: the chat template rejected them: {exc}", param="messages") from exc
        return self.check(self.tok(text, add_special_tokens=False)["input_ids"], max_tokens, "messages")

    def check(self, ids: list[int], max_tokens: int | None, param: str) -> list[int]:
        """``ids`` if they and ``max_tokens`` new tokens fit the model's context (OpenAI's 400 otherwise)."""
        if not ids:
            raise invalid(f"{param}: encodes to no tokens", param=param)
        total = len(ids) + (max_tokens or 1)
        if self.context is not None and total > self.context:
            raise invalid(
                f"This model's maximum context length is {self.context} tokens. However, you requested "
                f"{total} tokens ({len(ids)} in the {param}, {max_tokens or 1} in the completion). "
                "Please reduce the length of the prompt or max_tokens.", param=param,
                code="context_length_exceeded")
        return ids

    def max_new(self, ids: list[int], max_tokens: int | None) -> int:
        """``max_tokens``, or (none given) the rest of the context."""
        if max_tokens is not None:
            return max_tokens
        return self.context - len(ids) if self.context is not None else 4096
