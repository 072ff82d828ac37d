"""What users type: URI normalization, TLS trust (ca_cert), the ws-to-TLS hint, and no transport tracebacks."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tests.support.servers import build_model

from streaming_weights.client.open import client_ssl_context, normalize_uri, open_unit_source
from streaming_weights.client.retry import RetryingSource, RetryPolicy
from streaming_weights.client.storage_source import StorageSource
from streaming_weights.client.transport import WebSocketSource
from streaming_weights.exceptions import ConfigurationError
from streaming_weights.server import WeightServer
from streaming_weights.storage import MemoryBackend

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("given,want", [
    ("localhost:8765", "ws://localhost:8765"),
    ("10.0.0.5:80", "ws://10.0.0.5:80"),
    ("[::1]:8765", "ws://[::1]:8765"),
    ("  ws://h:1  ", "ws://h:1"),
    ("WSS://h:1/x", "wss://h:1/x"),
    ("s3://bucket/prefix", "s3://bucket/prefix"),
    ("chunks/llama", "chunks/llama"),
    ("/abs/dir", "/abs/dir"),
])
def test_normalize_uri(given, want):
    assert normalize_uri(given) == want


@pytest.mark.parametrize("given,match", [
    ("http://host:8765", r"use ws:// or wss:// \(e\.g\. ws://host:8765\)"),
    ("https://host:8765", r"e\.g\. wss://host:8765"),
    ("ftp://host/x", "unsupported URI scheme 'ftp'"),
])
def test_http_and_unknown_schemes_are_refused(given, match):
    with pytest.raises(ConfigurationError, match=match):
        normalize_uri(given)
    with pytest.raises(ConfigurationError):
        open_unit_source(given)


def test_host_port_that_is_an_existing_directory_stays_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models:1").mkdir()
    assert normalize_uri("models:1") == "models:1"
    assert isinstance(open_unit_source("models:1"), StorageSource)
    assert isinstance(open_unit_source("localhost:9"), WebSocketSource)


def test_ca_cert_builds_a_verifying_context(tmp_path):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    ctx = client_ssl_context(tmp_path / "ca.pem")
    assert ctx.check_hostname and any(c["subject"] for c in ctx.get_ca_certs())
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(ConfigurationError, match="cannot load CA certificate"):
        client_ssl_context(tmp_path / "junk.pem")
    with pytest.raises(ConfigurationError, match="not both"):
        open_unit_source("wss://h:1", ssl_context=ctx, ca_cert=tmp_path / "ca.pem")


async def test_ca_cert_reaches_a_private_ca_server_and_ws_to_tls_fails_fast_with_a_hint(tmp_path):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    ca.issue_cert("localhost", "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "s.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    storage = MemoryBackend()
    build_model(storage, "m", {"resident": 1000})
    async with WeightServer(storage, port=0, tls_cert=tmp_path / "s.pem") as server:
        async with open_unit_source(f"localhost:{server.port}".replace("localhost", "wss://localhost"),
                                    ca_cert=tmp_path / "ca.pem") as source:
            assert await source.list_models() == ["m"]
        plain = RetryingSource(open_unit_source(f"localhost:{server.port}"), RetryPolicy(max_retries=3))
        with pytest.raises(ConfigurationError, match="the server speaks TLS: use wss://"):
            await plain.list_models()
        assert plain.retries == 0  # a wrong scheme is not worth retrying
        await plain.close()


_NO_TRACEBACK_SCRIPT = textwrap.dedent('''
    import asyncio, base64, gc, hashlib, logging
    from streaming_weights.client.retry import RetryingSource, RetryPolicy
    from streaming_weights.client.transport import WebSocketSource
    from streaming_weights.exceptions import StreamingWeightsError

    logging.basicConfig(level=logging.ERROR)  # what a user's script shows: asyncio's errors included

    accepted = None  # set by a handler once a connection arrived

    def ends_with_the_client(handler):  # a handler task still reading at exit would make asyncio log (3.11)
        async def run(reader, writer):
            try:
                await handler(reader, writer)
            except (asyncio.CancelledError, ConnectionError, asyncio.IncompleteReadError):
                pass
            writer.close()
        return run

    @ends_with_the_client
    async def silent(reader, writer):  # accepts, never answers the handshake; ends when the client hangs up
        accepted.set()
        await reader.read()

    @ends_with_the_client
    async def rude(reader, writer):  # completes the handshake, then sends a masked (invalid) frame
        accepted.set()
        head = (await reader.readuntil(b"\\r\\n\\r\\n")).decode()
        key = next(l.split(":", 1)[1].strip() for l in head.split("\\r\\n") if l.lower().startswith("sec-websocket-key"))
        accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
        writer.write(b"HTTP/1.1 101 Switching Protocols\\r\\nUpgrade: websocket\\r\\nConnection: Upgrade\\r\\n"
                     b"Sec-WebSocket-Accept: " + accept + b"\\r\\n\\r\\n" + bytes([0x82, 0x81]) + b"mask" + b"x")
        await writer.drain()
        await reader.read()

    async def main():
        global accepted
        for handler in (silent, rude):
            accepted = asyncio.Event()
            server = await asyncio.start_server(handler, "127.0.0.1", 0)
            uri = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}"
            source = RetryingSource(WebSocketSource(uri, timeout_seconds=0.3), RetryPolicy(max_retries=1, base_delay=0.01))
            try:
                await source.list_models()
            except StreamingWeightsError as exc:
                print("error:", type(exc).__name__, "masked" in str(exc))
            accepted = asyncio.Event()
            other = WebSocketSource(uri, timeout_seconds=5)
            task = asyncio.ensure_future(other.list_models())
            await accepted.wait()  # connected: cancel it mid-handshake (or mid-failure)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await source.close()
            await other.close()
            server.close()
        gc.collect()  # "exception was never retrieved" is reported when futures are collected

    asyncio.run(main())
    gc.collect()
''')


def test_no_transport_traceback_reaches_stderr():
    proc = subprocess.run([sys.executable, "-c", _NO_TRACEBACK_SCRIPT], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["error: FetchTimeoutError False", "error: ConnectionFailedError True"]
    for bad in ("Traceback", "buffer_updated", "never retrieved", "CancelledError"):
        assert bad not in proc.stderr, proc.stderr
