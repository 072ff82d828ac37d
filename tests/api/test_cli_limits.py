"""``surfing api`` bounds what one request may cost, as a user meets it (a subprocess over a real weight server,
the official openai client): a chat without ``max_tokens`` gets the documented default instead of running to the
end of the context, and a request that does not fit the context is OpenAI's 400, never truncated."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi", reason="needs the `api` extra: pip install -e '.[api,dev]'")
openai = pytest.importorskip("openai", reason="needs the openai client (the `dev` extra)")

import httpx  # noqa: E402

from tests.api.conftest import llama_with, surfing_api, surfing_api_here  # noqa: E402
from tests.support.servers import start_server_process  # noqa: E402

CONTEXT = 1024  # tiny-long: room for far more than the 256-token default
GEN_MAX_NEW = 7  # tiny-gen: its generation_config.json says max_new_tokens 7
ASK = [{"role": "user", "content": "Once upon a time"}]


@pytest.fixture(scope="module")
def weights(workdir):
    """A weight server process hosting tiny-long and tiny-gen; yields its ws:// URI."""
    root = workdir / "api-limits"
    if not root.exists():
        llama_with(root / "tiny-long", "tiny-long", context=CONTEXT)
        llama_with(root / "tiny-gen", "tiny-gen", generation={"max_new_tokens": GEN_MAX_NEW})
    proc, port = start_server_process(root)
    try:
        yield f"ws://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.communicate(timeout=60)


@pytest.fixture(scope="module")
def long_api(weights):
    with surfing_api("--server", weights, "--model", "tiny-long") as api:
        yield api


def _chat(api, model, messages=ASK, **kw):
    with api.client() as c:
        return c.chat.completions.create(model=model, messages=messages, temperature=0, **kw)


def test_chat_without_max_tokens_stops_at_the_default_cap(long_api):
    out = _chat(long_api, "tiny-long")
    assert out.usage.prompt_tokens + 256 < CONTEXT  # the old behaviour would have run past 256
    assert (out.usage.completion_tokens, out.choices[0].finish_reason) == (256, "length")
    # Near the end of the context the default shrinks to what is left instead of refusing the request.
    near = [{"role": "user", "content": "hello world " * 125}]
    out = _chat(long_api, "tiny-long", near)
    left = CONTEXT - out.usage.prompt_tokens
    assert 0 < left < 256, out.usage
    assert (out.usage.completion_tokens, out.choices[0].finish_reason) == (left, "length")


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "hello world " * 1000, "max_tokens": 4}, "prompt"),
    ("/v1/completions", {"prompt": "hello world " * 1000}, "prompt"),
    ("/v1/completions", {"prompt": [5] * (CONTEXT - 10), "max_tokens": 11}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello world " * 1000}]}, "messages"),
    ("/v1/chat/completions", {"messages": ASK, "max_tokens": CONTEXT}, "messages"),
])
def test_input_beyond_the_context_is_an_openai_400(long_api, path, body, param):
    resp = httpx.post(long_api.url + path, json={"model": "tiny-long", "temperature": 0, **body}, timeout=120)
    assert resp.status_code == 400, resp.text
    assert resp.json() == {"error": {"message": resp.json()["error"]["message"], "type": "invalid_request_error",
                                     "param": param, "code": "context_length_exceeded"}}
    assert f"maximum context length is {CONTEXT} tokens" in resp.json()["error"]["message"]


def test_the_openai_client_sees_the_context_400_and_the_server_keeps_serving(long_api):
    with long_api.client() as c, pytest.raises(openai.BadRequestError) as exc:
        c.chat.completions.create(model="tiny-long", messages=[{"role": "user", "content": "hello world " * 1000}])
    assert exc.value.code == "context_length_exceeded" and exc.value.param == "messages"
    assert _chat(long_api, "tiny-long", max_tokens=3).usage.completion_tokens == 3


@pytest.mark.parametrize("flag, want", [((), GEN_MAX_NEW), (("--default-max-tokens", "5"), 5)])
def test_the_default_follows_the_generation_config_unless_the_flag_says(weights, flag, want):
    with surfing_api_here("--server", weights, "--model", "tiny-gen", *flag) as api:
        out = _chat(api, "tiny-gen")
        explicit = _chat(api, "tiny-gen", max_tokens=12)  # an explicit max_tokens is never capped by the default
    assert (out.usage.completion_tokens, out.choices[0].finish_reason) == (want, "length")
    assert explicit.usage.completion_tokens == 12
