"""RetryPolicy and RetryingSource: the one place client retries happen (answers from testing.FakeSource)."""

from __future__ import annotations

import pytest
from tests.support.servers import build_model

from streaming_weights.client.failover import FailoverSource
from streaming_weights.client.retry import RetryingSource, RetryPolicy, is_transient
from streaming_weights.exceptions import (
    HandshakeRefusedError,
    TLSVerificationError,
    AuthenticationError,
    BadRequestError,
    BusyError,
    ConfigurationError,
    ConnectionFailedError,
    FetchTimeoutError,
    IntegrityError,
    NotFoundError,
    RemoteError,
    UnitUnavailableError,
)
from streaming_weights.storage import FilesystemBackend
from streaming_weights.testing import FakeSource

FAST = dict(base_delay=0.001, max_delay=0.002)


@pytest.fixture(scope="module")
def chunks(tmp_path_factory):
    root = tmp_path_factory.mktemp("retry-model")
    build_model(FilesystemBackend(root), "m", {"resident": 2000, "layer.0": 5000, "layer.1": 5000},
                files={"tok.json": b"{}"})
    return root


def failing(errors: dict[str, list[BaseException]]):
    """A handler raising the listed errors for a unit (one per attempt), then answering normally."""
    def handler(req):
        queue = errors.get(req.name or req.op, [])
        if queue:
            raise queue.pop(0)
        if req.op == "fetch_unit" and req.name == "layer.1" and errors.get("corrupt"):
            errors["corrupt"].pop()
            return b"\0" * req.manifest.unit(req.name).bytes  # right size, wrong bytes
        return None
    return handler


async def test_transient_errors_are_retried_until_success(chunks):
    errs = {"layer.0": [ConnectionFailedError("down"), BusyError("busy"), RemoteError("x", code="internal")]}
    fake = FakeSource(failing(errs), chunks_dir=chunks)
    source = RetryingSource(fake, RetryPolicy(max_retries=3, **FAST))
    manifest = await source.get_manifest(None)
    unit = await source.fetch_unit(manifest, "layer.0")
    assert unit.name == "layer.0" and fake.fetched() == ["layer.0"] * 4 and source.retries == 3


async def test_last_attempt_raises_unit_unavailable_with_the_cause(chunks):
    fake = FakeSource(failing({"layer.0": [FetchTimeoutError("slow")] * 9}), chunks_dir=chunks)
    source = RetryingSource(fake, RetryPolicy(max_retries=2, **FAST))
    manifest = await source.get_manifest(None)
    with pytest.raises(UnitUnavailableError, match="could not be fetched after 3 attempts") as info:
        await source.fetch_unit(manifest, "layer.0")
    assert isinstance(info.value.__cause__, FetchTimeoutError) and len(fake.fetched()) == 3


async def test_integrity_failures_of_units_are_retried(chunks):
    fake = FakeSource(failing({"corrupt": [1]}), chunks_dir=chunks)
    source = RetryingSource(fake, RetryPolicy(max_retries=1, **FAST))
    manifest = await source.get_manifest(None)
    assert (await source.fetch_unit(manifest, "layer.1")).name == "layer.1"
    assert fake.fetched() == ["layer.1", "layer.1"]
    always = RetryingSource(FakeSource(failing({"corrupt": [1] * 5}), chunks_dir=chunks), RetryPolicy(max_retries=1, **FAST))
    with pytest.raises(UnitUnavailableError, match="failed verification after 2 attempts"):
        await always.fetch_unit(manifest, "layer.1")


@pytest.mark.parametrize("exc", [AuthenticationError("no"), NotFoundError("gone"), BadRequestError("bad"),
                                 ConfigurationError("use wss://"), RemoteError("odd", code="teapot")])
async def test_permanent_errors_are_never_retried(chunks, exc):
    fake = FakeSource(failing({"layer.0": [exc]}), chunks_dir=chunks)
    source = RetryingSource(fake, RetryPolicy(max_retries=5, **FAST))
    manifest = await source.get_manifest(None)
    with pytest.raises(type(exc)):
        await source.fetch_unit(manifest, "layer.0")
    assert fake.fetched() == ["layer.0"] and source.retries == 0


async def test_other_calls_reraise_the_last_error(chunks):
    fake = FakeSource(failing({"list_models": [ConnectionFailedError("a"), ConnectionFailedError("b")]}), chunks_dir=chunks)
    with pytest.raises(ConnectionFailedError, match="b"):
        await RetryingSource(fake, RetryPolicy(max_retries=1, **FAST)).list_models()
    # retryability is a property of the error's class, never set on an instance
    assert not is_transient(TLSVerificationError("certificate rejected"))
    assert not is_transient(HandshakeRefusedError("HTTP 400"))
    assert is_transient(ConnectionFailedError("refused"))
    assert is_transient(IntegrityError("x"), unit=True) and not is_transient(IntegrityError("x"))


def test_policy_deadline_covers_every_attempt_and_backoff():
    p = RetryPolicy(max_retries=3, timeout_seconds=10.0, base_delay=1.0, max_delay=3.0)
    waits = 1.0 + 2.0 + 3.0  # doubling, capped
    assert p.deadline() == pytest.approx(4 * (10.0 + 1.0) + waits)
    assert p.deadline(attempt_span=2) == pytest.approx(4 * (20.0 + 1.0) + waits)
    assert all(p.backoff(r) / 2 <= p.delay(r) <= p.backoff(r) for r in (1, 2, 3, 4))
    with pytest.raises(ConfigurationError):
        RetryPolicy(max_retries=-1)
    with pytest.raises(ConfigurationError):
        RetryPolicy(timeout_seconds=0)


def test_wrapping_never_multiplies_and_failover_sets_the_span(chunks):
    inner = FakeSource(chunks_dir=chunks)
    twice = RetryingSource(RetryingSource(inner, RetryPolicy(max_retries=9)), RetryPolicy(max_retries=1))
    assert twice.source is inner and twice.policy.max_retries == 1
    over3 = RetryingSource(FailoverSource([FakeSource(chunks_dir=chunks) for _ in range(3)]), RetryPolicy(timeout_seconds=5))
    assert over3.attempt_span == 3 and over3.deadline() == RetryPolicy(timeout_seconds=5).deadline(3)


async def test_failover_makes_one_pass_and_leaves_retrying_to_the_policy(chunks):
    down = [FakeSource(failing({"layer.0": [ConnectionFailedError("down")] * 9}), chunks_dir=chunks) for _ in range(2)]
    failover = FailoverSource(down)
    source = RetryingSource(failover, RetryPolicy(max_retries=1, **FAST))
    manifest = await down[0].get_manifest(None)
    with pytest.raises(UnitUnavailableError):
        await source.fetch_unit(manifest, "layer.0")
    assert [len(s.fetched()) for s in down] == [2, 2]  # (1 + 1 retry) passes x one try per server
    with pytest.raises(NotFoundError):  # a request error is not failed over
        await FailoverSource([FakeSource(failing({"layer.0": [NotFoundError("x")]}), chunks_dir=chunks),
                              FakeSource(chunks_dir=chunks)]).fetch_unit(manifest, "layer.0")
