"""Concurrent requests are batched: the same greedy texts as one at a time, and far fewer weight bytes per
generated token, counted by the real weight server (``surfing_server_bytes_sent_total``) with a client
cache too small to keep the model."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi", reason="needs the `api` extra: pip install -e '.[api,dev]'")
openai = pytest.importorskip("openai", reason="needs the openai client (the `dev` extra)")

import httpx  # noqa: E402

from tests.api.conftest import api_server, metric, weight_server  # noqa: E402


PROMPTS = ["The capital of France is", "My favourite recipe for soup", "In 1969, astronauts",
           "def fibonacci(n):", "The best way to learn a language", "Rain fell on the old town",
           "Photosynthesis converts", "Three reasons to exercise:"]


def _measure(chunks, name: str, *, max_tokens: int, cache_size: int) -> dict:
    from streaming_weights import StreamingLlamaModel

    def complete(client, prompt: str):
        r = client.completions.create(model=name, prompt=prompt, max_tokens=max_tokens, temperature=0)
        return r.choices[0].text, r.usage.completion_tokens

    with weight_server(chunks) as (uri, server_metrics):
        sent = lambda: metric(httpx.get(server_metrics).text, "surfing_server_bytes_sent_total")  # noqa: E731
        model = StreamingLlamaModel(name, uri, cache_size=cache_size)
        try:
            # A wide window so all 8 land in one batch even on a loaded machine.
            with api_server(model, window=0.5, max_batch=8) as url, \
                    openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600) as client:
                b0 = sent()
                sequential = [complete(client, p) for p in PROMPTS]
                b1 = sent()
                batches0 = metric(httpx.get(url + "/metrics").text, "surfing_api_batch_size_count")
                start = threading.Barrier(len(PROMPTS))

                def one(p):
                    start.wait()
                    return complete(client, p)

                with ThreadPoolExecutor(len(PROMPTS)) as pool:
                    concurrent = list(pool.map(one, PROMPTS))
                b2 = sent()
                batches = metric(httpx.get(url + "/metrics").text, "surfing_api_batch_size_count") - batches0
        finally:
            model.close()
    return {"sequential": sequential, "concurrent": concurrent, "batches": batches,
            "per_token_seq": (b1 - b0) / sum(n for _, n in sequential),
            "per_token_conc": (b2 - b1) / sum(n for _, n in concurrent)}


def _check(r: dict) -> None:
    assert [t for t, _ in r["concurrent"]] == [t for t, _ in r["sequential"]]
    assert r["batches"] <= 2, r["batches"]  # the 8 concurrent requests shared one or two generate calls
    assert r["per_token_conc"] <= 0.3 * r["per_token_seq"], (r["per_token_conc"], r["per_token_seq"])


def test_concurrent_greedy_equals_sequential_tiny_llama(chat_llama_chunks):
    _check(_measure(chat_llama_chunks, "tiny-chat", max_tokens=8, cache_size=0))


@pytest.mark.slow
def test_concurrent_greedy_equals_sequential_smollm2(smollm2_chunks):
    _check(_measure(smollm2_chunks, "SmolLM2-135M-Instruct", max_tokens=6, cache_size=2))
