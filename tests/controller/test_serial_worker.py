"""SerialWorker: the store's thread, with results handed back in batches."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from controller.serial_worker import BATCH_MAX, SerialWorker


async def test_calls_run_in_order_on_one_thread_and_return_their_results() -> None:
    worker = SerialWorker("test-serial")
    seen: list[tuple[int, str]] = []

    def record(i: int) -> int:
        seen.append((i, threading.current_thread().name))
        return i * i

    try:
        # More callers than one batch takes: every result still reaches its caller.
        results = await asyncio.gather(*(worker.run(record, i) for i in range(3 * BATCH_MAX)))
    finally:
        worker.stop()
    assert results == [i * i for i in range(3 * BATCH_MAX)]
    assert [i for i, _ in seen] == list(range(3 * BATCH_MAX))
    assert {name for _, name in seen} == {"test-serial"}


async def test_an_exception_reaches_its_caller_only() -> None:
    worker = SerialWorker("test-serial")

    def fail() -> None:
        raise KeyError("boom")

    try:
        ok_before, failed, ok_after = await asyncio.gather(
            worker.run(int, "1"), worker.run(fail), worker.run(int, "2"),
            return_exceptions=True)
    finally:
        worker.stop()
    assert (ok_before, ok_after) == (1, 2)
    assert isinstance(failed, KeyError)


async def test_a_call_raising_stop_iteration_blocks_no_caller() -> None:
    """A Future refuses StopIteration: its caller and every later call of the same
    batch waited forever."""
    worker = SerialWorker("test-serial")
    gate = threading.Event()

    def stop() -> None:
        raise StopIteration

    try:
        blocker = worker.run(gate.wait, 5)
        failed, after = worker.run(stop), worker.run(int, "3")  # one batch, after the gate
        gate.set()
        assert await blocker is True
        async with asyncio.timeout(5):
            with pytest.raises(RuntimeError, match="StopIteration"):
                await failed
            assert await after == 3
    finally:
        worker.stop()


async def test_a_call_whose_caller_was_cancelled_still_runs() -> None:
    """A store write that was handed over happens, as with an executor once started."""
    worker = SerialWorker("test-serial")
    gate = threading.Event()
    ran: list[str] = []
    try:
        blocker = worker.run(gate.wait, 5)
        write = asyncio.ensure_future(worker.run(ran.append, "written"))
        await asyncio.sleep(0)
        write.cancel()
        gate.set()
        assert await blocker is True
        assert await worker.run(lambda: list(ran)) == ["written"]
    finally:
        worker.stop()
    with pytest.raises(asyncio.CancelledError):
        await write


async def test_stop_lets_submitted_calls_finish_then_refuses_new_ones() -> None:
    worker = SerialWorker("test-serial")
    done: list[int] = []
    pending = [worker.run(done.append, i) for i in range(5)]
    worker.stop()  # blocking: the thread ran all five before it ended
    assert done == [0, 1, 2, 3, 4]
    await asyncio.gather(*pending)
    with pytest.raises(RuntimeError, match="stopped"):
        worker.run(int)
    worker.stop()  # a second stop is harmless


def test_a_worker_serves_one_event_loop() -> None:
    worker = SerialWorker("test-serial")

    async def use() -> int:
        return await worker.run(int, "7")

    try:
        assert asyncio.run(use()) == 7
        with pytest.raises(RuntimeError, match="another event loop"):
            asyncio.run(use())
    finally:
        worker.stop()


def test_stopping_a_worker_never_used_needs_no_thread() -> None:
    worker = SerialWorker("test-serial")
    worker.stop()
    with pytest.raises(RuntimeError, match="stopped"):
        worker.run(int)



class Scope:
    """begin/end hooks that record the batches and fail the end of chosen ones."""

    def __init__(self, fail_end: dict[int, Exception] | None = None) -> None:
        self.log: list[str] = []
        self.batches = 0
        self.fail_end = fail_end or {}
        self.hold_end = threading.Event()
        self.hold_end.set()
        self.ending = threading.Event()

    def begin(self) -> None:
        self.batches += 1
        self.log.append("begin")

    def end(self) -> None:
        self.log.append("end")
        if self.batches > 1:
            self.ending.set()
            self.hold_end.wait(5)
        if self.batches in self.fail_end:
            raise self.fail_end[self.batches]


async def held_batch(worker: SerialWorker, calls: list[tuple[Any, ...]]) -> list[Any]:
    """Submit ``calls`` while the worker is busy, so that they make one batch."""
    started, gate = threading.Event(), threading.Event()

    def hold() -> None:
        started.set()
        gate.wait(5)

    first = worker.run(hold)
    assert await asyncio.to_thread(started.wait, 5)
    futures = [worker.run(*call) for call in calls]
    gate.set()
    await first
    return futures


async def test_a_batch_shares_one_scope_and_its_results_wait_for_the_end_of_it() -> None:
    """begin/end wrap each batch (the store's transaction): no caller resumes before
    end returned, so none sees a result that is not yet committed."""
    scope = Scope()
    scope.hold_end.clear()
    worker = SerialWorker("test-serial", begin=scope.begin, end=scope.end)
    try:
        calls = await held_batch(worker, [(scope.log.append, f"call {i}") for i in range(3)])
        assert await asyncio.to_thread(scope.ending.wait, 5)
        await asyncio.sleep(0.1)
        assert not any(call.done() for call in calls)  # they ran; their end is pending
        scope.hold_end.set()
        assert await asyncio.gather(*calls) == [None, None, None]
    finally:
        scope.hold_end.set()
        worker.stop()
    # the holding call's batch, then the three calls in one batch
    assert scope.log == ["begin", "end", "begin", "call 0", "call 1", "call 2", "end"]


def fail() -> None:
    raise KeyError("its own error")


async def test_an_end_that_fails_fails_every_call_of_its_batch() -> None:
    scope = Scope(fail_end={2: OSError("disk I/O error")})
    worker = SerialWorker("test-serial", begin=scope.begin, end=scope.end)
    try:
        batch = await held_batch(worker, [(int, "3"), (fail,), (int, "4")])
        results = await asyncio.gather(*batch, return_exceptions=True)
        # the next batch is not affected
        assert await worker.run(int, "5") == 5
    finally:
        worker.stop()
    assert [str(r) for r in results] == ["disk I/O error", "'its own error'", "disk I/O error"]
    assert isinstance(results[1], KeyError)


async def test_a_begin_that_fails_runs_no_call_of_its_batch() -> None:
    ran: list[int] = []

    def begin() -> None:
        raise OSError("cannot begin")

    worker = SerialWorker("test-serial", begin=begin)
    try:
        results = await asyncio.gather(*(worker.run(ran.append, i) for i in range(3)),
                                       return_exceptions=True)
    finally:
        worker.stop()
    assert ran == []
    assert [str(r) for r in results] == ["cannot begin"] * 3
