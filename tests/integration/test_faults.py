"""Faults between a streaming client and a weight-server *process*: kills, cuts, corruption, stalls.

The server runs as ``python -m streaming_weights.weight_server`` and the client reaches it through
``faultproxy.FaultProxy`` on loopback, which can cut, corrupt, delay or pause the server->client stream
and tell us when N bytes went by. The model is a random-init LLaMA whose layers are ~12 MiB each, so
every fault offset lands inside a unit larger than 4 MiB. Every recovered result is compared with
transformers running the ORIGINAL checkpoint; every unrecoverable one must be a specific error, fast.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from streaming_weights import StreamingLlamaModel
from streaming_weights.exceptions import (
    ConnectionFailedError,
    FetchTimeoutError,
    IntegrityError,
    UnitUnavailableError,
)
from streaming_weights.format import Manifest
from streaming_weights.netutil import free_port

from tests.support.faultproxy import FaultProxy
from tests.support.servers import start_server_process
from tests.support.streaming import served

pytestmark = pytest.mark.timeout(120)

IDS = torch.tensor([[5, 17, 33, 2, 9, 41, 7], [3, 8, 12, 19, 0, 0, 0]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0]])
NEW_TOKENS = 4
MiB = 1 << 20


@pytest.fixture(scope="module")
def big(tiny_chunks):
    """(chunks dir, reference hidden states, reference generated ids) for a 3-layer, ~12 MiB/layer LLaMA."""
    src, chunks = tiny_chunks("llama", layers=3, hidden=512, intermediate=1536)
    m = Manifest.from_bytes((chunks / "manifest.json").read_bytes())
    assert min(u.bytes for u in m.streamed) > 4 * MiB  # faults below land inside units > 4 MiB
    ref = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = ref.model(input_ids=IDS, attention_mask=MASK).last_hidden_state
        gen = ref.generate(input_ids=IDS, attention_mask=MASK, max_new_tokens=NEW_TOKENS, do_sample=False)
    del ref
    return chunks, hidden, gen


class ServerProcess:
    """A weight-server subprocess on a fixed port, which tests can kill and restart on that port."""

    def __init__(self, chunks: Path, port: int | None = None) -> None:
        self.chunks, self.port = chunks, port or free_port()
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> ServerProcess:
        self.proc, _ = start_server_process(self.chunks, port=self.port, stdout=subprocess.DEVNULL)
        self.starts += 1
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        self.kill()


@pytest.fixture(scope="module")
def server_process(big):
    s = ServerProcess(big[0]).start()  # ~4 s: the server process imports torch (via the package)
    yield s
    s.stop()


@pytest.fixture
def server(server_process):
    """The module's server process, restarted on its port if an earlier test killed it."""
    if server_process.proc is None or server_process.proc.poll() is not None:
        server_process.start()
    return server_process


@pytest.fixture
def proxy(server):
    with FaultProxy(server.port) as p:
        yield p


def model(proxy: FaultProxy, **kw) -> StreamingLlamaModel:
    opts = dict(cache_size=1, prefetch_count=1, timeout_seconds=10, max_retries=4)
    opts.update(kw)
    return StreamingLlamaModel("llama", f"ws://127.0.0.1:{proxy.port}", **opts)


