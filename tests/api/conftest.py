"""Fixtures of the API tests: a tiny random Llama with a real byte-level BPE tokenizer and chat template,
a weight server on loopback, and the API (uvicorn) in a background thread."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Iterator

import pytest

from tests.support.models import chunk, llama



CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "Streaming weights layer by layer, one fetch per step.",
    "café, naïve, über, 東京, 😀 — multi-byte characters", "hello world", "Once upon a time there was a model.",
] * 20


def save_tokenizer(path: Path) -> None:
    """A byte-level BPE tokenizer (320 ids: 3 specials, 256 bytes, merges) matching the tiny Llama's ids:
    pad 0, bos 1 (<|im_start|>), eos 2 (<|im_end|>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|pad|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", chat_template=CHAT_TEMPLATE)
    fast.save_pretrained(str(path))


@pytest.fixture(scope="session")
def chat_llama_chunks(workdir) -> Path:
    """A 4-layer random Llama (vocab 320) with the tokenizer above, chunked (manifest name "tiny-chat")."""
    src = llama(workdir / "api-src-llama", layers=4)
    save_tokenizer(src)
    out = workdir / "api-chunks-llama"
    chunk(src, out, name="tiny-chat")
    return out


@contextlib.contextmanager
def weight_server(chunks_dir: Path, **kw) -> Iterator[tuple[str, str]]:
    """A WeightServer on loopback: yields (ws:// URI, http:// URL of its /metrics)."""
    from tests.support.streaming import served

    with served(chunks_dir, **kw) as uri:
        yield uri, uri.replace("ws://", "http://") + "/metrics"


@contextlib.contextmanager
def api_server(model, **kw) -> Iterator[str]:
    """The API over ``model`` (uvicorn in a thread, free port): yields its base URL."""
    from streaming_weights.api import ApiServer, ApiSettings, create_app

    tokens = kw.pop("tokens", None)
    app = create_app(model, tokens=tokens, settings=ApiSettings(**kw))
    with ApiServer(app, host="127.0.0.1", port=0) as server:
        yield server.url


def metric(text: str, name: str) -> float:
    """The value of an unlabelled Prometheus sample ``name`` in exposition ``text``."""
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    assert m, f"{name} not in metrics"
    return float(m.group(1))
