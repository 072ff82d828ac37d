"""Scale-out on real services: S3 (rclone ``serve s3``) + shared Redis + several servers + client failover.

The fixtures start the S3 and Redis servers on loopback (tests/support/services.py); nothing here is mocked.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoModelForCausalLM

from streaming_weights import ModelChunker, StreamingLlamaModel
from streaming_weights.client.bridge import LoopThread
from streaming_weights.client.failover import FailoverSource
from streaming_weights.client import StorageSource, open_unit_source
from streaming_weights.client.transport import WebSocketSource
from streaming_weights.cli import main as cli_main
from streaming_weights.exceptions import NotFoundError
from streaming_weights.format import Manifest
from streaming_weights.netutil import free_port
from streaming_weights.server import AdvancedWeightServer
from streaming_weights.storage import FilesystemBackend
from streaming_weights.storage.redis_cache import RedisCacheBackend

from tests.support import services
from tests.support.streaming import served

pytestmark = [pytest.mark.s3, pytest.mark.redis]

IDS = torch.tensor([[5, 17, 33, 2, 9, 41, 7]])
IDS2 = torch.tensor([[3, 8, 12, 19, 4]])
REPO = Path(__file__).resolve().parents[2]


def run(coro):
    return asyncio.run(coro)


def chunk_to_s3(s3_server, bucket: str, src: Path, prefix: str = "models/llama") -> None:
    run(ModelChunker(str(src), storage_backend=s3_server.backend(bucket, prefix), name="llama").chunk_model())


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """``{(sample name, sorted labels): value}`` from a server's /metrics, over plain HTTP."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(metrics: dict, name: str, **labels) -> float:
    return sum(v for (n, lab), v in metrics.items() if n == name and labels.items() <= dict(lab).items())


def manifest_reads(starts: int, *scraped: dict) -> float:
    """S3 reads of manifest.json: a server reads it from S3 itself (never through Redis: it is how the server
    knows which bytes are current) at each start and for each get_manifest it answers."""
    return starts + sum(total(m, "surfing_server_requests_total", op="get_manifest") for m in scraped)


async def fetch_everything(source) -> tuple[dict[str, torch.Tensor], list[str]]:
    manifest = await source.get_manifest("llama")
    tensors = {}
    for unit in manifest.units:
        fetched = await source.fetch_unit(manifest, unit.name)
        tensors.update({k: v.clone() for k, v in fetched.tensors.items()})
    return tensors, [u.name for u in manifest.units]


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def llama_ref(tiny_source):
    src = tiny_source("llama")
    return src, AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()


