"""Prompts to token ids, with the same rule as ``generate_text`` (issue 13), and the context-length check.

Plain prompts are encoded with the tokenizer's special tokens (``tokenizer(prompt)``); chat messages go
through the tokenizer's chat template with the generation prompt, and the rendered text is encoded without
adding special tokens again (the template already holds them).

Without ``max_tokens`` a request never runs to the end of the context: it gets the server's default (see
:meth:`PromptEncoder.max_new`), so a client's timeout-and-retry cannot re-run an endless generation.
"""

from __future__ import annotations

from typing import Any

from ..models import text
from ..models.generation import encode_prompts
from .errors import invalid

#: New tokens of a request without ``max_tokens`` when neither ``--default-max-tokens`` nor the model's
#: generation config (``max_new_tokens`` / ``max_length``) says otherwise.
DEFAULT_MAX_TOKENS = 256


class PromptEncoder:
    """Encodes and checks prompts for one tokenizer / model config.

    Args:
        tokenizer: the model's tokenizer.
        config: the model's config (``vocab_size``, ``max_position_embeddings`` / ``n_positions``).
        generation_config: the model's generation config (its ``max_new_tokens`` / ``max_length``, when set,
            bound requests that give no ``max_tokens``).
        default_max_tokens: that bound, set by the operator (wins over the generation config).
    """

    def __init__(self, tokenizer: Any, config: Any, generation_config: Any = None,
                 default_max_tokens: int | None = None) -> None:
        self.tok = tokenizer
        self.vocab = int(getattr(config, "vocab_size", 0) or len(tokenizer))
        self.context = int(getattr(config, "max_position_embeddings", 0) or getattr(config, "n_positions", 0)
                           or 0) or None
        self.default_max_tokens = default_max_tokens
        self.gen_max_new = getattr(generation_config, "max_new_tokens", None)
        self.gen_max_length = getattr(generation_config, "max_length", None)

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
        if not text.has_chat_template(self.tok):
            raise invalid("this model's tokenizer has no chat template: use /v1/completions", param="messages",
                          code="unsupported_model")
        try:
            ids = text.chat_ids(self.tok, messages)
        except Exception as exc:  # noqa: BLE001 - a template rejecting the conversation (e.g. role order)
            raise invalid(f"messages: the chat template rejected them: {exc}", param="messages") from exc
        return self.check(ids, max_tokens, "messages")

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

    def default_for(self, prompt_len: int) -> int:
        """New tokens for a request without ``max_tokens``: ``--default-max-tokens``, else the generation
        config's ``max_new_tokens``, else its ``max_length`` minus the prompt, else :data:`DEFAULT_MAX_TOKENS`;
        never past the context."""
        if self.default_max_tokens is not None:
            n = self.default_max_tokens
        elif self.gen_max_new:
            n = int(self.gen_max_new)
        elif self.gen_max_length and self.gen_max_length > prompt_len:
            n = int(self.gen_max_length) - prompt_len
        else:
            n = DEFAULT_MAX_TOKENS
        return max(1, min(n, self.context - prompt_len)) if self.context is not None else n

    def max_new(self, ids: list[int], max_tokens: int | None) -> int:
        """``max_tokens``, or (none given) :meth:`default_for` the prompt."""
        return max_tokens if max_tokens is not None else self.default_for(len(ids))