def check_identical(m: StreamingLlamaModel, big) -> None:
    _, hidden, gen = big
    out = m.forward(IDS, MASK)
    torch.testing.assert_close(out.last_hidden_state, hidden, rtol=0, atol=1e-5)
    got = m.generate(input_ids=IDS, attention_mask=MASK, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(got, gen)


def causes(exc: BaseException) -> list[BaseException]:
    out = []
    while exc is not None:
        out.append(exc)
        exc = exc.__cause__
    return out


# ----------------------------------------------------------------------------------------- tests
def test_server_killed_inside_a_unit_and_restarted_client_recovers_identically(big, server, proxy):
    # retries back off over ~20 s: the restarted process imports torch first (seconds on a loaded box)
    with model(proxy, max_retries=8) as m:
        restarted = threading.Event()

        def kill_and_restart() -> None:
            server.kill()  # SIGKILL, mid-unit: the client holds a partial 12 MiB unit

            def restart() -> None:
                time.sleep(0.3)  # deliberate downtime: the client must see the server gone
                server.start()
                restarted.set()
            threading.Thread(target=restart, daemon=True).start()

        proxy.on_bytes(6 * MiB, kill_and_restart)  # 6 MiB into the layer stream
        check_identical(m, big)
        assert restarted.wait(30) and server.starts == 2
        assert m.source.source.reconnects >= 2  # it did reconnect to the new process (under the retry wrapper)
        # and it keeps working afterwards, on the new process
        m.clear_cache()
        out = m.forward(IDS, MASK)
        torch.testing.assert_close(out.last_hidden_state, big[1], rtol=0, atol=1e-5)


def test_connection_dropped_mid_frame_is_retried_transparently(big, proxy):
    with model(proxy) as m:
        proxy.cut_after(5 * MiB + 12345)  # not on a frame boundary
        check_identical(m, big)
        assert proxy.cuts == 1
        assert m.source.source.reconnects >= 2


def test_bytes_corrupted_in_transit_are_rejected_then_refetched(big, proxy):
    with model(proxy) as m:
        proxy.corrupt_at(7 * MiB + 777)
        check_identical(m, big)
        assert proxy.corruptions == 1
        assert m.source.retries >= 1  # the corrupted copy was refused and fetched again


def test_bytes_corrupted_in_a_fingerprinted_refetch_are_rejected_then_refetched(big, proxy):
    """Units fetched a third time are checked against their fingerprint, not BLAKE3 (client.fingerprint): a
    byte flipped in transit then is refused by the fingerprint and the unit fetched again, identically."""
    with model(proxy) as m:
        for _ in range(3):  # cache_size=1: every pass fetches the layers again
            m.forward(IDS, MASK)
        book = m.source.fingerprints
        assert len(book) >= 2 and book.tag_bytes > 0
        tagged, hashed, retries = book.tag_bytes, book.blake3_bytes, m.source.retries
        proxy.corrupt_at(7 * MiB + 777)
        check_identical(m, big)
        assert proxy.corruptions == 1
        assert m.source.retries == retries + 1  # the corrupted copy was refused and fetched again
        assert book.tag_bytes > tagged and book.blake3_bytes == hashed  # by the fingerprint alone


def test_slow_server_times_out_instead_of_hanging(big, proxy):
    timeout, retries = 1.0, 1
    with model(proxy, timeout_seconds=timeout, max_retries=retries) as m:
        m.clear_cache()
        proxy.delay = 4 * timeout  # every server->client chunk is held longer than timeout_seconds
        t0 = time.monotonic()
        with pytest.raises((UnitUnavailableError, FetchTimeoutError)) as ei:
            m.forward(IDS, MASK)
        elapsed = time.monotonic() - t0
        chain = causes(ei.value)
        assert any(isinstance(e, (FetchTimeoutError, ConnectionFailedError)) for e in chain), chain
        assert "timed out" in str(ei.value) or "within" in str(ei.value)
        assert elapsed < m.source.deadline() + 10
        proxy.delay = 0
        proxy.drop_all()
        out = m.forward(IDS, MASK)  # recovers once the network does
        torch.testing.assert_close(out.last_hidden_state, big[1], rtol=0, atol=1e-5)


def test_paused_stream_times_out_then_recovers(big, proxy):
    with model(proxy, timeout_seconds=1.0, max_retries=1) as m:
        m.clear_cache()
        proxy.pause()
        try:
            with pytest.raises((UnitUnavailableError, FetchTimeoutError)):
                m.forward(IDS, MASK)
        finally:
            proxy.resume()
        out = m.forward(IDS, MASK)
        torch.testing.assert_close(out.last_hidden_state, big[1], rtol=0, atol=1e-5)


def test_unit_corrupted_in_server_storage_is_never_cached_or_used(big, tmp_path):
    chunks = tmp_path / "bad"
    shutil.copytree(big[0], chunks)
    unit = chunks / "units" / "model.layers.1.safetensors"
    data = bytearray(unit.read_bytes())
    data[len(data) // 2] ^= 0x01
    unit.write_bytes(bytes(data))
    with served(chunks) as uri, StreamingLlamaModel("llama", uri, cache_size=3, prefetch_count=1,
                                                    timeout_seconds=10, max_retries=1) as m:
        with pytest.raises(UnitUnavailableError, match="model.layers.1.*failed verification") as ei:
            m.forward(IDS, MASK)
        assert any(isinstance(e, IntegrityError) for e in causes(ei.value))
        assert "model.layers.1" not in m.get_cache_info()["cached_components"]
        assert all(b.module.mlp.up_proj.weight.is_meta for b in m.engine.bindings)


# Last: it leaves the module's server process dead (the `server` fixture would restart it).
def test_server_stays_down_specific_error_no_hang(big, server, proxy):
    timeout, retries = 2.0, 1
    with model(proxy, timeout_seconds=timeout, max_retries=retries) as m:
        server.kill()
        m.clear_cache()
        t0 = time.monotonic()
        with pytest.raises(UnitUnavailableError) as ei:
            m.forward(IDS, MASK)
        elapsed = time.monotonic() - t0
        assert any(isinstance(e, ConnectionFailedError) for e in causes(ei.value)), causes(ei.value)
        # bounded by the one retry budget: (retries+1) attempts, each at most timeout_seconds, plus backoff
        assert elapsed < m.source.deadline() + 5
        assert all(b.module.mlp.up_proj.weight.is_meta for b in m.engine.bindings)  # never ran on garbage
    # a client that starts while the server is down fails at construction with the same specific error
    with pytest.raises(ConnectionFailedError, match="unreachable"):
        model(proxy, timeout_seconds=timeout, max_retries=retries)


if os.name != "posix":  # pragma: no cover
    pytestmark = pytest.mark.skip("needs POSIX signals")