# ----------------------------------------------------------------------------- the "Done when" test
def test_two_servers_shared_redis_failover_parity_and_each_unit_read_from_s3_once(
        s3_server, s3_bucket, redis_server, llama_ref):
    src, ref = llama_ref
    chunk_to_s3(s3_server, s3_bucket, src)
    ns = f"t{uuid.uuid4().hex[:8]}:"
    ios = [LoopThread(f"scaleout-server-{i}") for i in range(2)]
    # Two deployments (own S3 client, own counters) over one bucket and one Redis. A keeps units in its
    # own LRU; B's LRU is off, so it streams every unit in ranged reads straight from Redis.
    servers = [
        AdvancedWeightServer(storage_backend=s3_server.backend(s3_bucket), redis_url=redis_server, port=0,
                             redis_key_prefix=ns, cache_size_mb=cache, token="")
        for cache in (64, 0)
    ]
    try:
        for io, srv in zip(ios, servers):
            io.run(srv.start(), 30)
        uri_a, uri_b = servers[0].uris[0], servers[1].uris[0]
        acquired, stopped = [], []
        with StreamingLlamaModel("llama", [uri_a, uri_b], cache_size=2, prefetch_count=2) as m:
            assert m.get_cache_info()["streamed_units"] == 6  # the cache is smaller than the model

            def stop_a_midway(orig):
                def acquire(name):
                    acquired.append(name)
                    if len(acquired) == 9 and not stopped:  # mid-generate: after the prefill, in token 2
                        ios[0].run(servers[0].stop(), 30)
                        stopped.append(name)
                    return orig(name)
                return acquire

            for b in m.engine.bindings:
                b._acquire = stop_a_midway(b._acquire)
            got = m.generate(input_ids=IDS, max_new_tokens=8, do_sample=False, min_new_tokens=8)
            assert stopped, "server A was not stopped mid-run"
            # between generate calls: A is still down, everything comes from B
            got2 = m.generate(input_ids=IDS2, max_new_tokens=5, do_sample=False, min_new_tokens=5)
        with torch.no_grad():
            assert torch.equal(got, ref.generate(input_ids=IDS, max_new_tokens=8, do_sample=False, min_new_tokens=8))
            assert torch.equal(got2, ref.generate(input_ids=IDS2, max_new_tokens=5, do_sample=False, min_new_tokens=5))

        ios[0].run(servers[0].start(), 30)  # bring A back (same port, same counters) to scrape it
        a, b = scrape(servers[0].ports[0]), scrape(servers[1].ports[0])
        for side in (a, b):  # both served units
            assert total(side, "surfing_server_requests_total", op="get_unit", status="ok") > 0

        raw_manifest = s3_server.client().get_object(Bucket=s3_bucket, Key="models/llama/manifest.json")["Body"].read()
        manifest = Manifest.from_bytes(raw_manifest)
        sizes = {e.path: e.bytes for e in [*manifest.units, *manifest.files]}
        blobs = {dict(lab)["blob"] for side in (a, b) for (n, lab) in side if n == "surfing_server_storage_reads_total"}
        assert {u.path for u in manifest.units} <= blobs <= sizes.keys()  # every unit (and the files used) served
        manifests = manifest_reads(3, a, b)  # A started twice, B once
        nbytes = manifests * len(raw_manifest) + sum(sizes[p] for p in blobs)
        s3 = {"backend": "S3Backend"}
        # Each unit and file was read from S3 exactly once across both servers; every other read hit Redis.
        assert total(a, "surfing_storage_get_requests_total", **s3) + total(b, "surfing_storage_get_requests_total", **s3) == manifests + len(blobs)
        assert total(a, "surfing_storage_get_bytes_total", **s3) + total(b, "surfing_storage_get_bytes_total", **s3) == nbytes
        redis = {"backend": "RedisCacheBackend"}
        assert total(a, "surfing_storage_fills_total", **redis) + total(b, "surfing_storage_fills_total", **redis) == len(blobs)
        assert total(b, "surfing_storage_hits_total", **redis) + total(b, "surfing_storage_waits_total", **redis) > 0
        assert total(a, "surfing_storage_errors_total", **s3) == total(b, "surfing_storage_errors_total", **s3) == 0
    finally:
        for io, srv in zip(ios, servers):
            io.run(srv.close(), 30)
            io.close()


def test_advanced_server_num_servers_ports_and_metrics(s3_server, s3_bucket, redis_server, llama_ref, monkeypatch):
    src, _ = llama_ref
    chunk_to_s3(s3_server, s3_bucket, src)

    async def go():
        port = free_port()
        adv = AdvancedWeightServer(storage_backend=s3_server.backend(s3_bucket), redis_url=redis_server, port=0,
                                   num_servers=2, redis_key_prefix=f"t{uuid.uuid4().hex[:8]}:", token="")
        assert isinstance(adv.storage, RedisCacheBackend)
        async with adv:
            assert len(set(adv.ports)) == 2 and all(adv.ports)
            assert adv.uris == [f"ws://127.0.0.1:{p}" for p in adv.ports] and adv.models == ["llama"]
            results = []
            for uri in adv.uris:
                ws = WebSocketSource(uri)
                try:
                    results.append(await fetch_everything(ws))
                finally:
                    await ws.close()
            assert_same(results[0][0], results[1][0])
            metrics = await asyncio.to_thread(scrape, adv.ports[1])
            # one process, one storage chain: every server exports the same backend counters
            manifests = manifest_reads(2, *[await asyncio.to_thread(scrape, p) for p in adv.ports])
            assert total(metrics, "surfing_storage_get_requests_total", backend="S3Backend") == manifests + len(results[0][1])
            assert total(metrics, "surfing_storage_hits_total", backend="RedisCacheBackend") >= len(results[0][1])
        # consecutive ports from `port`
        adv2 = AdvancedWeightServer(chunks_dir=f"s3://{s3_bucket}/models", redis_url=None, port=port, num_servers=1)
        assert adv2.ports == [port] and not isinstance(adv2.storage, RedisCacheBackend)
        await adv2.storage.close()

    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    run(go())


