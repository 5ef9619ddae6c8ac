"""GroupCommit: the store's calls run at once on the loop, committed per iteration."""

from __future__ import annotations

import asyncio
import threading

import pytest

from controller.group_commit import BATCH_MAX, GroupCommit


class Scope:
    """begin/end hooks that record the batches and fail the end of chosen ones."""

    def __init__(self, fail_end: dict[int, BaseException] | None = None,
                 fail_begin: set[int] | None = None) -> None:
        self.log: list[str] = []
        self.batches = 0
        self.fail_end = fail_end or {}
        self.fail_begin = fail_begin or set()

    def begin(self) -> None:
        self.batches += 1
        if self.batches in self.fail_begin:
            raise OSError("cannot begin")
        self.log.append("begin")

    def end(self) -> None:
        self.log.append("end")
        if self.batches in self.fail_end:
            raise self.fail_end[self.batches]


def fail() -> None:
    raise KeyError("its own error")


async def test_calls_run_at_once_on_the_loop_and_resolve_after_their_commit() -> None:
    scope = Scope()
    group = GroupCommit(begin=scope.begin, end=scope.end)
    threads: list[threading.Thread] = []

    def record(i: int) -> int:
        threads.append(threading.current_thread())
        scope.log.append(f"call {i}")
        return i * i

    futures = [group.run(record, i) for i in range(3)]
    assert scope.log == ["begin", "call 0", "call 1", "call 2"]  # ran, not committed
    assert not any(f.done() for f in futures)
    assert await asyncio.gather(*futures) == [0, 1, 4]
    assert scope.log[-1] == "end" and scope.log.count("end") == 1
    assert set(threads) == {threading.current_thread()}


async def test_the_calls_of_one_iteration_share_a_commit_and_the_next_gets_its_own() -> None:
    scope = Scope()
    group = GroupCommit(begin=scope.begin, end=scope.end)

    async def one(i: int) -> int:
        return await group.run(int, str(i))

    # tasks started together take their first step in the same iteration
    assert await asyncio.gather(*(one(i) for i in range(5))) == [0, 1, 2, 3, 4]
    assert scope.batches == 1
    assert await one(9) == 9
    assert scope.batches == 2


async def test_a_batch_ends_after_batch_max_calls() -> None:
    scope = Scope()
    group = GroupCommit(begin=scope.begin, end=scope.end)
    futures = [group.run(int, "1") for _ in range(BATCH_MAX + 1)]
    assert futures[BATCH_MAX - 1].done() and not futures[BATCH_MAX].done()
    await asyncio.gather(*futures)
    assert scope.batches == 2 and scope.log.count("end") == 2


async def test_an_exception_reaches_its_caller_only() -> None:
    scope = Scope()
    group = GroupCommit(begin=scope.begin, end=scope.end)
    results = await asyncio.gather(group.run(int, "1"), group.run(fail), group.run(int, "2"),
                                   return_exceptions=True)
    assert results[0] == 1 and results[2] == 2
    assert isinstance(results[1], KeyError)


async def test_an_end_that_fails_fails_every_call_of_its_batch() -> None:
    scope = Scope(fail_end={1: OSError("disk I/O error")})
    group = GroupCommit(begin=scope.begin, end=scope.end)
    results = await asyncio.gather(group.run(int, "3"), group.run(fail), group.run(int, "4"),
                                   return_exceptions=True)
    assert [str(r) for r in results] == ["disk I/O error", "'its own error'", "disk I/O error"]
    assert isinstance(results[1], KeyError)
    assert await group.run(int, "5") == 5  # the next batch is not affected


async def test_a_begin_that_fails_fails_only_the_call_that_needed_it() -> None:
    scope = Scope(fail_begin={1})
    group = GroupCommit(begin=scope.begin, end=scope.end)
    ran: list[int] = []
    with pytest.raises(OSError, match="cannot begin"):
        await group.run(ran.append, 1)
    assert ran == []
    await group.run(ran.append, 2)  # the next call begins a batch again
    assert ran == [2] and scope.log == ["begin", "end"]


async def test_a_call_raising_stop_iteration_blocks_no_caller() -> None:
    """A Future refuses StopIteration: its caller would wait forever."""
    group = GroupCommit(begin=lambda: None, end=lambda: None)

    def stop() -> None:
        raise StopIteration

    failed, after = group.run(stop), group.run(int, "3")
    async with asyncio.timeout(5):
        with pytest.raises(RuntimeError, match="StopIteration"):
            await failed
        assert await after == 3


async def test_a_call_whose_caller_was_cancelled_has_run() -> None:
    """A store write that was made stays made, whatever its caller does next."""
    group = GroupCommit(begin=lambda: None, end=lambda: None)
    ran: list[str] = []
    write = asyncio.ensure_future(group.run(ran.append, "written"))
    write.cancel()
    with pytest.raises(asyncio.CancelledError):
        await write
    assert ran == ["written"]
    assert await group.run(len, ran) == 1  # the batch's end skipped the cancelled future


async def test_stop_commits_the_running_batch_then_refuses_new_calls() -> None:
    scope = Scope()
    group = GroupCommit(begin=scope.begin, end=scope.end)
    pending = [group.run(int, str(i)) for i in range(3)]
    group.stop()
    assert scope.log == ["begin", "end"]
    assert await asyncio.gather(*pending) == [0, 1, 2]
    with pytest.raises(RuntimeError, match="stopped"):
        group.run(int)
    group.stop()  # a second stop is harmless


def test_a_group_serves_one_event_loop() -> None:
    group = GroupCommit(begin=lambda: None, end=lambda: None)

    async def use() -> int:
        return await group.run(int, "7")

    assert asyncio.run(use()) == 7
    with pytest.raises(RuntimeError, match="another event loop"):
        asyncio.run(use())


async def test_hold_lets_the_open_batch_end_then_keeps_calls_until_release() -> None:
    """What the checkpoint thread needs to start the WAL over: a moment with no
    transaction open, without blocking the loop or losing the order of calls."""
    scope = Scope()
    group = GroupCommit(begin=scope.begin, end=scope.end)
    first = group.run(scope.log.append, "call 0")
    quiet = threading.Event()
    group.hold(quiet)
    assert not quiet.is_set()  # a batch is open
    held = [group.run(scope.log.append, f"call {i}") for i in (1, 2)]
    await first
    assert quiet.is_set()
    await asyncio.sleep(0.01)
    assert not any(f.done() for f in held)
    assert scope.log == ["begin", "call 0", "end"]
    group.release()
    late = group.run(scope.log.append, "call 3")
    await asyncio.gather(*held, late)
    assert scope.log == ["begin", "call 0", "end", "begin", "call 1", "call 2", "call 3", "end"]


async def test_hold_with_no_batch_open_is_quiet_at_once_and_stop_releases() -> None:
    scope = Scope()
    group = GroupCommit(begin=scope.begin, end=scope.end)
    quiet = threading.Event()
    group.hold(quiet)
    assert quiet.is_set()
    held = group.run(scope.log.append, "held")
    group.stop()  # a store closing while held: the held calls run and commit
    assert await held is None
    assert scope.log == ["begin", "held", "end"]
