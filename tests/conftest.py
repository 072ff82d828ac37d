from __future__ import annotations

import os
from pathlib import Path

import pytest

# Before anything imports huggingface_hub/transformers: the suite never touches the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One compute thread per process (inherited by every `surfing` subprocess): the tests run tiny models, where
# a second OpenMP thread buys nothing and, on a busy 2-core box, spin-waits turn a 1 ms matmul into 20 ms.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

from tests.support import models as tiny  # noqa: E402
from tests.support import services  # noqa: E402
from tests.support.models import chunk  # noqa: E402


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_source(workdir):
    """``tiny_source(kind, **kw)`` -> path of a saved random-init checkpoint (built once per kind+kw)."""
    made: dict = {}

    def get(kind: str, **kw) -> Path:
        key = (kind, tuple(sorted(kw.items())))
        if key not in made:
            made[key] = tiny.BUILDERS[kind](workdir / f"src-{kind}-{len(made)}", **kw)
        return made[key]

    return get


@pytest.fixture(scope="session")
def tiny_chunks(workdir, tiny_source):
    """``tiny_chunks(kind, **kw)`` -> (source dir, chunk dir) with manifest name == kind."""
    made: dict = {}

    def get(kind: str, **kw) -> tuple[Path, Path]:
        key = (kind, tuple(sorted(kw.items())))
        if key not in made:
            src = tiny_source(kind, **kw)
            out = workdir / f"chunks-{kind}-{len(made)}"
            chunk(src, out, name=kind)
            made[key] = (src, out)
        return made[key]

    return get


@pytest.fixture(scope="session")
def llama_text_chunks(workdir, tiny_source) -> Path:
    """The tiny LLaMA with a word-level tokenizer and a chat template (tests/support/tokenizers.py), chunked
    as ``llama-text``: text commands (``generate --prompt``, ``--chat``, ``chat``) on a model that loads in
    well under a second. Use SmolLM2 only where a real model's answer is the point."""
    from tests.support.tokenizers import text_model

    return text_model(tiny_source("llama"), workdir / "llama-text", name="llama-text", vocab_size=320)


def shared_once(tmp_path_factory, name: str, make) -> Path:
    """``make(path)`` run once per test run, even with ``pytest -n`` (pytest-xdist): the workers of one run
    share ``path`` under their common temporary directory, the first one builds it under a file lock and the
    others wait for it. Without xdist: ``path`` is in this session's own temporary directory."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        out = base / name
        make(out)
        return out
    from filelock import FileLock

    out, done = base.parent / name, base.parent / f"{name}.done"
    with FileLock(str(base.parent / f"{name}.lock")):
        if not done.exists():
            make(out)
            done.touch()
    return out


def _surfing_chunk_smollm2(out: Path) -> None:
    """``surfing chunk GGUF -o OUT -q`` in a fresh process, as a user runs it; its exit status and output are
    kept beside ``out`` (see :func:`smollm2_chunk_run`)."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "streaming_weights", "chunk", str(tiny.packaged_smollm2_gguf()),
                           "-o", str(out), "-q"], capture_output=True, text=True, timeout=900, cwd=out.parent,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    run = {"returncode": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}
    out.with_name(out.name + "-chunk-run.json").write_text(json.dumps(run))
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="session")
def smollm2_chunks(tmp_path_factory) -> Path:
    """The packaged SmolLM2-135M-Instruct GGUF, chunked once per test run by ``surfing chunk GGUF -q`` in a
    fresh process (dequantizing takes ~10 s; that run's output is checked by test_first_run). The default
    name drops the GGUF's ".Q4_1": SmolLM2-135M-Instruct."""
    return shared_once(tmp_path_factory, "smollm2", _surfing_chunk_smollm2)


@pytest.fixture(scope="session")
def smollm2_chunk_run(smollm2_chunks) -> dict:
    """``{"returncode", "stdout", "stderr"}`` of the ``surfing chunk GGUF -q`` run that made smollm2_chunks."""
    import json

    return json.loads(smollm2_chunks.with_name(smollm2_chunks.name + "-chunk-run.json").read_text())


@pytest.fixture(scope="session")
def smollm2_reference():
    """(model, tokenizer) that transformers loads from the original packaged GGUF (dequantized once)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = tiny.packaged_smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True,
                                                 dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    return model, tok


@pytest.fixture(scope="session")
def minilm_chunks(tmp_path_factory) -> Path:
    # its folder is "model": the default name is the card's all-MiniLM-L6-v2
    return shared_once(tmp_path_factory, "minilm", lambda out: chunk(tiny.packaged_minilm_dir(), out))


# ------------------------------------------------------------------ real S3 (rclone) and Redis servers
# Started once per session on loopback by the fixtures below (see tests/support/services.py); a missing binary
# fails the test with the install command. Tests using them carry the `s3` / `redis` markers.


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A running ``rclone serve s3``: ``.endpoint_url``, ``.access_key``, ``.secret_key``, ``.root``,
    ``.create_bucket()``, ``.backend(bucket, prefix)``, ``.env()``."""
    try:
        server = services.S3Server(tmp_path_factory.mktemp("s3") / "root").start()
    except services.ServiceUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """The URL (``redis://127.0.0.1:PORT/0``) of a running redis-server (maxmemory 512mb + allkeys-lru,
    no persistence)."""
    try:
        server = services.RedisServer(tmp_path_factory.mktemp("redis")).start()
    except services.ServiceUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    yield server.url
    server.stop()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket on the session's S3 server."""
    return s3_server.create_bucket()