def test_missing_key_through_the_server(s3_server, s3_bucket, redis_server, llama_ref):
    """A unit listed in the manifest but gone from the bucket: a NotFoundError naming it, never garbage."""
    src, _ = llama_ref
    chunk_to_s3(s3_server, s3_bucket, src)
    s3_server.client().delete_object(Bucket=s3_bucket, Key="models/llama/units/model.layers.3.safetensors")

    async def go():
        async with AdvancedWeightServer(storage_backend=s3_server.backend(s3_bucket), redis_url=redis_server, port=0,
                                        redis_key_prefix=f"t{uuid.uuid4().hex[:8]}:", token="") as adv:
            ws = WebSocketSource(adv.uris[0])  # one attempt per call
            try:
                manifest = await ws.get_manifest("llama")
                await ws.fetch_unit(manifest, "model.layers.2")
                with pytest.raises(NotFoundError, match=r"model\.layers\.3.*missing from storage"):
                    await ws.fetch_unit(manifest, "model.layers.3")
            finally:
                await ws.close()

    run(go())


# --------------------------------------------------------------------------------- client failover
def test_failover_skips_dead_server_with_backoff(tiny_chunks):
    _, chunks = tiny_chunks("llama")
    dead = f"ws://127.0.0.1:{free_port()}"

    async def go(live: str):
        src = open_unit_source([dead, live])
        assert isinstance(src, FailoverSource)
        src.base_backoff = 3600.0  # once down, the dead server is not tried again in this test
        try:
            got, units = await fetch_everything(src)
            assert src._failures == [1, 0] and src.failovers == 1  # tried once, then skipped while backing off
            assert src._order() == [1, 0]
        finally:
            await src.close()
        direct = StorageSource(FilesystemBackend(chunks))
        try:
            want, _ = await fetch_everything(direct)
        finally:
            await direct.close()
        assert_same(got, want)

    with served(chunks, token="") as live:
        run(go(live))


def test_servers_opened_together_share_fingerprints(tiny_chunks):
    """open_unit_source([a, b]) gives its servers one fingerprint book (client.fingerprint): a unit verified twice
    from server a is checked against its fingerprint when it is fetched again from server b."""
    _, chunks = tiny_chunks("llama")

    async def go(a: str, b: str):
        src = open_unit_source([a, b])
        try:
            first, second = src.sources
            assert first.fingerprints is second.fingerprints is src.fingerprints
            manifest = await first.get_manifest(None)
            unit = manifest.streamed[0]
            for _ in range(2):
                (await first.fetch_unit(manifest, unit.name)).recycle(None)
            book = src.fingerprints
            hashed, tagged = book.blake3_bytes, book.tag_bytes
            got = await second.fetch_unit(manifest, unit.name)
            assert (book.blake3_bytes, book.tag_bytes) == (hashed, tagged + unit.bytes)
            direct = StorageSource(FilesystemBackend(chunks))
            try:
                want = await direct.fetch_unit(manifest, unit.name)
            finally:
                await direct.close()
            assert_same(got.tensors, want.tensors)
        finally:
            await src.close()

    with served(chunks, token="") as a, served(chunks, token="") as b:
        run(go(a, b))


