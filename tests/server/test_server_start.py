"""Starting a server as a user meets it: one-line bind errors, the real listen address, and its log lines."""

from __future__ import annotations

import logging
import socket

import pytest
from tests.support.servers import build_model

from streaming_weights import protocol as proto
from streaming_weights.client.retry import RetryingSource, RetryPolicy
from streaming_weights.client.transport import WebSocketSource
from streaming_weights.exceptions import AuthenticationError, ConfigurationError, NotFoundError
from streaming_weights.server import WeightServer
from streaming_weights.storage import MemoryBackend

LOG = "streaming_weights.server"


@pytest.fixture
def storage():
    st = MemoryBackend()
    build_model(st, "m", {"resident": 500, "layer.0": 800})
    return st


async def test_port_in_use_and_bad_host_are_one_line_configuration_errors(storage):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigurationError, match=f"^port {port} is in use"):
            await WeightServer(storage, port=port).start()
    with pytest.raises(ConfigurationError, match="cannot listen on host 'no-such-host.invalid'"):
        await WeightServer(storage, host="no-such-host.invalid", port=0).start()


async def test_wildcard_bind_logs_the_real_address_and_warns_without_a_token(storage, caplog, monkeypatch):
    monkeypatch.delenv("SURFING_TOKEN", raising=False)
    caplog.set_level(logging.INFO, logger=LOG)
    async with WeightServer(storage, host="0.0.0.0", port=0) as server:
        assert server.listen_uri == f"ws://0.0.0.0:{server.port}"
        assert server.uri == f"ws://localhost:{server.port}"  # what a local client connects to
    text = caplog.text
    assert f"on ws://0.0.0.0:{server.port}" in text and "localhost" not in text
    assert any(r.levelno == logging.WARNING and "without a token" in r.getMessage() for r in caplog.records)
    caplog.clear()
    async with WeightServer(storage, port=0, token=""):
        pass
    assert "without a token" not in caplog.text  # loopback only: nobody else can reach it


async def test_one_log_line_per_connection_rejected_token_and_failed_request(storage, caplog):
    caplog.set_level(logging.INFO, logger=LOG)
    async with WeightServer(storage, port=0, token="right") as server:
        async with RetryingSource(WebSocketSource(server.uri, token="wrong"), RetryPolicy(max_retries=0)) as bad:
            with pytest.raises(AuthenticationError):
                await bad.list_models()
        async with WebSocketSource(server.uri, token="right") as good:
            manifest = await good.get_manifest(None)
            with pytest.raises(NotFoundError):
                await good._request(proto.Op.GET_UNIT, "m", "layer.7")
            assert (await good.fetch_unit(manifest, "layer.0")).nbytes > 0
    messages = [r.getMessage() for r in caplog.records if r.name == LOG]
    assert sum(m.startswith("connection from 127.0.0.1") for m in messages) == 1  # the refused one is not counted
    assert sum("rejected connection from 127.0.0.1" in m and "invalid bearer token" in m for m in messages) == 1
    assert sum("get_unit" in m and "failed" in m and "layer.7" in m for m in messages) == 1
