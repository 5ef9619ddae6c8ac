"""SerialWorker: the store's thread, with results handed back in batches."""

from __future__ import annotations

import asyncio
import threading

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