# ------------------------------------------------------------------------- s3:// read directly
@pytest.mark.parametrize("prefix", ["models/llama", "models"])  # a model dir, or a dir of models
def test_s3_uri_reads_directly(s3_server, s3_bucket, llama_ref, monkeypatch, prefix):
    src, ref = llama_ref
    chunk_to_s3(s3_server, s3_bucket, src)
    for k, v in s3_server.env().items():  # credentials and endpoint from the standard AWS variables
        monkeypatch.setenv(k, v)
    with StreamingLlamaModel("llama", f"s3://{s3_bucket}/{prefix}", cache_size=2, prefetch_count=1) as m:
        got = m.generate(input_ids=IDS, max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        assert torch.equal(got, ref.generate(input_ids=IDS, max_new_tokens=4, do_sample=False))


# --------------------------------------------------------------------------------------------- CLI
def _spawn(cmd: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def _address(proc: subprocess.Popen) -> tuple[subprocess.Popen, str]:
    line = proc.stdout.readline()  # "serving llama on ws://127.0.0.1:PORT (NO auth); Ctrl-C to stop"
    if "serving" not in line:
        proc.kill()
        raise AssertionError(f"server did not start: {line!r} {proc.communicate(timeout=10)[1][-3000:]}")
    return proc, line.split(" on ", 1)[1].split(" ", 1)[0]


def test_cli_serve_and_weight_server_over_s3_with_redis(s3_server, s3_bucket, redis_server, llama_ref):
    src, _ = llama_ref
    chunk_to_s3(s3_server, s3_bucket, src)
    env = {**os.environ, "AWS_EC2_METADATA_DISABLED": "true", "SURFING_TOKEN": ""}
    redis_url = f"{redis_server}"
    s3_args = ["--s3-prefix", "models", "--s3-endpoint", s3_server.endpoint_url,
               "--s3-access-key", s3_server.access_key, "--s3-secret-key", s3_server.secret_key,
               "--redis-url", redis_url, "--port", "0"]
    bin_dir = Path(sys.executable).parent
    surfing = [str(bin_dir / "surfing")] if (bin_dir / "surfing").exists() else [sys.executable, "-m", "streaming_weights.cli"]
    spawned: list[subprocess.Popen] = []
    try:
        # `--s3` implied by `--s3-bucket`, and the original module entry point with `--s3`
        spawned.append(_spawn([*surfing, "serve", "--s3-bucket", s3_bucket, *s3_args], env))
        spawned.append(_spawn([sys.executable, "-m", "streaming_weights.weight_server", "--s3", "--s3-bucket",
                               s3_bucket, *s3_args], env))
        uris = [_address(p)[1] for p in spawned]

        async def go():
            results = []
            for uri in uris:
                ws = WebSocketSource(uri)
                try:
                    results.append(await fetch_everything(ws))
                finally:
                    await ws.close()
            return results

        (a, units), (b, _) = run(go())
        assert_same(a, b)
        ports = [int(u.rsplit(":", 1)[1]) for u in uris]
        m = [scrape(p) for p in ports]
        gets = sum(total(x, "surfing_storage_get_requests_total", backend="S3Backend") for x in m)
        assert gets == manifest_reads(2, *m) + len(units)  # two processes, one Redis: each unit read from S3 once
        assert total(m[1], "surfing_storage_hits_total", backend="RedisCacheBackend") >= len(units)
    finally:
        for proc in spawned:
            proc.terminate()
            proc.wait(timeout=15)


def test_cli_serve_storage_errors_are_specific(s3_server, s3_bucket, llama_ref, capsys):
    src, _ = llama_ref
    chunk_to_s3(s3_server, s3_bucket, src)
    base = ["--s3-endpoint", s3_server.endpoint_url, "--port", "0", "--token", ""]
    good = ["--s3-access-key", s3_server.access_key, "--s3-secret-key", s3_server.secret_key]

    assert cli_main(["serve", "--s3-bucket", s3_bucket, *base, "--s3-access-key", s3_server.access_key,
                     "--s3-secret-key", "wrong-secret"]) == 2
    assert "credentials are wrong" in capsys.readouterr().err

    from streaming_weights.weight_server import main as weight_server_main

    assert weight_server_main(["--s3", "--s3-bucket", "no-such-bucket-here", *base, *good]) == 2
    err = capsys.readouterr().err
    assert "no-such-bucket-here" in err and "does not exist" in err

    assert cli_main(["serve", "--s3-bucket", s3_bucket, "--s3-prefix", "nothing/here", *base, *good]) == 2
    assert "no chunked model" in capsys.readouterr().err

    assert cli_main(["serve", "--s3", *base, *good]) == 2
    assert "--s3-bucket" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- example
def test_llama_s3_example_runs_against_the_fixtures(s3_server, s3_bucket, redis_server, llama_ref, monkeypatch,
                                                   capsys):
    """The example, run as a script (in-process: importing torch again in a subprocess costs ~10 s)."""
    import runpy

    src, _ = llama_ref
    for k, v in {**s3_server.env(), "SURFING_TOKEN": ""}.items():  # endpoint + credentials from the env
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(sys, "argv", ["llama_s3_example.py", "--model", str(src), "--bucket", s3_bucket,
                                      "--prefix", "example", "--redis-url", redis_server, "--max-new-tokens", "4",
                                      "--check"])
    runpy.run_path(str(REPO / "examples" / "llama_s3_example.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "identical to transformers: True" in out
    assert "S3 GETs across both servers" in out
