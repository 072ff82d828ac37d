"""``surfing serve --max-rate``: rate parsing, the token bucket's arithmetic, and a paced server on loopback."""

from __future__ import annotations

import asyncio
import time

import pytest

from streaming_weights.cli import main as cli_main
from streaming_weights.client.transport import WebSocketSource
from streaming_weights.exceptions import ConfigurationError
from streaming_weights.server import WeightServer
from streaming_weights.server.pacing import TokenBucket, parse_rate
from streaming_weights.storage import MemoryBackend

from tests.support.servers import build_model


@pytest.mark.parametrize("text, bytes_per_s", [
    ("1Gbit", 125e6), ("10Gbit", 1.25e9), ("500Mbit", 62.5e6), ("1gbit", 125e6), ("2.5 Gbit/s", 312.5e6),
    ("1Gbps", 125e6), ("200MB", 200e6), ("100MBps", 100e6), ("1GiB", 2.0**30), ("64KiB", 65536.0),
    ("1000", 1000.0), (4096, 4096.0),
])
def test_parse_rate(text, bytes_per_s):
    assert parse_rate(text) == pytest.approx(bytes_per_s)


@pytest.mark.parametrize("bad", ["", "fast", "1Qbit", "-1Gbit", "0Mbit", "1 G bit", True, 0, -5.0, float("inf")])
def test_parse_rate_rejects(bad):
    with pytest.raises(ConfigurationError, match="invalid rate"):
        parse_rate(bad)


class FakeTime:
    """A clock that advances only when the bucket sleeps (so the test measures the bucket, not the box)."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s


def test_bucket_paces_to_rate_after_one_burst():
    t = FakeTime()
    bucket = TokenBucket(1000.0, burst=100.0, clock=t.clock, sleep=t.sleep)

    async def go() -> None:
        for _ in range(10):
            await bucket.take(100)

    asyncio.run(go())
    # 1000 bytes at 1000 B/s with 100 bytes of burst: the last byte leaves at 0.9 s, not earlier
    assert t.now - 100.0 == pytest.approx(0.9)
    assert bucket.waited == pytest.approx(0.9)
    assert t.slept == pytest.approx([0.1] * 9)  # the first message rides the burst, each later one waits 0.1 s


def test_bucket_first_burst_is_free_and_idle_time_is_not_banked():
    t = FakeTime()
    bucket = TokenBucket(1000.0, burst=500.0, clock=t.clock, sleep=t.sleep)
    assert bucket.reserve(500) == 0.0           # a full burst goes out at once
    assert bucket.reserve(100) == pytest.approx(0.1)
    t.now += 60.0                                # a minute idle ...
    assert bucket.reserve(500) == 0.0            # ... refills at most one burst
    assert bucket.reserve(1000) == pytest.approx(1.0)


def test_concurrent_senders_share_one_rate():
    t = FakeTime()
    bucket = TokenBucket(1e6, burst=1.0, clock=t.clock, sleep=t.sleep)
    # reservations of concurrent senders queue behind each other: the k-th of 1 KB waits ~k ms
    delays = [bucket.reserve(1000) for _ in range(5)]
    assert delays == pytest.approx([0.001 * (k + 1) - 1e-6 for k in range(5)])


def test_bucket_rejects_bad_parameters():
    with pytest.raises(ConfigurationError):
        TokenBucket(0)
    with pytest.raises(ConfigurationError):
        TokenBucket(1e6, burst=0)


def test_paced_server_sends_no_faster_than_its_rate():
    storage = MemoryBackend()
    size = 6 << 20
    manifest = build_model(storage, "m", {"resident": 1000, "big": size})
    rate, burst = 20e6, float(1 << 20)

    async def go() -> tuple[float, int, TokenBucket]:
        async with WeightServer(storage, port=0, pacer=TokenBucket(rate, burst)) as server:
            async with WebSocketSource(server.uri, timeout_seconds=60) as src:
                remote = await src.get_manifest("m")
                t0 = time.perf_counter()
                unit = await src.fetch_unit(remote, "big")
                dt = time.perf_counter() - t0
                return dt, unit.nbytes, server.pacer

    dt, nbytes, bucket = asyncio.run(go())
    assert nbytes == manifest.unit("big").bytes
    # unpaced, 6 MiB over loopback takes milliseconds; paced, at least (size - burst) / rate
    assert dt >= (size - burst) / rate * 0.97, dt
    assert bucket.waited > 0


def test_cli_serve_rejects_bad_rate(tmp_path, capsys):
    from streaming_weights.storage import FilesystemBackend

    build_model(FilesystemBackend(str(tmp_path)), "m", {"resident": 1000, "layer": 1000})
    assert cli_main(["serve", "--chunks-dir", str(tmp_path), "--port", "0", "--max-rate", "fast"]) == 2
    err = capsys.readouterr().err
    assert "invalid rate 'fast'" in err and "Traceback" not in err

