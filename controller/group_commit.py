"""Calls run at once on the event loop's thread, committed together at the end of
the loop's iteration.

The store's SQLite calls take microseconds, and with ``synchronous=NORMAL`` a
commit writes to the page cache without waiting for the disk; the WAL's
checkpoints, which do wait, run on a thread of their own (``Checkpointer``).
What a store thread cost was the hand-over: the loop and the thread traded the
GIL at every statement (the sqlite3 module lets go of it around each step), each
trade a futex wake and a context switch, plus a self-pipe wake-up per batch of
results.  On a 2-core VM that was 0.3-0.5 ms of CPU per job (bench 9).

So a call runs as soon as it is made, inside the batch's transaction.  Its caller
waits on a future that is completed only once the batch's ``end`` (the commit)
returned: every call made during one iteration of the loop shares one commit,
and nobody sees a result before it is durable.  When ``end`` raises, every call
of the batch gets that error.

The checkpoint thread sometimes needs a moment with no transaction open (to start
the WAL over): ``hold`` stops beginning batches once the open one ended, and the
calls made meanwhile wait, in order, until ``release``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

BATCH_MAX = 64  # calls sharing one commit (a bound on what one failure takes down)

_Done = tuple[asyncio.Future[Any], Any, BaseException | None]
_Call = tuple[asyncio.Future[Any], Callable[..., Any], tuple[Any, ...]]


class GroupCommit:
    """Run calls on the loop's thread in batches that share one ``begin``/``end``.

    ``begin`` opens a batch (its failure fails the call that needed it); ``end``
    closes it after the loop's current iteration, or after ``BATCH_MAX`` calls.
    """

    def __init__(self, *, begin: Callable[[], None], end: Callable[[], None]) -> None:
        self._begin = begin
        self._end = end
        self._batch: list[_Done] | None = None
        self._closing: asyncio.Handle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._held: list[_Call] | None = None  # calls made while held, in order
        self._quiet: threading.Event | None = None  # to set when the open batch ends
        self._stopped = False

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The loop this serves (None until the first call)."""
        return self._loop

    def run(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        if self._stopped:
            raise RuntimeError("the store's batches are stopped")
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif loop is not self._loop:
            raise RuntimeError("the store serves another event loop")
        future: asyncio.Future[T] = loop.create_future()
        if self._held is not None:
            self._held.append((future, fn, args))
        else:
            self._start(future, fn, args)
        return future

    def _start(self, future: asyncio.Future[Any], fn: Callable[..., Any],
               args: tuple[Any, ...]) -> None:
        if self._batch is None:
            try:
                self._begin()
            except BaseException as exc:  # no batch: only this call fails
                if not future.cancelled():
                    future.set_exception(exc)
                return
            self._batch = []
            # After the callbacks already waiting: the rest of this iteration's
            # calls join the batch.
            assert self._loop is not None
            self._closing = self._loop.call_soon(self.flush)
        self._batch.append(_call(future, fn, args))
        if len(self._batch) >= BATCH_MAX:
            self.flush()

    def hold(self, quiet: threading.Event) -> None:
        """Begin no batch until :meth:`release`; set ``quiet`` once none is open.
        Call on the loop's thread (from another: ``loop.call_soon_threadsafe``)."""
        if self._held is None:
            self._held = []
        if self._batch is None:
            quiet.set()
        else:
            self._quiet = quiet

    def release(self) -> None:
        """Run the calls made since :meth:`hold`, in order (on the loop's thread)."""
        held, self._held = self._held, None
        self._quiet = None  # released before the open batch ended: nobody waits now
        for call in held or ():
            self._start(*call)

    def flush(self) -> None:
        """End the running batch now and hand its results to their callers."""
        batch, self._batch = self._batch, None
        if self._closing is not None:
            self._closing.cancel()
            self._closing = None
        if batch is None:
            return
        try:
            self._end()
        except BaseException as exc:  # nothing of the batch took effect
            batch = [(future, None, error or exc) for future, _, error in batch]
        finally:
            if self._quiet is not None:
                self._quiet.set()
                self._quiet = None
        for future, result, error in batch:
            if future.cancelled():
                continue
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

    def stop(self) -> None:
        """End the running batch and run the held calls; refuse calls from now on."""
        self.release()
        self.flush()
        self._stopped = True


def _call(future: asyncio.Future[Any], fn: Callable[..., Any], args: tuple[Any, ...]) -> _Done:
    try:
        return future, fn(*args), None
    except StopIteration as exc:
        # A Future refuses it (set_exception raises): the caller would wait forever.
        error = RuntimeError("the call raised StopIteration")
        error.__cause__ = exc
        return future, None, error
    except BaseException as exc:  # handed to its caller (the calls after it still run)
        return future, None, exc
