"""Make one fetch of the streamed weights serve many tokens: speculation, batched text generation.

Streaming moves most of the model once per forward pass, whatever the pass computes. So a pass that
checks k drafted tokens costs the bytes of a pass that computes one, and a pass over 8 prompts costs the
bytes of a pass over one. This module holds the policies; the model classes expose them as methods.

- :func:`prepare_generate` turns our ``speculation`` option into transformers' own prompt-lookup
  decoding (``prompt_lookup_num_tokens``) when it cannot change the result (greedy, one sequence).
- :func:`counting_drafts` counts drafted and accepted tokens by wrapping the candidate generator
  transformers builds (transformers does not report them).
- :func:`generate_text` runs prompts in left-padded batches and decodes only the new text.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..exceptions import ConfigurationError, ModelError
from . import validation
from . import text
from .patching import patch_method

#: Draft length of ``speculation="auto"``. A verification pass costs the fetch of a 1-token step, so a
#: long draft is nearly free when it is rejected and saves a whole fetch per accepted token.
AUTO_DRAFT_TOKENS = 10
#: ``batch_size=None`` upper bound until a memory budget chooses (see :func:`choose_batch_size`).
DEFAULT_MAX_BATCH = 16
#: Keyword arguments that pick a decoding mode of their own: "auto" leaves those calls alone.
_OWN_MODE_KWARGS = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit", "use_mtp",
                    "past_key_values", "cache_implementation", "num_assistant_tokens")


def parse_speculation(value: str | int | None) -> str | int:
    """Validate a speculation setting: ``"auto"`` (default for ``None``), ``"off"``, or a draft length N >= 1
    (an int or its decimal string, as the CLI and ``SURFING_SPECULATION`` give it).

    Raises:
        ConfigurationError: anything else.
    """
    if value is None:
        return "auto"
    if isinstance(value, bool):  # bool is an int: True/False would read as 1/0 drafts
        raise ConfigurationError(f"speculation must be 'auto', 'off' or a draft length >= 1, got {value!r}")
    if isinstance(value, str):
        low = value.strip().lower()
        if low in ("auto", "off"):
            return low
        if low in ("0", "none", "false", "no"):
            return "off"
        if not low.isdigit():
            raise ConfigurationError(f"speculation must be 'auto', 'off' or a draft length >= 1, got {value!r}")
        value = int(low)
    if isinstance(value, int) and value >= 1:
        return value
    if value == 0:
        return "off"
    raise ConfigurationError(f"speculation must be 'auto', 'off' or a draft length >= 1, got {value!r}")


def _batch_size_of(args: tuple, kwargs: dict) -> int | None:
    ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
    if ids is None:
        ids = kwargs.get("inputs_embeds")
    return int(ids.shape[0]) if isinstance(ids, torch.Tensor) and ids.dim() >= 2 else None


def _setting(kwargs: dict, hf_model: Any, name: str, default: Any) -> Any:
    if name in kwargs:
        return kwargs[name]
    cfg = kwargs.get("generation_config") or getattr(hf_model, "generation_config", None)
    value = getattr(cfg, name, None)
    return default if value is None else value


def lookup_draft_length(hf_model: Any, args: tuple, kwargs: dict, speculation: str | int) -> int | None:
    """The prompt-lookup draft length to use for this ``generate`` call, or ``None`` for plain decoding.

    Prompt lookup applies to one decoder-only sequence, one beam, with a KV cache and no decoding
    mode of the caller's own; ``"auto"`` further requires greedy decoding, where the drafts provably
    leave the tokens unchanged (up to float summation order). Batches always decode plainly: transformers
    runs assisted decoding on batch 1 only.
    """
    if speculation == "off" or hf_model.config.is_encoder_decoder:
        return None
    if any(kwargs.get(k) is not None for k in _OWN_MODE_KWARGS):
        return None
    if _batch_size_of(args, kwargs) not in (None, 1):
        return None
    if int(_setting(kwargs, hf_model, "num_beams", 1)) != 1:
        return None
    if int(_setting(kwargs, hf_model, "num_return_sequences", 1)) != 1:
        return None
    if not _setting(kwargs, hf_model, "use_cache", True):
        return None
    if speculation == "auto":
        return None if _setting(kwargs, hf_model, "do_sample", False) else AUTO_DRAFT_TOKENS
    return int(speculation)


def unwrap_assistant(assistant: Any) -> Any:
    """A transformers model as is; a streaming model (anything with ``hf_model``) as its transformers model."""
    return getattr(assistant, "hf_model", assistant)


def prepare_generate(hf_model: Any, args: tuple, kwargs: dict, speculation: str | int | None) -> dict:
    """Return the keyword arguments for ``hf_model.generate``: our option consumed (transformers rejects
    unknown keywords), a streaming ``assistant_model`` unwrapped, prompt lookup added when it applies."""
    kwargs = dict(kwargs)
    setting = parse_speculation(speculation)
    assistant = kwargs.get("assistant_model")
    if assistant is not None:
        kwargs["assistant_model"] = unwrap_assistant(assistant)
        if ("assistant_tokenizer" not in kwargs
                and kwargs["assistant_model"].config.vocab_size != hf_model.config.vocab_size
                and (other_tok := getattr(assistant, "tokenizer", None)) is not None):
            # A draft with another vocabulary: transformers translates tokens when given both tokenizers (a
            # streaming draft's is built only then).
            kwargs["assistant_tokenizer"] = other_tok
    draft = _within_context(hf_model, args, kwargs, lookup_draft_length(hf_model, args, kwargs, setting))
    if draft is not None:
        kwargs["prompt_lookup_num_tokens"] = draft
    return kwargs


def _within_context(hf_model: Any, args: tuple, kwargs: dict, draft: int | None) -> int | None:
    """``draft`` shortened (or ``None``: off) so that verifying it stays inside the model's positions.

    transformers' prompt lookup proposes ``draft`` tokens whatever room is left, so the last verification pass
    reaches position ``request_tokens + draft - 2``: past a learned position table (GPT-2's ``n_positions``)
    that is an IndexError. Only requests ending within a draft of the context are affected.
    """
    ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
    limit = validation.context_length(hf_model.config)
    if draft is None or limit is None or not isinstance(ids, torch.Tensor):
        return draft
    room = limit - request_tokens(hf_model, kwargs, int(ids.shape[-1])) + 1
    return draft if draft <= room else (room if room >= 1 else None)


# ------------------------------------------------------------------------------------ draft counting
@dataclass
class DraftCounter:
    """Tokens proposed by a candidate generator (``drafted``) and confirmed by the model (``accepted``),
    summed over ``generate`` calls; ``verify_steps`` counts verification passes."""

    drafted: int = 0
    accepted: int = 0
    verify_steps: int = 0

    def as_stats(self) -> dict[str, Any]:
        return {"drafted_tokens": self.drafted, "accepted_tokens": self.accepted,
                "draft_acceptance": self.accepted / self.drafted if self.drafted else 0.0}


class _Backoff:
    """``speculation="auto"``'s guard for open-ended text: after a draft rejected outright, skip drafting
    for 1, then 2, 4, 8... steps (plain 1-token steps, no wasted verification compute); any accepted
    draft token resets it. Drafts cost no extra bytes, only the compute of the rejected positions."""

    def __init__(self) -> None:
        self.skip = self.wait = 0

    def drafting(self) -> bool:
        if self.wait > 0:
            self.wait -= 1
            return False
        return True

    def update(self, drafted: int, accepted: int) -> None:
        if drafted and not accepted:
            self.skip = max(1, 2 * self.skip)
            self.wait = self.skip
        elif accepted:
            self.skip = 0


def _instrument(generator: Any, counter: DraftCounter, backoff: _Backoff | None) -> None:
    """Count through the two calls transformers' assisted loop makes on every candidate generator:
    ``get_candidates(input_ids, ...)`` returns the drafted sequence, ``update_candidate_strategy(input_ids,
    scores, num_matches)`` reports how many drafts were accepted. Instance attributes, so the object's
    class (which transformers checks with isinstance) is unchanged. With ``backoff``, skipped steps
    propose nothing (the input unchanged: transformers then decodes one token, as plain decoding does)."""
    get, update = generator.get_candidates, generator.update_candidate_strategy
    last = [0]

    def get_candidates(input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if backoff is not None and not backoff.drafting():
            last[0] = 0
            return input_ids, None
        out = get(input_ids, *args, **kwargs)
        last[0] = int(out[0].shape[-1] - input_ids.shape[-1])
        counter.drafted += last[0]
        counter.verify_steps += 1
        return out

    def update_candidate_strategy(input_ids: torch.Tensor, scores: Any, num_matches: Any, *args: Any,
                                  **kwargs: Any) -> Any:
        counter.accepted += int(num_matches)
        if backoff is not None:
            backoff.update(last[0], int(num_matches))
        return update(input_ids, scores, num_matches, *args, **kwargs)

    generator.get_candidates = get_candidates
    generator.update_candidate_strategy = update_candidate_strategy


@contextlib.contextmanager
def counting_drafts(hf_model: Any, counter: DraftCounter, *, adaptive: bool = False) -> Iterator[DraftCounter]:
    """Within the block, every candidate generator ``hf_model`` builds reports into ``counter``
    (and, with ``adaptive``, backs off after rejected drafts: see :class:`_Backoff`).

    Wraps the model instance's ``_get_candidate_generator`` (transformers' one factory of candidate
    generators); where a transformers version lacks it, nothing is counted and nothing breaks.
    """
    factory = getattr(hf_model, "_get_candidate_generator", None)
    if factory is None:
        yield counter
        return

    def build(*args: Any, **kwargs: Any) -> Any:
        generator = factory(*args, **kwargs)
        if hasattr(generator, "get_candidates") and hasattr(generator, "update_candidate_strategy"):
            _instrument(generator, counter, _Backoff() if adaptive else None)
        return generator

    patch = patch_method(hf_model, "_get_candidate_generator", lambda _factory: build)
    try:
        yield counter
    finally:
        patch.remove()


# --------------------------------------------------------------------------------- generate_text
def _budget_plan(model: Any) -> Any:
    """The model's load-time plan when a memory budget made it, else ``None``."""
    plan = getattr(getattr(model, "engine", None), "plan", None)
    return plan if plan is not None and getattr(plan, "source", None) == "budget" else None


