"""Per-model tokens: a token sees only its models, and a model it may not read looks exactly like one that
does not exist; the token file is re-read on SIGHUP; manifests are served verbatim, signatures by their own op."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from streaming_weights import protocol as proto
from streaming_weights.exceptions import ConfigurationError
from streaming_weights.format.signing import SIGNATURE_FILE
from streaming_weights.server import WeightServer
from streaming_weights.server.access import AccessList, Grant, parse_token_file
from streaming_weights.storage import FilesystemBackend, MemoryBackend

from tests.server.test_server import collect
from tests.support.servers import build_model, start_server_process
from tests.support.streaming import RESCAN
from tests.support.waiting import eventually

TOKENS = """\
# comments and blank lines are ignored

root-token
alpha-token alpha
pair-token\talpha, beta
"""


@pytest.fixture
def three_models():
    storage = MemoryBackend()
    for name in ("alpha", "beta", "gamma-secret"):
        build_model(storage, name, {"resident": 500, "model.layers.0": 2000}, prefix=name)
    return storage


async def ask(uri: str, token: str, *requests: tuple) -> list[proto.Message]:
    """Send each (op, model, name) on one connection; return the RESULT/ERROR of each (blob bytes dropped)."""
    async with connect(uri, max_size=None, compression=None,
                       additional_headers={"Authorization": f"Bearer {token}"}) as ws:
        out = []
        for rid, (op, model, name) in enumerate(requests, 1):
            await ws.send(proto.encode(proto.Request(rid, op, model, name)))
            out.append((await collect(ws, rid))[0])
        return out


def test_token_file_lines(tmp_path):
    entries = dict(parse_token_file(TOKENS, "t"))
    assert entries == {"root-token": Grant(None), "alpha-token": Grant(frozenset({"alpha"})),
                       "pair-token": Grant(frozenset({"alpha", "beta"}))}
    with pytest.raises(ConfigurationError, match="line 1: separate models with commas"):
        parse_token_file("tok alpha beta", "t")
    with pytest.raises(ConfigurationError, match="holds no token"):
        parse_token_file("# nothing\n", "t")
    access = AccessList(token_file=_write(tmp_path, TOKENS))
    assert access.grant_for("alpha-token") == Grant(frozenset({"alpha"}))
    assert access.grant_for("alpha-token ") is None and access.grant_for("") is None
    assert access.grant_for("root-token").everything


async def test_a_token_sees_only_its_models_and_the_others_look_like_missing_ones(three_models, tmp_path):
    async with WeightServer(three_models, port=0, rescan_interval=RESCAN, token_file=_write(tmp_path, TOKENS)) as server:
        listing, own, other, missing, unit, implicit = await ask(
            server.uri, "alpha-token", (proto.Op.LIST_MODELS, None, None), (proto.Op.GET_MANIFEST, "alpha", None),
            (proto.Op.GET_MANIFEST, "gamma-secret", None), (proto.Op.GET_MANIFEST, "nope", None),
            (proto.Op.GET_UNIT, "beta", "model.layers.0"), (proto.Op.GET_MANIFEST, None, None))
        assert listing.body == {"models": ["alpha"]}
        assert isinstance(own, proto.Result) and isinstance(implicit, proto.Result)  # one visible model: the default
        for err, name in ((other, "gamma-secret"), (unit, "beta")):
            assert isinstance(err, proto.Error) and err.code == missing.code == "not_found"
            assert err.message == missing.message.replace("'nope'", repr(name))  # the same answer, word for word
            assert "beta" not in missing.message and "gamma" not in missing.message
        listing, none_given = await ask(server.uri, "pair-token", (proto.Op.LIST_MODELS, None, None),
                                        (proto.Op.GET_MANIFEST, None, None))
        assert listing.body == {"models": ["alpha", "beta"]}
        assert "gamma" not in none_given.message and "'alpha', 'beta'" in none_given.message
        (listing,) = await ask(server.uri, "root-token", (proto.Op.LIST_MODELS, None, None))
        assert listing.body == {"models": ["alpha", "beta", "gamma-secret"]}
        with pytest.raises(InvalidStatus) as info:
            await ask(server.uri, "wrong-token")
        assert info.value.response.status_code == 403


async def test_healthz_and_metrics_do_not_leak_model_names(three_models, tmp_path):
    async with WeightServer(three_models, port=0, rescan_interval=RESCAN, token_file=_write(tmp_path, TOKENS)) as server:
        def get(path, token=None):
            import http.client

            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
            resp = conn.getresponse()
            return resp.status, resp.read()

        status, body = await asyncio.to_thread(get, "/healthz")
        assert status == 200 and json.loads(body)["models"] == []
        status, body = await asyncio.to_thread(get, "/healthz", "alpha-token")
        assert json.loads(body)["models"] == ["alpha"]
        assert (await asyncio.to_thread(get, "/metrics"))[0] == 401
        assert (await asyncio.to_thread(get, "/metrics", "alpha-token"))[0] == 403  # metrics name every model
        status, body = await asyncio.to_thread(get, "/metrics", "root-token")
        assert status == 200 and b"surfing_server" in body


async def test_reload_changes_grants_of_open_connections_and_closes_revoked_ones(three_models, tmp_path):
    path = _write(tmp_path, TOKENS)
    async with WeightServer(three_models, port=0, rescan_interval=RESCAN, token_file=path) as server:
        headers = {"Authorization": "Bearer alpha-token"}
        async with connect(server.uri, compression=None, additional_headers=headers) as kept, \
                connect(server.uri, compression=None, additional_headers={"Authorization": "Bearer pair-token"}) as gone:
            path.write_text("alpha-token beta\nroot-token\n")
            server.reload_access()
            await kept.send(proto.encode(proto.Request(1, proto.Op.LIST_MODELS)))
            assert (await collect(kept, 1))[0].body == {"models": ["beta"]}
            with pytest.raises(ConnectionClosed) as info:
                await gone.recv()
            assert info.value.rcvd.code == 1008
        path.write_text("broken line with spaces, x y\n")
        with pytest.raises(ConfigurationError):
            server.reload_access()
        (listing,) = await ask(server.uri, "alpha-token", (proto.Op.LIST_MODELS, None, None))
        assert listing.body == {"models": ["beta"]}  # a bad file keeps the previous tokens


async def test_sighup_rereads_the_token_file_of_a_running_server(tmp_path):
    chunks = tmp_path / "chunks"
    for name in ("alpha", "beta"):
        build_model(FilesystemBackend(chunks), name, {"resident": 500, "model.layers.0": 2000}, prefix=name)
    path = _write(tmp_path, "tok alpha\n")
    proc, port = start_server_process(chunks, "--token-file", str(path), stdout=subprocess.DEVNULL)
    try:
        uri = f"ws://127.0.0.1:{port}"
        (listing,) = await ask(uri, "tok", (proto.Op.LIST_MODELS, None, None))
        assert listing.body == {"models": ["alpha"]}
        path.write_text("tok beta\nnew-token\n")
        proc.send_signal(signal.SIGHUP)

        async def reloaded():
            try:
                return (await ask(uri, "new-token", (proto.Op.LIST_MODELS, None, None)))[0].body
            except InvalidStatus:
                return None

        assert await eventually(reloaded, what="the server to reload its token file") == {"models": ["alpha", "beta"]}
        (listing,) = await ask(uri, "tok", (proto.Op.LIST_MODELS, None, None))
        assert listing.body == {"models": ["beta"]}
        assert proc.poll() is None  # SIGHUP reloads; it does not stop the server
    finally:
        proc.terminate()
        proc.wait(30)


async def test_manifest_served_verbatim_and_signature_by_its_own_op(tmp_path):
    storage = MemoryBackend()
    build_model(storage, "m", {"resident": 500, "model.layers.0": 2000})
    stored = json.dumps(json.loads(await storage.load("manifest.json")), indent=7).encode()  # unusual formatting
    await storage.save("manifest.json", stored)
    async with WeightServer(storage, port=0, rescan_interval=RESCAN) as server:
        async with connect(server.uri, max_size=None, compression=None) as ws:
            await ws.send(proto.encode(proto.Request(1, proto.Op.GET_MANIFEST, "m")))
            assert (await collect(ws, 1))[1] == stored
            await ws.send(proto.encode(proto.Request(2, proto.Op.GET_SIGNATURE, "m")))
            err = (await collect(ws, 2))[0]
            assert isinstance(err, proto.Error) and err.code == "not_found" and "not signed" in err.message
    await storage.save(SIGNATURE_FILE, b"\x01" * 64)
    async with WeightServer(storage, port=0, rescan_interval=RESCAN) as server:
        async with connect(server.uri, max_size=None, compression=None) as ws:
            await ws.send(proto.encode(proto.Request(1, proto.Op.GET_SIGNATURE, None)))
            assert (await collect(ws, 1))[1] == b"\x01" * 64


def _write(tmp_path, text: str):
    path = tmp_path / "tokens"
    path.write_text(text)
    return path
