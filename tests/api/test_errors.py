"""Bad requests get OpenAI-shaped errors with the right status, and the endpoint keeps serving."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi", reason="needs the `api` extra: pip install -e '.[api,dev]'")
openai = pytest.importorskip("openai", reason="needs the openai client (the `dev` extra)")

import httpx  # noqa: E402

from tests.api.conftest import api_server  # noqa: E402


MODEL = "tiny-chat"


@pytest.fixture(scope="module")
def model(chat_llama_chunks):
    from streaming_weights import StreamingLlamaModel

    m = StreamingLlamaModel(MODEL, str(chat_llama_chunks), cache_size=8)
    yield m
    m.close()


@pytest.fixture(scope="module")
def api(model):
    with api_server(model, window=0.01) as url:
        yield url


@pytest.fixture(scope="module")
def secured(model):
    with api_server(model, window=0.01, tokens=["s3cret", "other-token"]) as url:
        yield url


def _client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def _error(resp: httpx.Response) -> dict:
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


@pytest.mark.parametrize("extra, param", [
    ({"n": 2}, "n"),
    ({"temperature": 3}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"echo": True}, "echo"),
    ({"logprobs": 2}, "logprobs"),
    ({"frobnicate": 1}, "frobnicate"),
    ({"max_tokens": 10_000}, "prompt"),
    ({"prompt": [5, 99999]}, "prompt"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
])
def test_invalid_parameters_are_400_with_the_param(api, extra, param):
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 3, **extra}
    resp = httpx.post(api + "/v1/completions", json=body, timeout=60)
    assert resp.status_code == 400, resp.text
    err = _error(resp)
    assert err["type"] == "invalid_request_error" and err["param"] == param, err


def test_the_openai_client_sees_bad_request_and_not_found(api):
    with _client(api) as c:
        with pytest.raises(openai.BadRequestError) as bad:
            c.completions.create(model=MODEL, prompt="hi", n=3)
        assert bad.value.status_code == 400 and "n" in bad.value.message
        with pytest.raises(openai.NotFoundError) as nf:
            c.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
        assert nf.value.code == "model_not_found"
        with pytest.raises(openai.BadRequestError):
            c.embeddings.create(model=MODEL, input="an encoder-only endpoint")
        # still serving after all of them
        assert c.completions.create(model=MODEL, prompt="hi", max_tokens=2, temperature=0).choices


def test_malformed_json_and_unknown_route(api):
    resp = httpx.post(api + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert resp.status_code == 400 and _error(resp)["type"] == "invalid_request_error"
    resp = httpx.get(api + "/v1/nothing-here")
    assert resp.status_code == 404 and _error(resp)["code"] == "not_found"
    resp = httpx.post(api + "/v1/chat/completions", json={"model": MODEL, "messages": []})
    assert resp.status_code == 400 and _error(resp)["param"] == "messages"
    resp = httpx.post(api + "/v1/chat/completions",
                      json={"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]})
    assert resp.status_code == 400 and "text" in _error(resp)["message"]


def test_token_file_auth_is_401_without_a_valid_bearer(secured):
    for key in ("wrong", "s3cre", "s3cret2"):
        with _client(secured, key) as c, pytest.raises(openai.AuthenticationError) as exc:
            c.models.list()
        assert exc.value.status_code == 401 and exc.value.code == "invalid_api_key"
    resp = httpx.post(secured + "/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer"
    assert _error(resp)["type"] == "authentication_error"
    for key in ("s3cret", "other-token"):
        with _client(secured, key) as c:
            assert [m.id for m in c.models.list().data] == [MODEL]
    assert httpx.get(secured + "/healthz").json()["status"] == "ok"  # health needs no token


def test_metrics_count_requests_and_tokens(api):
    with _client(api) as c:
        c.completions.create(model=MODEL, prompt="metrics", max_tokens=4, temperature=0)
    text = httpx.get(api + "/metrics").text
    assert 'surfing_api_requests_total{endpoint="/v1/completions",status="200"}' in text
    assert "surfing_api_generated_tokens_total" in text and "surfing_api_batch_size_bucket" in text
    assert "surfing_api_weight_bytes_per_token" in text