def request_tokens(hf_model: Any, kwargs: dict, prompt_len: int) -> int:
    """Tokens one sequence of a ``generate`` call reaches: prompt + ``max_new_tokens`` (else ``max_length``)."""
    new = _setting(kwargs, hf_model, "max_new_tokens", None)
    if new is not None:
        return int(prompt_len) + int(new)
    return max(int(prompt_len) + 1, int(_setting(kwargs, hf_model, "max_length", 20)))


def check_request(hf_model: Any, kwargs: dict, ids: torch.Tensor) -> None:
    """Before anything is planned or fetched: every row of a decoder-only prompt holds a token, and one
    sequence fits the model's context. A batch is not checked against the context here: the API batches
    requests of different limits (it checks each), ``generate_text`` checks its longest prompt.

    Raises:
        ConfigurationError: an empty prompt row. ContextLengthError: one sequence past the model's positions.
    """
    if hf_model.config.is_encoder_decoder:
        return
    lengths = validation.prompt_lengths(ids, kwargs.get("attention_mask"))
    validation.check_prompt_rows(lengths)
    if len(lengths) == 1:
        width = int(ids.shape[-1])
        validation.check_context(hf_model.config, lengths[0], request_tokens(hf_model, kwargs, width) - width)


def fit_request(model: Any, seq_len: int, batch: int) -> None:
    """Under a memory budget, make room for the request's KV cache and activations (``engine.fit_request``).

    Raises:
        ConfigurationError: the request does not fit the budget even with no unit kept.
    """
    if _budget_plan(model) is not None:
        model.engine.fit_request(seq_len, batch)


