"""Fixtures of the API tests: a tiny random Llama with a real byte-level BPE tokenizer and chat template,
a weight server on loopback, and the API (uvicorn) in a background thread."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

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


def llama_with(path: Path, name: str, *, context: int | None = None, generation: dict | None = None) -> Path:
    """The tiny chat Llama chunked into ``path`` as ``name``, with ``max_position_embeddings = context`` (rotary
    positions: no weight depends on it) and ``generation`` merged into its generation_config.json."""
    import json

    src = llama(path.parent / f"{name}-src", layers=4)
    save_tokenizer(src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["max_position_embeddings"] = context or cfg["max_position_embeddings"]
    (src / "config.json").write_text(json.dumps(cfg))
    gen_file = src / "generation_config.json"
    gen = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
    gen_file.write_text(json.dumps({**gen, **(generation or {})}))
    chunk(src, path, name=name)
    return path


@dataclass
class ApiProcess:
    """A running ``surfing api`` subprocess: its base URL (``/v1`` appended for the openai client)."""

    proc: subprocess.Popen
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kw) -> Any:
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0,
                             timeout=kw.pop("timeout", 120), **kw)

    def stop(self, sig: int = signal.SIGINT, timeout: float = 120) -> tuple[int, str, str]:
        """Send ``sig``; the exit status, stdout and stderr once it exited."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.wait(timeout)

    def wait(self, timeout: float = 120) -> tuple[int, str, str]:
        """The exit status, stdout and stderr once it exited (by itself: nothing is sent)."""
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err


@contextlib.contextmanager
def surfing_api(*args: str) -> Iterator[ApiProcess]:
    """``surfing api ARGS --port FREE`` as a user starts it; yields once its port accepts connections and
    stops it (SIGTERM) afterwards unless the test did."""
    from streaming_weights.netutil import free_port, wait_for_port
    from tests.cli.helpers import SURFING

    port = free_port()
    proc = subprocess.Popen([*SURFING, "api", "--port", str(port), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    api = ApiProcess(proc, port)
    try:
        try:
            wait_for_port(port, timeout=180, proc=proc)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\nstdout: {proc.stdout.read()}\nstderr: {proc.stderr.read()}") from None
        yield api
    finally:
        if proc.poll() is None:
            proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=60)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def surfing_api_here(*args: str) -> Iterator[ApiProcess]:
    """``surfing api ARGS`` in this process: the command's own parsing and set-up (``cli.api.api_parts``), served
    by :class:`~streaming_weights.api.ApiServer` in a thread; for checks of what the flags do, where a fresh
    process is not the point (:func:`surfing_api` keeps those). Yields the same shape as :func:`surfing_api`
    (``proc`` is ``None``)."""
    from streaming_weights.api import ApiServer, create_app
    from streaming_weights.cli import build_parser
    from streaming_weights.cli.api import api_parts

    model, tokens, settings = api_parts(build_parser().parse_args(["api", *map(str, args)]))
    with model, ApiServer(create_app(model, tokens=tokens, settings=settings), port=0) as server:
        yield ApiProcess(None, server.port)  # type: ignore[arg-type]

