"""One thread that runs blocking calls in arrival order for an event loop.

It does what a one-thread ``ThreadPoolExecutor`` with ``run_in_executor`` does,
with one difference that matters under load: results go back to the loop in
batches.  ``run_in_executor`` wakes the loop once per call (a self-pipe write, a
concurrent future chained to an asyncio one, a GIL hand-over each way), which on
a small VM costs about 0.17 ms of CPU: more than the SQLite statement it carries.
Here the thread takes every call already waiting, runs them, and hands all the
results back with one wake-up, so 32 waiting calls cost one round trip instead of
32 (measured: 0.21 ms of CPU per call with 32 callers down to 0.045 ms).

A batch can also share one scope (``begin``/``end``: the store's one transaction
per batch, so one commit carries every write of it): results are handed back only
once ``end`` returned, and when it raises, every call of the batch gets its error.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

BATCH_MAX = 64  # calls run before their results go back (a bound on added latency)

_Call = tuple[asyncio.Future[Any], Callable[..., Any], tuple[Any, ...]]
_Done = tuple[asyncio.Future[Any], Any, BaseException | None]
_STOP = None


class SerialWorker:
    """Run calls one at a time, in order, on a dedicated thread.

    ``run`` must be called from the loop's thread.  A call is always run once it
    was submitted, even if its caller was cancelled meanwhile (a store write that
    was handed over happens), and its exception, if any, is raised to the caller.
    """

    def __init__(self, name: str, *, begin: Callable[[], None] | None = None,
                 end: Callable[[], None] | None = None) -> None:
        self._begin = begin
        self._end = end
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = False
        self._stopped = False

    def run(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        if self._stopped:
            raise RuntimeError("the worker is stopped")
        loop = asyncio.get_running_loop()
        if not self._started:
            self._loop = loop
            self._thread.start()
            self._started = True
        elif loop is not self._loop:
            raise RuntimeError("the worker serves another event loop")
        future: asyncio.Future[T] = loop.create_future()
        self._calls.put((future, fn, args))
        return future

    def stop(self) -> None:
        """Let the calls already submitted finish, then end the thread (blocking)."""
        if self._stopped:
            return
        self._stopped = True
        if self._started:
            self._calls.put(_STOP)
            self._thread.join()

    def _work(self) -> None:
        calls = self._calls
        while True:
            first = calls.get()
            if first is _STOP:
                return
            batch = [first]
            while len(batch) < BATCH_MAX:
                try:
                    call = calls.get_nowait()
                except queue.Empty:
                    break
                if call is _STOP:
                    calls.put(_STOP)  # after this batch's results are handed back
                    break
                batch.append(call)
            done = self._run_batch(batch)
            try:
                assert self._loop is not None
                self._loop.call_soon_threadsafe(_deliver, done)
            except RuntimeError:  # the loop is closed: nobody waits for these results
                pass

    def _run_batch(self, batch: list[_Call]) -> list[_Done]:
        try:
            if self._begin is not None:
                self._begin()
        except BaseException as exc:
            return [(future, None, exc) for future, _, _ in batch]
        done = [self._call(*call) for call in batch]
        try:
            if self._end is not None:
                self._end()
        except BaseException as exc:  # nothing of the batch took effect
            return [(future, None, error or exc) for future, _, error in done]
        return done

    @staticmethod
    def _call(future: asyncio.Future[Any], fn: Callable[..., Any],
              args: tuple[Any, ...]) -> _Done:
        try:
            return future, fn(*args), None
        except StopIteration as exc:
            # A Future refuses it: set_exception raised in _deliver, and this caller
            # and the rest of the batch waited forever.  Raised as a generator would.
            error = RuntimeError("the call raised StopIteration")
            error.__cause__ = exc
            return future, None, error
        except BaseException as exc:  # handed to the caller, as an executor does
            return future, None, exc


def _deliver(done: list[_Done]) -> None:
    for future, result, exc in done:
        if future.cancelled():
            continue
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)