def choose_batch_size(model: Any, n: int, seq_len: int | None = None) -> int:
    """Prompts per ``generate`` call when the caller gives no ``batch_size``: every prompt, up to
    :data:`DEFAULT_MAX_BATCH`, and under a memory budget at most the batch whose ``seq_len``-token
    KV cache and activations fit beside the smallest plan (``Plan.max_batch``)."""
    size = max(1, min(int(n), DEFAULT_MAX_BATCH))
    plan = _budget_plan(model)
    if plan is not None and seq_len is not None:
        size = max(1, min(size, plan.max_batch(int(seq_len))))
    return size


def _usable_tokenizer(model: Any) -> Any:
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ModelError(f"{getattr(model, 'model_name', 'this model')!r} ships no tokenizer: text in/out needs "
                         "one (chunk the model with its tokenizer files)")
    if tok.pad_token_id is None:  # batches need a pad token; EOS is never attended to under the mask
        tok = copy.deepcopy(tok)
        tok.pad_token = tok.eos_token
    return tok


def _as_prompt_list(prompts: str | Sequence[str], what: str = "prompts") -> tuple[list[str], bool]:
    if isinstance(prompts, str):
        return [prompts], True
    items = list(prompts)
    bad = [i for i, p in enumerate(items) if not isinstance(p, str)]
    if bad:
        raise ConfigurationError(f"{what} must be strings; item {bad[0]} is {type(items[bad[0]]).__name__}")
    return items, False


