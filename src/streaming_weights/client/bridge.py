"""The single async<->sync bridge: a private event loop on its own thread.

All network and storage I/O of a client runs on this loop. Synchronous code (forward hooks running
inside transformers' forward/generate, possibly inside the user's own event loop) submits coroutines
and blocks on their result with a timeout; running I/O on a separate loop is what prevents the classic
deadlock of a sync call made from inside a running loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
import weakref
from typing import Any, Awaitable, Callable, TypeVar

from ..exceptions import FetchTimeoutError, SyncCallInEventLoopError

T = TypeVar("T")
logger = logging.getLogger("streaming_weights.client.bridge")


def in_running_loop() -> bool:
    """Whether the calling thread is running an asyncio event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def guard_sync(what: str, alternative: str | None = None) -> None:
    """Raise :class:`SyncCallInEventLoopError` if ``what`` (a blocking call) runs inside an event loop."""
    if in_running_loop():
        hint = f"use `{alternative}`" if alternative else "run it in a thread (`await asyncio.to_thread(...)`)"
        raise SyncCallInEventLoopError(
            f"{what} blocks on network I/O and was called inside a running event loop, which it would stall "
            f"(and deadlock a weight server running on that loop); {hint} instead")


def join_running(timeout: float) -> None:
    """Wait, at most ``timeout`` seconds in all, for loop threads still running, such as one finishing a close
    that did not wait (a model dropped without ``close()``). Called at interpreter exit: a daemon thread still
    freeing tensors when the interpreter finalizes aborts the process ("terminate called without an active
    exception")."""
    deadline = time.monotonic() + timeout
    for loop_thread in list(_RUNNING):
        loop_thread._thread.join(max(0.0, deadline - time.monotonic()))


class LoopThread:
    """An asyncio loop running forever in a daemon thread until :meth:`close`."""

    def __init__(self, name: str = "surfing-io") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._closed = False
        self._posted_error: BaseException | None = None  # the first failure of a post()ed call (sticky)
        _RUNNING.add(self)  # its thread refers to it while it runs: the weak set keeps it until then

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def in_loop(self) -> bool:
        return threading.current_thread() is self._thread

    def submit(self, coro: Awaitable[T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]

    def run(self, coro: Awaitable[T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for its result (raises FetchTimeoutError after ``timeout``)."""
        if self.in_loop():
            raise RuntimeError("LoopThread.run called from its own loop (would deadlock)")
        fut = self.submit(coro)
        try:
            result = fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise FetchTimeoutError(f"operation did not finish within {timeout} s") from None
        self._raise_posted()  # every call posted before this one has run by now
        return result

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a plain function on the loop thread (serialized with all loop work) and return its result."""
        async def wrapper() -> T:
            return fn(*args)

        return self.run(wrapper())

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run a plain function on the loop thread without waiting for it, in order with everything submitted
        before and after (a release the caller need not wait for: each wait is a thread switch and a GIL
        hand-over). What it raises is raised by every later :meth:`run` and :meth:`call` (the state it was to
        update is not what it should be: nothing may go on as if it were)."""
        def run() -> None:
            try:
                fn(*args)
            except BaseException as exc:  # noqa: BLE001 - handed to every later caller
                logger.error("a call posted to the I/O loop failed", exc_info=exc)
                self._posted_error = self._posted_error or exc

        self.loop.call_soon_threadsafe(run)

    def _raise_posted(self) -> None:
        if self._posted_error is not None:
            raise RuntimeError(f"a call posted to the I/O loop failed: {self._posted_error!r}") from self._posted_error

    async def wrap(self, coro: Awaitable[T]) -> T:
        """Await ``coro`` (running on this loop) from another event loop."""
        result = await asyncio.wrap_future(self.submit(coro))
        self._raise_posted()
        return result

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True

        async def shutdown() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            if not self.in_loop():
                self.submit(shutdown()).result(5)
        except Exception:  # noqa: BLE001 - best effort on shutdown
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        if not self.in_loop():
            self._thread.join(5)
        if not self.loop.is_running():
            self.loop.close()


#: every loop thread made (weakly: one is dropped once its thread ended and nothing else refers to it)
_RUNNING: weakref.WeakSet[LoopThread] = weakref.WeakSet()
