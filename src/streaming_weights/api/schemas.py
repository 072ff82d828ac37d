"""Request bodies of the OpenAI API subset served here (pydantic), and their validation into generation options.

Fields OpenAI defines but this server does not implement are accepted only at their neutral value
(``echo=False``, ``logprobs=None``, penalties 0...), so a client never gets silently different behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from .errors import invalid

MAX_STOP = 4


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampled(_Body):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None


class CompletionRequest(_Sampled):
    prompt: Union[str, list[str], list[int], list[list[int]]]  # noqa: UP007 - pydantic tries these in order
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class ContentPart(_Body):
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")  # e.g. `name`; passed to the chat template as given
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class ChatRequest(_Sampled):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None


class EmbeddingRequest(_Body):
    model: str
    input: Union[str, list[str], list[int], list[list[int]]]  # noqa: UP007
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


@dataclass(frozen=True)
class Sampling:
    """How a row picks tokens. ``temperature == 0`` is greedy (``top_p`` and ``seed`` then do not matter)."""

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generate_kwargs(self) -> dict[str, Any]:
        if self.greedy:
            return {"do_sample": False}
        # top_k=0: OpenAI's sampling has no top-k; a model's generation config must not add one silently.
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": 0}


@dataclass(frozen=True)
class GenOptions:
    max_tokens: int | None
    sampling: Sampling
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


def _reject_unless(cond: bool, param: str, what: str) -> None:
    if not cond:
        raise invalid(f"{param}: {what} is not supported by this server", param=param, code="unsupported_parameter")


def gen_options(req: _Sampled, max_tokens: int | None) -> GenOptions:
    """Validate the sampling part of a completions / chat request.

    Raises:
        ApiError: (400) ``n`` other than 1, more than 4 stop strings, penalties, or stream_options without stream.
    """
    _reject_unless(req.n in (None, 1), "n", "n other than 1")
    _reject_unless(not req.presence_penalty and not req.frequency_penalty, "presence_penalty",
                   "presence_penalty / frequency_penalty other than 0")
    _reject_unless(not req.logit_bias, "logit_bias", "logit_bias")
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    if len(stop) > MAX_STOP:
        raise invalid(f"stop: at most {MAX_STOP} stop sequences, got {len(stop)}", param="stop")
    if req.stream_options is not None and not req.stream:
        raise invalid("stream_options: only allowed when stream is true", param="stream_options")
    temperature = 1.0 if req.temperature is None else req.temperature
    sampling = Sampling(temperature, 1.0 if req.top_p is None else req.top_p, req.seed)
    return GenOptions(max_tokens, sampling, stop, req.stream,
                      bool(req.stream_options and req.stream_options.include_usage))


def completion_options(req: CompletionRequest) -> GenOptions:
    """Options of ``/v1/completions`` (OpenAI's default ``max_tokens`` there is 16)."""
    _reject_unless(not req.echo, "echo", "echo")
    _reject_unless(req.logprobs is None, "logprobs", "logprobs")
    _reject_unless(req.best_of in (None, 1), "best_of", "best_of other than 1")
    _reject_unless(req.suffix is None, "suffix", "suffix")
    return gen_options(req, 16 if req.max_tokens is None else req.max_tokens)


def chat_options(req: ChatRequest) -> GenOptions:
    """Options of ``/v1/chat/completions`` (no ``max_tokens``: the server's default, ``PromptEncoder.max_new``)."""
    _reject_unless(not req.logprobs and req.top_logprobs is None, "logprobs", "logprobs")
    _reject_unless(not req.tools and req.tool_choice in (None, "none"), "tools", "tool calls")
    fmt = (req.response_format or {}).get("type", "text")
    _reject_unless(fmt == "text", "response_format", f"response_format {fmt!r}")
    if req.max_tokens is not None and req.max_completion_tokens is not None and \
            req.max_tokens != req.max_completion_tokens:
        raise invalid("max_tokens and max_completion_tokens disagree; pass one", param="max_completion_tokens")
    return gen_options(req, req.max_completion_tokens or req.max_tokens)


def chat_messages(req: ChatRequest) -> list[dict[str, Any]]:
    """Messages as the tokenizer's chat template expects them (text parts joined; other parts rejected)."""
    out = []
    for i, m in enumerate(req.messages):
        content = m.content
        if isinstance(content, list):
            bad = [p.type for p in content if p.type != "text"]
            if bad:
                raise invalid(f"messages[{i}].content: only text parts are supported, got {bad[0]!r}",
                              param=f"messages.{i}.content")
            content = "".join(p.text or "" for p in content)
        out.append({**(m.model_extra or {}), "role": m.role, "content": content or ""})
    return out
