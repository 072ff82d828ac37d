"""Issue 19, the CLI as a new user meets it: each item driven through ``surfing`` in a fresh process,
stderr checked for the absence of tracebacks."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess

import pytest

from streaming_weights.format import MANIFEST_FILE, Manifest
from streaming_weights.netutil import free_port, wait_for_port

from tests.cli.helpers import SURFING, assert_one_line_error, surfing, surfing_here
from tests.support.streaming import served


def _manifest(d) -> Manifest:
    return Manifest.from_bytes((d / MANIFEST_FILE).read_bytes())


# ------------------------------------------------------------------ 2: default name, default output, --force
def test_chunk_names_the_model_after_the_source_and_refuses_to_replace_another(tiny_source, tmp_path, capfd):
    llama = shutil.copytree(tiny_source("llama", layers=2), tmp_path / "my-llama")
    bert = shutil.copytree(tiny_source("bert", layers=2), tmp_path / "my-bert")
    res = surfing_here(capfd, "chunk", llama, cwd=tmp_path)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    assert _manifest(tmp_path / "chunks" / "my-llama").name == "my-llama"  # not the path as typed

    refused = surfing_here(capfd, "chunk", bert, "-o", "chunks/my-llama", cwd=tmp_path)
    assert_one_line_error(refused, "my-llama", "--force")
    assert "force=True" not in refused.stderr  # CLI words, not the Python API's
    assert _manifest(tmp_path / "chunks" / "my-llama").name == "my-llama"  # untouched

    forced = surfing_here(capfd, "chunk", bert, "-o", "chunks/my-llama", "--force", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    m = _manifest(tmp_path / "chunks" / "my-llama")
    assert m.name == "my-bert"
    on_disk = {p.name for p in (tmp_path / "chunks" / "my-llama" / "units").iterdir()}
    assert on_disk == {u.path.rsplit("/", 1)[-1] for u in m.units}  # the old model's units are gone


# ------------------------------------------------------------------ 4: one-line errors, closed pipe
def test_serve_on_a_port_in_use_or_a_bad_host_is_one_line(tiny_chunks, capfd):
    _, chunks = tiny_chunks("llama")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert_one_line_error(surfing("serve", "-d", chunks, "--port", port), f"port {port} is in use")
    assert_one_line_error(surfing_here(capfd, "serve", "-d", chunks, "--host", "no-such-host.invalid", "--port", "0"),
                          "no-such-host.invalid")


def test_generate_on_an_encoder_says_use_embed(tiny_chunks, capfd):
    _, chunks = tiny_chunks("bert")
    assert_one_line_error(surfing_here(capfd, "generate", "--server", chunks, "--prompt", "hi"),
                          "is an encoder model", "use surfing embed")


def test_max_new_tokens_zero_is_a_usage_error():
    res = surfing("generate", "--server", "localhost:1", "--prompt", "hi", "--max-new-tokens", "0")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "--max-new-tokens: must be >= 1" in res.stderr


def test_inspect_into_a_closed_pipe_exits_cleanly(tiny_chunks):
    _, chunks = tiny_chunks("llama")
    proc = subprocess.Popen([*SURFING, "inspect", str(chunks)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first line is written (`| head` that already quit)
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(120) == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err and "Exception ignored" not in err


def test_unexpected_errors_are_one_line_and_v_shows_the_traceback(tmp_path):
    missing = tmp_path / "nothing-here"
    plain = surfing("inspect", missing)
    assert_one_line_error(plain, "nothing-here")
    verbose = surfing("inspect", missing, "-v")
    assert verbose.returncode == 2 and "Traceback" in verbose.stderr


# ------------------------------------------------------------------ 5: --quiet, non-TTY progress
def test_progress_in_a_log_file_is_a_few_plain_lines(tiny_source, tmp_path, capfd):
    # stderr is not a TTY (as in a log file); `surfing chunk` in a fresh process: test_cli_chunk_and_inspect
    logged = surfing_here(capfd, "chunk", tiny_source("llama"), "-o", tmp_path / "a", cwd=tmp_path)
    assert logged.returncode == 0, logged.stderr
    assert "\r" not in logged.stderr
    assert re.search(r"^chunking: \d+/\d+ units", logged.stderr, flags=re.M)
    assert 0 < len(logged.stderr.splitlines()) <= 5


def test_quiet_silences_every_bar_including_transformers(smollm2_chunks, smollm2_chunk_run):
    """``surfing chunk SmolLM2.gguf -o DIR -q`` in a fresh process: the run that made the session's SmolLM2
    chunks (tests/conftest.py), so the GGUF is dequantized once per test run."""
    assert smollm2_chunk_run["returncode"] == 0, smollm2_chunk_run["stderr"]
    # neither the chunker's bar nor transformers' GGUF / loading bars
    assert smollm2_chunk_run["stderr"].strip() == ""
    # issue 23: no summary either
    assert smollm2_chunk_run["stdout"] == "" and (smollm2_chunks / "manifest.json").is_file()


# ------------------------------------------------------------------ 6: answer alone on stdout
def test_generate_writes_the_answer_alone_to_stdout(llama_text_chunks):
    """A fresh process on the tiny text model (the demo and `surfing chat` run real SmolLM2 answers)."""
    from streaming_weights import StreamingBaseModel

    res = surfing("generate", "--server", llama_text_chunks, "--prompt", "tell me a story", "--chat",
                  "--max-new-tokens", "6", "--cache-size", "30")
    assert res.returncode == 0, res.stderr
    with StreamingBaseModel(None, str(llama_text_chunks), 30) as m:
        want = m.generate_text("tell me a story", chat=True, max_new_tokens=6, do_sample=False)
    assert res.stdout == want + "\n"  # the answer, and nothing else
    assert "tokens in" not in res.stdout and "cache" not in res.stdout
    stats = [ln for ln in res.stderr.splitlines() if ln.startswith("[6 tokens in")]
    assert len(stats) == 1, res.stderr  # on a line of its own


def test_a_warning_during_streamed_output_starts_on_a_fresh_line(capsys):
    import logging

    from streaming_weights.cli import output

    restore = output.configure(type("Args", (), {"verbose": 0, "quiet": False})())
    try:
        output.write_stdout("The capital")
        logging.getLogger("streaming_weights.client").warning("retrying")
        output.write_stdout(" is Paris.\n")
    finally:
        restore()
    captured = capsys.readouterr()
    assert captured.out == "The capital is Paris.\n"
    assert captured.err.startswith("\n") and "WARNING: retrying\n" in captured.err


# ------------------------------------------------------------------ 7 + 8: CLI words, client options
def test_cli_errors_use_the_cli_flags(tiny_chunks, tmp_path, capfd):
    both = tmp_path / "two-models"
    for kind in ("llama", "bert"):
        shutil.copytree(tiny_chunks(kind)[1], both / kind)
    line = assert_one_line_error(surfing_here(capfd, "generate", "--server", both, "--prompt", "hi"),
                                 "pass --model")
    assert "model_name" not in line

    _, chunks = tiny_chunks("llama")
    with served(chunks, token="s3cret") as uri:
        host_port = uri.removeprefix("ws://")
        line = assert_one_line_error(surfing_here(capfd, "inspect", host_port), "--token")
        assert "token=" not in line


def test_client_token_file_host_port_and_http_rejected(tiny_chunks, tmp_path, capfd):
    _, chunks = tiny_chunks("llama")
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    with served(chunks, token="s3cret") as uri:
        host_port = uri.removeprefix("ws://")  # host:port means ws://host:port, not a directory
        res = surfing_here(capfd, "inspect", host_port, "--token-file", token_file, "--json")
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["name"] == "llama"
    assert_one_line_error(surfing_here(capfd, "generate", "--server", f"http://{host_port}", "--prompt", "hi"),
                          "ws://")
    empty = tmp_path / "empty"
    empty.write_text("")
    assert_one_line_error(surfing_here(capfd, "inspect", host_port, "--token-file", empty), "--token-file", "empty")


def test_ca_cert_trusts_a_private_ca(tiny_chunks, tmp_path, capfd):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_pem, key_pem, ca_pem = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_pem))
    cert.private_key_pem.write_to_path(str(key_pem))
    ca.cert_pem.write_to_path(str(ca_pem))
    _, chunks = tiny_chunks("llama")
    with served(chunks, tls_cert=str(cert_pem), tls_key=str(key_pem)) as uri:
        ok = surfing_here(capfd, "inspect", uri, "--ca-cert", ca_pem, "--json")
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout)["name"] == "llama"
        untrusted = surfing_here(capfd, "inspect", uri)
        assert untrusted.returncode == 2 and "Traceback" not in untrusted.stderr
        assert "--ca-cert" in untrusted.stderr


# ------------------------------------------------------------------ 9: serve's address and warning
def test_serve_beyond_loopback_without_a_token_prints_the_real_address_and_warns(tiny_chunks):
    _, chunks = tiny_chunks("llama")
    port = free_port()
    proc = subprocess.Popen([*SURFING, "serve", "-d", str(chunks), "--host", "0.0.0.0", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        wait_for_port(port, proc=proc)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert f"ws://0.0.0.0:{port}" in line and "NO auth" in line
    assert "localhost" not in line
    assert re.search(r"WARNING: listening beyond loopback .* without a token", err), err
    assert "Traceback" not in err


def test_serve_takes_the_directory_as_an_argument(tiny_chunks, capfd):
    """`surfing serve ./chunks` (what a new user types) serves like `--chunks-dir ./chunks`."""
    _, chunks = tiny_chunks("llama")
    port = free_port()
    proc = subprocess.Popen([*SURFING, "serve", str(chunks), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        wait_for_port(port, proc=proc)
        listed = surfing_here(capfd, "inspect", f"ws://127.0.0.1:{port}")
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
    assert f"ws://127.0.0.1:{port}" in line, line
    assert listed.returncode == 0 and "LlamaForCausalLM" in listed.stdout, listed.stderr
    assert_one_line_error(surfing_here(capfd, "serve", str(chunks), "-d", "/elsewhere", "--port", "0"),
                          "two chunk directories")


# ------------------------------------------------------------------ 13: chat keeps the KV cache
def test_chat_answers_two_turns_reusing_the_kv_cache(smollm2_chunks):
    res = surfing("chat", "--server", smollm2_chunks, "--cache-size", "30", "--max-new-tokens", "12", "-v",
                  "--system", "Answer in one short sentence.",
                  input="What is the capital of France?\nAnd the capital of Germany?\n")
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr and "deprecated" not in res.stderr
    assert "Paris" in res.stdout and "Berlin" in res.stdout
    turns = dict(re.findall(r"turn (\d): (\d+) prompt tokens reused", res.stderr))
    assert turns["1"] == "0" and int(turns["2"]) > 20, res.stderr  # turn 1 (system + question) not recomputed
