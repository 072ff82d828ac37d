"""Issue 19 items 1 and 3 as a user meets them: sync calls inside an event loop, scripts that never close."""

from __future__ import annotations

import asyncio
import gc
import json
import subprocess
import sys
import threading
import time
import weakref

import pytest
import torch

from streaming_weights import StreamingLlamaModel
from streaming_weights.exceptions import ModelError, SyncCallInEventLoopError
from streaming_weights.testing import FakeSource
from tests.support.streaming import served

IDS = torch.tensor([[5, 17, 33, 2]])


@pytest.fixture(scope="module")
def chunks(tiny_chunks):
    return tiny_chunks("llama", layers=3)[1]


def test_sync_calls_inside_a_running_loop_fail_at_once_with_the_async_name(chunks):
    async def go():
        with served(chunks) as uri:
            async with StreamingLlamaModel("llama", uri, cache_size=0) as m:
                for call, hint in ((lambda: m.forward(IDS), "await model.forward_async"),
                                   (lambda: m.generate(input_ids=IDS, max_new_tokens=2), "await model.generate_async"),
                                   (lambda: m.clear_cache(), "await model.clear_cache_async")):
                    t0 = time.monotonic()
                    with pytest.raises(SyncCallInEventLoopError, match=hint):
                        call()
                    assert time.monotonic() - t0 < 1.0  # immediately, not after the retries
                # the async variants work from the same loop
                out = await m.forward_async(IDS)
                await m.clear_cache_async()
                return out.last_hidden_state.shape

    assert asyncio.run(go()) == (1, 4, 64)
    assert issubclass(SyncCallInEventLoopError, ModelError)


def test_loading_inside_a_loop_needs_the_async_path(chunks):
    async def go():
        m = StreamingLlamaModel("llama", str(chunks))
        try:
            with pytest.raises(SyncCallInEventLoopError, match="ensure_loaded_async"):
                m.hf_model  # noqa: B018 - the property loads explicitly, which would block this loop
            await m.ensure_loaded_async()
            assert m.hf_model is not None
        finally:
            await m.cleanup()

    asyncio.run(go())


SCRIPT = """
import atexit, json, sys, threading, time
import torch
from streaming_weights import StreamingLlamaModel

def report():  # registered first, so it runs after every exit handler the library registered
    alive = [t.name for t in threading.enumerate() if t.name.startswith("surfing")]
    print(json.dumps({"exit_handlers_seconds": time.monotonic() - LAST, "io_threads": alive,
                      "closed_before_thread_pools": BEFORE_POOLS}), flush=True)

atexit.register(report)
BEFORE_POOLS = []
if hasattr(threading, "_register_atexit"):  # threading's exit hooks run in reverse: this one after the library's
    threading._register_atexit(lambda: BEFORE_POOLS.append(all(m.engine.closed for m in models)))
models = [StreamingLlamaModel("llama", where, cache_size=1) for where in sys.argv[1:]]
for m in models:
    m.forward(torch.tensor([[1, 2, 3]]))
LAST = time.monotonic()  # the script's last line; it never calls close()
"""


def test_script_that_never_closes_exits_promptly(chunks):
    # What the library adds to a script's exit is its exit handler (a bounded close); the interpreter's
    # own teardown of torch/transformers after it is not ours and varies with the machine's load.
    # One script, two models left open: one over a weight server (ws://), one reading the chunk directory.
    with served(chunks) as uri:
        proc = subprocess.run([sys.executable, "-c", SCRIPT, uri, str(chunks)], capture_output=True, text=True,
                              timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["io_threads"] == []  # closed at exit, not left to __del__ at interpreter teardown
    # ... and before the interpreter shut thread pools down: the hash workers of prefetches still in flight
    # (those of the next pass) are there until the connections are closed (else: warnings, or an abort)
    assert report["closed_before_thread_pools"] == ([True] if hasattr(threading, "_register_atexit") else [])
    assert report["exit_handlers_seconds"] < 1.0
    assert "Traceback" not in proc.stderr and "retry" not in proc.stderr


def test_dropping_an_unclosed_model_never_blocks(chunks):
    release = threading.Event()

    async def stuck_close(req):
        if req.op == "close":  # a connection whose graceful close never completes
            await asyncio.to_thread(release.wait)

    src = FakeSource(stuck_close, chunks_dir=chunks)
    m = StreamingLlamaModel("llama", src, cache_size=1)
    m.forward(IDS)
    ref = weakref.ref(m)
    t0 = time.monotonic()
    del m
    gc.collect()
    # __del__ only starts the close (a blocking one would wait out the 10 s close timeout; gc itself takes
    # seconds on a loaded box)...
    assert ref() is None and time.monotonic() - t0 < 8.0
    assert wait_until(lambda: src.requests[-1].op == "close")
    release.set()
    assert wait_until(lambda: src.closed)  # ...which finishes on the I/O thread


DROP_SCRIPT = """
import asyncio, atexit, gc, json, sys, threading
import torch
from streaming_weights import StreamingLlamaModel
from streaming_weights.testing import FakeSource

LATE = []
if hasattr(threading, "_register_atexit"):  # threading's exit hooks run in reverse: this one after the library's
    threading._register_atexit(lambda: LATE.append([t.name for t in threading.enumerate() if t.name == "surfing-io"]))
atexit.register(lambda: print(json.dumps({"io_threads_after_the_library_exit_hook": LATE}), flush=True))

async def slow_close(req):
    if req.op == "close":
        await asyncio.sleep(0.5)

m = StreamingLlamaModel("llama", FakeSource(slow_close, chunks_dir=sys.argv[1]), cache_size=1)
m.forward(torch.tensor([[1, 2, 3]]))
del m
gc.collect()  # __del__ starts the close on the I/O thread, which takes 0.5 s: the script ends meanwhile
"""


def test_a_model_dropped_unclosed_finishes_closing_before_the_interpreter_finalizes(chunks):
    """The I/O thread of a model dropped without close() is joined at exit, not left freeing tensors while the
    interpreter finalizes (which aborted the process: "terminate called without an active exception")."""
    if not hasattr(threading, "_register_atexit"):
        pytest.skip("this Python has no threading exit hooks to observe the order with")
    proc = subprocess.run([sys.executable, "-c", DROP_SCRIPT, str(chunks)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["io_threads_after_the_library_exit_hook"] == [[]], report


def wait_until(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_a_closed_model_says_so(chunks):
    """Counters, generation and forward on a closed model raise ModelError naming it, not an internal error."""
    from streaming_weights.exceptions import ModelError

    m = StreamingLlamaModel("llama", str(chunks), cache_size=1)
    m.forward(torch.tensor([[1, 2, 3]]))
    m.close()
    for call in (m.get_cache_info, m.get_inference_stats, lambda: m.forward(torch.tensor([[1, 2]])),
                 lambda: m.generate(input_ids=torch.tensor([[1, 2]]), max_new_tokens=1)):
        with pytest.raises(ModelError, match="closed"):
            call()