def encode_prompts(tokenizer: Any, prompts: Sequence[str], *, chat: bool = False) -> list[list[int]]:
    """Token ids of each prompt, the one rule for text in: a plain prompt gets the tokenizer's special
    tokens; ``chat=True`` wraps it as one user message in the chat template with the generation prompt
    (the template brings its own special tokens)."""
    if chat and not text.has_chat_template(tokenizer):
        raise ModelError("chat=True needs a tokenizer with a chat template; this one has none")
    return [text.prompt_ids(tokenizer, p, chat=chat) for p in prompts]


def _eos_ids(model: Any, tok: Any) -> set[int]:
    return set(text.eos_ids(model.hf_model.generation_config, tok))


def decode_new_text(tok: Any, new_ids: Sequence[int], eos: set[int], stop: Sequence[str] = ()) -> str:
    """The decoding rule: new tokens up to the first EOS, ``skip_special_tokens=True``, no stripping; the
    text ends before the first stop string."""
    ids = list(new_ids)
    cut = next((i for i, t in enumerate(ids) if int(t) in eos), len(ids))
    out = tok.decode(ids[:cut], skip_special_tokens=True)
    ends = [i for i in (out.find(s) for s in stop) if i >= 0]
    return out[:min(ends)] if ends else out


def generate_text(model: Any, prompts: str | Sequence[str], *, batch_size: int | None = None, chat: bool = False,
                  stop: str | Sequence[str] | None = None,
                  progress: Callable[[int, int], None] | None = None, **generate_kwargs: Any) -> str | list[str]:
    """Generate a continuation of each prompt; a string in gives a string out, a list gives a list (same order).

    Prompts are sorted by length and run ``batch_size`` at a time (default :func:`choose_batch_size`),
    left-padded with the attention mask transformers derives positions from, so greedy results equal
    one-prompt calls. ``progress(done, total)`` is called after each batch. Other keywords go to
    ``model.generate`` (``max_new_tokens``, sampling options, ``speculation``...).

    A prompt that encodes to no tokens (``""`` with a tokenizer that adds no BOS; with ``chat=True`` the template
    always gives tokens) is refused; with a BOS-adding tokenizer ``""`` generates from the BOS token alone.

    Raises:
        ConfigurationError: a prompt that is not a string or encodes to no tokens, or ``batch_size < 1``.
        ContextLengthError: a prompt + ``max_new_tokens`` beyond the model's ``max_position_embeddings``.
        ModelError: the model has no tokenizer (or ``chat=True`` and no chat template).
    """
    items, single = _as_prompt_list(prompts)
    stops = [stop] if isinstance(stop, str) else list(stop or ())
    if batch_size is not None and batch_size < 1:
        raise ConfigurationError(f"batch_size must be >= 1, got {batch_size}")
    tok = _usable_tokenizer(model)
    encoded = encode_prompts(tok, items, chat=chat)
    validation.check_prompt_rows([len(e) for e in encoded], what="the prompt" if single else "prompt")
    longest = max((len(e) for e in encoded), default=0)
    if encoded:  # every row gets max_new_tokens: the longest prompt decides
        validation.check_context(model.hf_model.config, longest,
                                 request_tokens(model.hf_model, generate_kwargs, longest) - longest)
    size = batch_size or choose_batch_size(model, len(items), request_tokens(model.hf_model, generate_kwargs, longest))
    order = sorted(range(len(items)), key=lambda i: len(encoded[i]))  # similar lengths: little padding
    eos = _eos_ids(model, tok)
    kwargs = dict(generate_kwargs)
    kwargs.setdefault("pad_token_id", tok.pad_token_id)
    if stops:  # transformers stops each sequence at a stop string (it needs the tokenizer to see strings)
        kwargs.update(stop_strings=stops, tokenizer=tok)
    texts: list[str] = [""] * len(items)
    for start in range(0, len(order), size):
        idx = order[start:start + size]
        batch = tok.pad({"input_ids": [encoded[i] for i in idx]}, padding=True, padding_side="left",
                        return_tensors="pt")
        out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
        seq = out.sequences if hasattr(out, "sequences") else out
        width = batch["input_ids"].shape[1]
        for row, i in enumerate(idx):
            texts[i] = decode_new_text(tok, seq[row, width:].tolist(), eos, stops)
        if progress is not None:
            progress(min(start + size, len(order)), len(order))
    return texts[0] if single else texts
