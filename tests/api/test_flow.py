"""Flow control with weights that arrive only when the test says so (a gated source): the first chunk is
sent before generation ends, a full queue answers 429, a client that goes away stops its row."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

pytest.importorskip("fastapi", reason="needs the `api` extra: pip install -e '.[api,dev]'")
openai = pytest.importorskip("openai", reason="needs the openai client (the `dev` extra)")

import httpx  # noqa: E402

from tests.api.conftest import api_server, metric  # noqa: E402
from tests.support.waiting import wait_until  # noqa: E402


MODEL = "tiny-chat"
PROMPT = "Once upon a time"


class Gate:
    """Lets ``allowed`` streamed-unit fetches through, then holds every further one until :meth:`open`."""

    def __init__(self) -> None:
        self.fetches = 0
        self.allowed = 1 << 30
        self.opened = threading.Event()
        self.opened.set()
        self.failing = False

    async def __call__(self, req):
        if req.op == "fetch_unit" and req.name in {u.name for u in req.manifest.streamed}:
            if self.failing:
                raise ConnectionResetError(f"injected: {req.name} is unreachable")
            self.fetches += 1
            if self.fetches > self.allowed:
                await asyncio.to_thread(self.opened.wait)
        return await req.forward()

    def hold_after(self, forwards: int, units: int) -> None:
        """Close after ``forwards`` more forward passes (cache 0: each pass fetches every unit once)."""
        self.allowed = self.fetches + forwards * units
        self.opened.clear()

    def open(self) -> None:
        self.allowed = 1 << 30
        self.opened.set()


@pytest.fixture(scope="module")
def gated(chat_llama_chunks):
    from streaming_weights import StreamingLlamaModel
    from streaming_weights.testing import FakeSource

    gate = Gate()
    m = StreamingLlamaModel(MODEL, FakeSource(gate, chunks_dir=chat_llama_chunks), cache_size=0)
    with api_server(m, window=0.01, max_batch=8, max_queue=1) as url:
        yield m, gate, url
    gate.open()
    m.close()


@pytest.fixture(scope="module")
def reference(gated):
    """Greedy tokens of PROMPT (ungated): how many forwards until the first text can be sent."""
    from streaming_weights.api.detok import RowText

    m, _, _ = gated
    ids = m.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    new = m.generate(input_ids=ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
    assert 2 not in new, "pick a prompt whose greedy continuation has no EOS in 12 tokens"
    row = RowText(m.tokenizer)
    first = next(k for k in range(1, len(new) + 1) if row.add(new[k - 1:k]))
    return first


def _metrics(url: str) -> str:
    return httpx.get(url + "/metrics").text


def test_first_chunk_arrives_while_generation_is_still_running(gated, reference):
    m, gate, url = gated
    gate.hold_after(reference, len(m.streamed_units))
    with openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60) as c:
        stream = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stream=True)
        first = next(iter(stream))
        # The weights of the next step are held: generation cannot have ended when this chunk was sent.
        assert first.choices[0].text and first.choices[0].finish_reason is None
        assert not gate.opened.is_set()
        gate.open()
        rest = list(stream)
    assert rest[-1].choices[0].finish_reason == "length"


def test_full_queue_answers_429_and_the_endpoint_lives_on(gated, reference):
    m, gate, url = gated
    gate.hold_after(reference, len(m.streamed_units))
    results: dict[str, object] = {}
    with openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60) as c:
        running = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stream=True)
        next(iter(running))  # its batch is running (blocked on weights)
        waiting = threading.Thread(target=lambda: results.setdefault(
            "b", c.completions.create(model=MODEL, prompt="hello", max_tokens=3, temperature=0)))
        waiting.start()
        wait_until(lambda: metric(_metrics(url), "surfing_api_queue_depth") == 1, what="the second request queued")
        with pytest.raises(openai.RateLimitError) as exc:
            c.completions.create(model=MODEL, prompt="third", max_tokens=3, temperature=0)
        assert exc.value.status_code == 429 and exc.value.code == "rate_limit_exceeded"
        gate.open()
        assert list(running)[-1].choices[0].finish_reason == "length"
        waiting.join(60)
    assert results["b"].choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_cancels_its_request(gated, reference, stream):
    m, gate, url = gated
    before = _metrics(url)
    cancelled0 = metric(before, "surfing_api_cancelled_requests_total")
    batches0 = metric(before, "surfing_api_batch_size_count")
    tokens0 = metric(before, "surfing_api_generated_tokens_total")
    gate.hold_after(reference, len(m.streamed_units))
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 40, "temperature": 0, "stream": stream}
    if stream:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as resp:
            next(resp.iter_lines())  # the first chunk: the row is running; then hang up
    else:
        with pytest.raises(httpx.ReadTimeout):  # the row is held on weights; give up after a moment
            httpx.post(url + "/v1/completions", json=body, timeout=httpx.Timeout(60, read=1.0))
    wait_until(lambda: metric(_metrics(url), "surfing_api_cancelled_requests_total") == cancelled0 + 1,
               what="the server noticing the disconnect")
    gate.open()
    wait_until(lambda: metric(_metrics(url), "surfing_api_batch_size_count") == batches0 + 1,
               what="the cancelled batch ending")
    # The row stopped at its next step instead of generating its 40 tokens.
    assert metric(_metrics(url), "surfing_api_generated_tokens_total") - tokens0 <= reference + 1


def test_weights_that_cannot_be_fetched_give_503_and_the_endpoint_lives_on(gated):
    _, gate, url = gated
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    gate.failing = True
    try:
        resp = httpx.post(url + "/v1/completions", json=body, timeout=120)
        with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=120) as s:
            events = [line for line in s.iter_lines() if line]
    finally:
        gate.failing = False
    assert resp.status_code == 503, resp.text
    err = resp.json()["error"]
    assert err["type"] == "server_error" and "unreachable" in err["message"]
    assert '"error"' in events[-2] and events[-1] == "data: [DONE]"
    with openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60) as c:
        assert c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0).choices[0].text


def test_stopping_ends_a_stream_in_flight_with_an_openai_error(chat_llama_chunks, reference):
    """ApiServer.stop() (what Ctrl-C does in the CLI) with a grace of 0: the held stream ends with OpenAI's
    error event (503 shape) and ``[DONE]``, not a cut connection."""
    from streaming_weights import StreamingLlamaModel
    from streaming_weights.api import ApiServer, ApiSettings, create_app
    from streaming_weights.testing import FakeSource

    gate = Gate()
    m = StreamingLlamaModel(MODEL, FakeSource(gate, chunks_dir=chat_llama_chunks), cache_size=0)
    server = ApiServer(create_app(m, settings=ApiSettings(window=0.01, shutdown_grace=0)), port=0).start()
    stopping = threading.Thread(target=server.stop)
    try:
        gate.hold_after(reference, len(m.streamed_units))
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 40, "temperature": 0, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as resp:
            lines = resp.iter_lines()
            assert next(line for line in lines if line).startswith("data: {")  # running, held on weights
            stopping.start()
            events = [line for line in lines if line]
    finally:
        gate.open()
        stopping.join(60) if stopping.ident else server.stop()
        m.close()
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert (error["type"], error["code"]) == ("server_error", "server_shutting_down"), error
    assert set(error) == {"message", "type", "param", "code"} and events[-1] == "data: [DONE]"
