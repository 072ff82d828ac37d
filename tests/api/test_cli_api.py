"""``surfing api`` as a user runs it: a subprocess over a chunk directory, with --token-file."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("fastapi", reason="needs the `api` extra: pip install -e '.[api,dev]'")
openai = pytest.importorskip("openai", reason="needs the openai client (the `dev` extra)")


from streaming_weights.netutil import free_port, wait_for_port  # noqa: E402


def test_surfing_api_serves_with_token_file(chat_llama_chunks, tmp_path):
    token = tmp_path / "api-token"
    token.write_text("  tok-123\n")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "streaming_weights", "api", "--server", str(chat_llama_chunks), "--model", "tiny-chat",
         "--port", str(port), "--token-file", str(token), "--cache-size", "1", "--memory", "auto"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, timeout=120, proc=proc)
        url = f"http://127.0.0.1:{port}/v1"
        with openai.OpenAI(base_url=url, api_key="tok-123", max_retries=0, timeout=60) as c:
            out = c.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=4, temperature=0)
            assert out.choices[0].finish_reason in ("stop", "length")
        with openai.OpenAI(base_url=url, api_key="nope", max_retries=0, timeout=60) as c, \
                pytest.raises(openai.AuthenticationError):
            c.models.list()
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode in (0, -15), out.decode(errors="replace")
    assert f"at http://127.0.0.1:{port}/v1 (bearer token auth)" in out.decode()
