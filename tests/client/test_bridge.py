"""The async<->sync bridge (client.bridge): calls that wait, and posted calls that do not."""

from __future__ import annotations

import pytest

from streaming_weights.client.bridge import LoopThread


@pytest.fixture
def io():
    loop_thread = LoopThread("test-io")
    yield loop_thread
    loop_thread.close()


def test_posted_calls_run_in_order_with_later_calls(io):
    seen: list[int] = []
    for i in range(200):
        io.post(seen.append, i)
    assert io.call(lambda: list(seen)) == list(range(200))  # every post ran before the call made after it


def test_a_posted_call_that_fails_makes_every_later_call_raise(io):
    io.post(lambda: 1 / 0)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="a call posted to the I/O loop failed: ZeroDivisionError") as ei:
            io.call(lambda: None)
        assert isinstance(ei.value.__cause__, ZeroDivisionError)


async def test_awaiting_the_loop_from_another_loop_raises_a_posted_failure_too(io):
    io.post(lambda: 1 / 0)

    async def fine() -> int:
        return 1

    with pytest.raises(RuntimeError, match="a call posted to the I/O loop failed"):
        await io.wrap(fine())
