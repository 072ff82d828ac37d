"""``surfing api`` around its requests, as a user runs it (a subprocess, a real weight server process, the
official openai client): ``/healthz`` says when the weights are unreachable and recovers when they come back;
Ctrl-C / SIGTERM with a request in flight lets it finish within the grace, or answers it with OpenAI's 503, and
the command prints one line instead of a traceback.

A request is held in flight by pausing the bytes between the weight server and the API (a fault proxy) while
the API streams every layer (``--cache-size 0``): the test decides when its weights arrive."""

from __future__ import annotations

import signal
import socket
import threading

import pytest

pytest.importorskip("fastapi", reason="needs the `api` extra: pip install -e '.[api,dev]'")
openai = pytest.importorskip("openai", reason="needs the openai client (the `dev` extra)")

import httpx  # noqa: E402

from tests.api.conftest import metric, surfing_api  # noqa: E402
from tests.support.faultproxy import FaultProxy  # noqa: E402
from tests.support.servers import start_server_process  # noqa: E402
from tests.support.waiting import wait_until  # noqa: E402

MODEL = "tiny-chat"
ASK = [{"role": "user", "content": "Once upon a time"}]


def _stop_server(proc) -> None:
    if proc.poll() is None:
        proc.terminate()
    proc.communicate(timeout=60)


def test_healthz_reports_an_unreachable_weight_server_and_recovers(chat_llama_chunks):
    server, port = start_server_process(chat_llama_chunks)
    try:
        with surfing_api("--server", f"ws://127.0.0.1:{port}", "--model", MODEL) as api:
            ok = httpx.get(api.url + "/healthz", timeout=60)
            assert (ok.status_code, ok.json()) == (200, {"status": "ok", "model": MODEL})
            _stop_server(server)
            down = httpx.get(api.url + "/healthz", timeout=60)
            assert down.status_code == 503, down.text
            assert down.json()["status"] == "unavailable" and f"127.0.0.1:{port}" in down.json()["reason"]
            server, _ = start_server_process(chat_llama_chunks, port=port)  # the same server, back on its port
            wait_until(lambda: httpx.get(api.url + "/healthz", timeout=60).status_code == 200, timeout=60,
                       what="/healthz ok once the weight server is back")
            with api.client() as c:
                out = c.chat.completions.create(model=MODEL, messages=ASK, max_tokens=3, temperature=0)
            assert out.usage.completion_tokens == 3
    finally:
        _stop_server(server)


@pytest.fixture
def proxied(chat_llama_chunks):
    """A weight server process behind a fault proxy: yields the proxy (``ws://127.0.0.1:{proxy.port}``)."""
    server, port = start_server_process(chat_llama_chunks)
    try:
        with FaultProxy(port) as proxy:
            yield proxy
    finally:
        _stop_server(server)


def _in_flight_request(api, proxy: FaultProxy) -> tuple[threading.Thread, dict]:
    """Pause the weights, send one chat request from a thread, and return once the API holds it in flight."""
    result: dict = {}

    def ask() -> None:
        with api.client() as c:
            try:
                result["reply"] = c.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, temperature=0)
            except openai.APIError as exc:
                result["error"] = exc

    proxy.pause()
    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    wait_until(lambda: metric(httpx.get(api.url + "/metrics", timeout=60).text,
                              "surfing_api_requests_in_flight") == 1, timeout=60, what="the request in flight")
    return thread, result


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _one_clean_line(out: str, err: str) -> str:
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert "Traceback" not in err + out, err
    assert len(lines) == 2 and lines[0].startswith("serving "), lines  # the start line, then the stop line
    return lines[1]


def test_ctrl_c_lets_the_request_in_flight_finish_within_the_grace(proxied):
    with surfing_api("--server", f"ws://127.0.0.1:{proxied.port}", "--model", MODEL, "--cache-size", "0",
                     "--shutdown-grace", "300") as api:
        thread, result = _in_flight_request(api, proxied)
        api.proc.send_signal(signal.SIGINT)
        wait_until(lambda: not _listening(api.port), timeout=60, what="the API to stop taking connections")
        proxied.resume()  # the weights arrive while the server drains
        thread.join(120)
        rc, out, err = api.wait()
    assert "error" not in result, result
    assert result["reply"].usage.completion_tokens >= 1 and result["reply"].choices[0].finish_reason
    assert rc == 0, err
    assert _one_clean_line(out, err) == "stopped (SIGINT): 1 request in flight, 1 finished"


def test_sigterm_past_the_grace_answers_the_request_in_flight_with_a_503(proxied):
    with surfing_api("--server", f"ws://127.0.0.1:{proxied.port}", "--model", MODEL, "--cache-size", "0",
                     "--shutdown-grace", "0") as api:
        thread, result = _in_flight_request(api, proxied)
        api.proc.send_signal(signal.SIGTERM)
        thread.join(120)  # answered while its weights are still held back
        rc, out, err = api.wait()  # and the command ends although they never arrive
    exc = result.get("error")
    assert isinstance(exc, openai.InternalServerError), (result, out, err)
    assert exc.status_code == 503 and exc.code == "server_shutting_down" and exc.type == "server_error"
    assert set(exc.body) == {"message", "type", "param", "code"}, exc.body
    assert rc == 0, err
    assert _one_clean_line(out, err) == "stopped (SIGTERM): 1 request in flight, 1 cancelled with a 503"


def test_a_second_ctrl_c_cancels_at_once(proxied):
    with surfing_api("--server", f"ws://127.0.0.1:{proxied.port}", "--model", MODEL, "--cache-size", "0",
                     "--shutdown-grace", "300") as api:
        thread, result = _in_flight_request(api, proxied)
        api.proc.send_signal(signal.SIGINT)
        wait_until(lambda: not _listening(api.port), timeout=60, what="the API to stop taking connections")
        api.proc.send_signal(signal.SIGINT)  # do not wait out the 300 s grace
        thread.join(120)
        rc, out, err = api.wait()
    exc = result.get("error")
    assert isinstance(exc, openai.InternalServerError) and exc.code == "server_shutting_down", result
    assert rc == 0, err
    assert _one_clean_line(out, err) == "stopped (SIGINT twice: no grace): 1 request in flight, 1 cancelled with a 503"
