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


def test_a_posted_call_that_fails_raises_at_the_next_call_once(io):
    io.post(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        io.call(lambda: None)
    assert io.call(lambda: 7) == 7
