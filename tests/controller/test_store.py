from __future__ import annotations

import asyncio
import contextlib
import random
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.states import State
from controller.store import JobRow, Store


def job(name: str) -> JobRow:
    return JobRow(id=f"id-{name}", seq=0, name=name, jid=name, kind="plugin",
                  state=State.QUEUED, attempt=1, agent=None,
                  spec={"cpu_limit": 500, "memory_limit": 100, "gpu_limit": 0}, image="i",
                  cmd="c", message="queued")


@contextlib.asynccontextmanager
async def opened_store(path: Path) -> AsyncIterator[Store]:
    """A store on ``path``, open for the body and closed after it."""
    store = Store(path)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def test_terminal_states_are_sinks_and_old_attempts_are_fenced(tmp_path: Path) -> None:
    async with opened_store(tmp_path / "db.sqlite3") as store:
        j = await store.insert_job(job("a"))
        assert await store.assign(j.id, 1, "h1")
        assert await store.apply_event(j.id, 1, State.RUNNING, message="running")
        done = await store.apply_event(j.id, 1, State.EXECUTOR_ERROR, message="exited 3",
                                       exit_code=3)
        assert done is not None and done.state is State.EXECUTOR_ERROR
        # A late "running" or a second final report changes nothing.
        assert await store.apply_event(j.id, 1, State.RUNNING) is None
        assert await store.apply_event(j.id, 1, State.COMPLETE, exit_code=0) is None
        # A new attempt; reports for the old one are ignored from now on.
        again = await store.restart_job(j.id, j.spec, "i", "c")
        assert again.attempt == 2 and again.state is State.QUEUED and again.agent is None
        assert await store.apply_event(j.id, 1, State.COMPLETE, exit_code=0) is None
        assert await store.assign(j.id, 2, "h2")
        assert await store.attempt_agent(j.id, 1) == "h1"
        assert await store.attempt_agent(j.id, 2) == "h2"
        finished = await store.apply_event(j.id, 2, State.COMPLETE, exit_code=0)
        assert finished is not None and finished.state is State.COMPLETE


async def test_state_survives_reopening_and_usage_counts_active_jobs(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite3")
    await store.open()
    a = await store.insert_job(job("a"))
    b = await store.insert_job(job("b"))
    await store.insert_job(job("c"))
    assert await store.assign(a.id, 1, "h1") and await store.assign(b.id, 1, "h1")
    await store.apply_event(b.id, 1, State.COMPLETE, exit_code=0)
    await store.close()

    async with opened_store(tmp_path / "db.sqlite3") as store:
        assert await store.usage_by_agent() == {"h1": (500, 100, 0)}
        assert [j.name for j in await store.queued()] == ["c"]
        assert (await store.insert_job(job("d"))).seq == 4  # ordering goes on
        removed = await store.mark_removed(a.id)
        assert removed is not None and removed.state is State.CANCELED and removed.removed
        assert await store.get_live("a") is None
        # The name is free again for a new job.
        assert (await store.insert_job(JobRow(**{**job("a").__dict__, "id": "id-a2"}))).name == "a"


async def test_get_live_reflects_every_write_that_completed(tmp_path: Path) -> None:
    # get_live answers from a cache of rows; each write must show in the next read.
    store = Store(tmp_path / "db.sqlite3")
    await store.open()

    async def live() -> tuple[State, int, str | None, str, str] | None:
        row = await store.get_live("a")
        return None if row is None else (row.state, row.attempt, row.agent, row.message,
                                         row.logs)

    try:
        assert await live() is None
        j = await store.insert_job(job("a"))
        assert await live() == (State.QUEUED, 1, None, "queued", "")
        assert await live() == (State.QUEUED, 1, None, "queued", "")  # a cached read
        assert await store.assign(j.id, 1, "h1")
        assert await live() == (State.ASSIGNED, 1, "h1", "created", "")
        assert await store.requeue(j.id, 1, "agent busy")
        assert await live() == (State.QUEUED, 1, None, "agent busy", "")
        assert await store.assign(j.id, 1, "h2")
        await live()
        assert await store.apply_event(j.id, 1, State.RUNNING, message="running")
        assert await live() == (State.RUNNING, 1, "h2", "running", "")
        await store.set_logs(j.id, 1, "some output")
        assert await live() == (State.RUNNING, 1, "h2", "running", "some output")
        await store.apply_event(j.id, 1, State.EXECUTOR_ERROR, message="exited 1", exit_code=1)
        assert await live() == (State.EXECUTOR_ERROR, 1, "h2", "exited 1", "some output")
        await store.restart_job(j.id, j.spec, "i", "c")
        assert await live() == (State.QUEUED, 2, None, "queued", "")
        (await store.get_live("a")).message = "changed by a caller"  # type: ignore[union-attr]
        assert (await live() or ())[3] == "queued"  # callers get copies
        await store.mark_removed(j.id)
        assert await live() is None
        again = await store.insert_job(_renamed("a"))  # the name is free again
        assert again.id != j.id and await live() == (State.QUEUED, 1, None, "queued", "")
    finally:
        await store.close()


def _renamed(name: str) -> JobRow:
    row = job(name)
    row.id = f"id-{name}-2"
    return row


class FaultyConnection:
    """The store's SQLite connection, failing where a test says (what a full disk or
    an I/O error does to it); everything else goes to the real connection."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.commits_before_failure: int | None = None  # None: no COMMIT fails
        self.roll_back_on: str | None = None  # SQL text: SQLite rolls back, then raises
        self.stuck = False  # the next COMMIT and ROLLBACK fail, the transaction stays
        self.fail_on: str | None = None  # SQL text: this statement fails (an I/O error)...
        self.fail_after = 0  # ...after this many of them went through

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if self.stuck and sql in ("COMMIT", "ROLLBACK"):
            if sql == "ROLLBACK":
                self.stuck = False
            raise sqlite3.OperationalError(f"{sql} failed: disk I/O error")
        if sql == "COMMIT" and self.commits_before_failure is not None:
            if self.commits_before_failure == 0:
                self.commits_before_failure = None
                self.db.execute("ROLLBACK")
                raise sqlite3.OperationalError("disk I/O error")
            self.commits_before_failure -= 1
        if self.fail_on is not None and sql.startswith(self.fail_on):
            if self.fail_after == 0:
                self.fail_on = None
                raise sqlite3.OperationalError("disk I/O error")
            self.fail_after -= 1
        if self.roll_back_on is not None and sql.startswith(self.roll_back_on):
            self.roll_back_on = None
            self.db.execute("ROLLBACK")
            raise sqlite3.OperationalError("database or disk is full")
        return self.db.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)


@contextlib.contextmanager
def no_store_calls(store: Store) -> Iterator[None]:
    """Fail every store call that would reach the database while the body runs: what
    the body reads must come from memory."""
    def refuse(*args: Any) -> Any:
        raise AssertionError("a store call reached the database")

    store._run = refuse  # type: ignore[method-assign]
    try:
        yield
    finally:
        del store._run


async def one_batch(store: Store, *calls: Awaitable[Any],
                    arm: Callable[[], None] = lambda: None) -> list[Any]:
    """Run store calls, in this order, as one batch: they all start in the same
    iteration of the loop.  ``arm`` is called just before."""
    arm()
    tasks = [asyncio.ensure_future(call) for call in calls]
    return await asyncio.gather(*tasks, return_exceptions=True)


async def open_faulty(path: Path) -> tuple[Store, FaultyConnection]:
    store = Store(path)
    await store.open()
    faulty = FaultyConnection(store.db)
    store._db = faulty  # type: ignore[assignment]
    return store, faulty


async def test_the_calls_of_a_batch_commit_together_and_a_failed_one_undoes_only_itself(
        tmp_path: Path) -> None:
    async with opened_store(tmp_path / "db.sqlite3") as store:
        # an attempt row in the way: inserting job "x" fails at its second statement
        await store._run(lambda: store.db.execute(
            "INSERT INTO attempts VALUES ('id-x', 1, NULL, 0)"))
        a, x, b = await one_batch(store, store.insert_job(job("a")), store.insert_job(job("x")),
                                  store.insert_job(job("b")))
        assert isinstance(x, sqlite3.IntegrityError)
        assert a.name == "a" and b.name == "b"
    async with opened_store(tmp_path / "db.sqlite3") as store:
        assert {j.name for j in await store.list_jobs()} == {"a", "b"}  # no half of "x"


async def test_a_commit_that_fails_fails_every_call_of_its_batch_and_changes_nothing(
        tmp_path: Path) -> None:
    store, faulty = await open_faulty(tmp_path / "db.sqlite3")
    try:
        e = await store.insert_job(job("e"))
        assert await store.assign(e.id, 1, "h1")
        assert (await store.get_live("e")).state is State.ASSIGNED  # type: ignore[union-attr]
        # the commit of this batch fails
        results = await one_batch(
            store, store.insert_job(job("a")),
            store.apply_event(e.id, 1, State.RUNNING, agent="h1", message="running"),
            store.get(e.id), arm=lambda: setattr(faulty, "commits_before_failure", 0))
        assert [str(r) for r in results] == ["disk I/O error"] * 3
        # nothing of the batch is seen, cached or stored; the next batch works
        assert await store.get_live("a") is None
        assert (await store.get_live("e")).state is State.ASSIGNED  # type: ignore[union-attr]
        running = await store.apply_event(e.id, 1, State.RUNNING, agent="h1", message="running")
        assert running is not None and running.state is State.RUNNING
    finally:
        await store.close()
    async with opened_store(tmp_path / "db.sqlite3") as store:
        assert [(j.name, j.state) for j in await store.list_jobs()] == [("e", State.RUNNING)]


async def test_a_transaction_sqlite_rolled_back_fails_the_whole_batch(tmp_path: Path) -> None:
    """On a full disk SQLite may roll back the whole transaction by itself: the calls
    of the batch that had succeeded before it must not report a write that is gone."""
    store, faulty = await open_faulty(tmp_path / "db.sqlite3")
    try:
        faulty.roll_back_on = "INSERT INTO attempts"
        results = await one_batch(store, store.list_jobs(), store.insert_job(job("a")),
                                  store.insert_job(job("b")))
        assert all(isinstance(r, sqlite3.OperationalError) for r in results), results
        assert str(results[1]) == "database or disk is full"
        assert await store.get_live("a") is None and await store.get_live("b") is None
        assert (await store.insert_job(job("c"))).name == "c"
        assert {j.name for j in await store.list_jobs()} == {"c"}
    finally:
        await store.close()


async def test_a_job_just_written_is_read_from_memory(
        tmp_path: Path) -> None:
    """Status GETs poll jobs that just changed: each write leaves the new row in
    memory, so the read after it needs no statement and no commit to wait for."""
    async with opened_store(tmp_path / "db.sqlite3") as store:
        j = await store.insert_job(job("a"))
        writes: list[tuple[Callable[[], Awaitable[Any]], tuple[State, str, str]]] = [
            (lambda: store.assign(j.id, 1, "h1"), (State.ASSIGNED, "created", "")),
            (lambda: store.apply_event(j.id, 1, State.RUNNING, agent="h1", message="running"),
             (State.RUNNING, "running", "")),
            (lambda: store.set_logs(j.id, 1, "out"), (State.RUNNING, "running", "out")),
            (lambda: store.apply_event(j.id, 1, State.COMPLETE, agent="h1", message="exited",
                                       exit_code=0), (State.COMPLETE, "exited", "out")),
        ]
        seen = [await read_from_memory(store)]
        for write, _ in writes:
            await write()
            seen.append(await read_from_memory(store))
    assert seen == [(State.QUEUED, "queued", ""), *(want for _, want in writes)]


async def read_from_memory(store: Store) -> tuple[State, str, str]:
    with no_store_calls(store):
        row = await store.get_live("a")
    assert row is not None
    return row.state, row.message, row.logs


async def test_a_transaction_left_open_by_failed_commit_and_rollback_is_not_built_on(
        tmp_path: Path) -> None:
    """Later writes must not join a transaction nobody will commit (they would be
    reported, cached and served, then lost)."""
    store, faulty = await open_faulty(tmp_path / "db.sqlite3")
    try:
        faulty.stuck = True
        with pytest.raises(sqlite3.OperationalError, match="COMMIT failed"):
            await store.insert_job(job("a"))
        assert faulty.db.in_transaction  # what the failed rollback left
        b = await store.insert_job(job("b"))
        assert b.name == "b" and not faulty.db.in_transaction
        assert await store.get_live("a") is None
    finally:
        await store.close()
    assert committed_names(tmp_path / "db.sqlite3") == ["b"]


async def test_close_ends_the_database_and_its_checkpoints_even_after_a_lost_batch(
        tmp_path: Path) -> None:
    store, faulty = await open_faulty(tmp_path / "db.sqlite3")
    results = await one_batch(
        store, store.insert_job(job("a")), store.close(),
        arm=lambda: setattr(faulty, "roll_back_on", "INSERT INTO attempts"))
    assert [str(r) for r in results] == ["database or disk is full",
                                         "the store's transaction was rolled back"]
    assert store._db is None and store._checkpointer._thread is None
    assert committed_names(tmp_path / "db.sqlite3") == []


async def test_the_writes_before_a_close_whose_commit_fails_are_reported_failed(
        tmp_path: Path) -> None:
    store, faulty = await open_faulty(tmp_path / "db.sqlite3")
    await store.insert_job(job("a"))
    results = await one_batch(
        store, store.insert_job(job("b")), store.close(),
        arm=lambda: setattr(faulty, "commits_before_failure", 0))
    assert [str(r) for r in results] == ["disk I/O error"] * 2
    assert store._db is None and store._checkpointer._thread is None
    assert committed_names(tmp_path / "db.sqlite3") == ["a"]


async def test_reads_do_not_wait_for_another_connection_holding_the_write_lock(
        tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite3")
    await store.open()
    other = sqlite3.connect(tmp_path / "db.sqlite3", isolation_level=None)
    try:
        j = await store.insert_job(job("a"))
        other.execute("BEGIN IMMEDIATE")  # e.g. an operator's sqlite3 shell
        async with asyncio.timeout(2):  # the busy timeout is 5 s
            row = await store.get(j.id)
            assert row is not None and row.name == "a"
            assert [q.name for q in await store.queued()] == ["a"]
    finally:
        other.execute("ROLLBACK")
        other.close()
        await store.close()


def committed_names(path: Path) -> list[str]:
    db = sqlite3.connect(path)
    try:
        return [r[0] for r in db.execute("SELECT name FROM jobs ORDER BY seq")]
    finally:
        db.close()


def forget_cached_rows(store: Store) -> None:
    """Empty the store's row cache: the next reads go to the database."""
    store._live.clear()
    store._live_names.clear()


async def test_a_name_without_a_live_job_is_answered_without_a_statement(
        tmp_path: Path) -> None:
    """A submit looks its jid up first: for a new one, the answer needs no
    statement, nor a wait for a batch's commit."""
    async with opened_store(tmp_path / "db.sqlite3") as store:
        removed = await store.insert_job(job("removed"))
        await store.insert_job(job("live"))
        await store.mark_removed(removed.id)
        with no_store_calls(store):
            assert await store.get_live("new") is None
            assert await store.get_live("removed") is None
    # what is live is known again after a restart
    async with opened_store(tmp_path / "db.sqlite3") as store:
        with no_store_calls(store):
            assert await store.get_live("removed") is None
        found = await store.get_live("live")
        assert found is not None and found.id == "id-live"


async def test_a_jid_deleted_and_submitted_again_in_one_batch_is_found(tmp_path: Path) -> None:
    """The name of a job removed and inserted again in the same transaction stays
    known as live: the removal's commit must not hide the new job."""
    async with opened_store(tmp_path / "db.sqlite3") as store:
        first = await store.insert_job(job("a"))
        again = job("a")
        again.id = "id-a-again"
        results = await one_batch(store, store.mark_removed(first.id), store.insert_job(again))
        assert not any(isinstance(r, BaseException) for r in results), results
        forget_cached_rows(store)
        found = await store.get_live("a")
        assert found is not None and found.id == "id-a-again"
        # and removed then, in the next batch, it is gone
        await store.mark_removed(again.id)
        forget_cached_rows(store)
        assert await store.get_live("a") is None


async def test_assign_many_assigns_what_it_can_and_nothing_when_a_write_fails(
        tmp_path: Path) -> None:
    store, faulty = await open_faulty(tmp_path / "db.sqlite3")
    try:
        a, b, gone = [await store.insert_job(job(n)) for n in ("a", "b", "gone")]
        await store.mark_removed(gone.id)
        assert await store.assign_many([(a.id, 1, "h1"), (gone.id, 1, "h1"),
                                        (b.id, 1, "h2")]) == [True, False, True]
        c, d = [await store.insert_job(job(n)) for n in ("c", "d")]
        faulty.fail_on, faulty.fail_after = "UPDATE attempts", 1  # the second assign fails
        with pytest.raises(sqlite3.OperationalError, match="disk I/O error"):
            await store.assign_many([(c.id, 1, "h1"), (d.id, 1, "h1")])
        for cached in (True, False):  # what readers see, then what the database holds
            if not cached:
                forget_cached_rows(store)
            rows = [await store.get_live(n) for n in ("a", "b", "c", "d")]
            assert [(r.state, r.agent) for r in rows if r is not None] == [
                (State.ASSIGNED, "h1"), (State.ASSIGNED, "h2"),
                (State.QUEUED, None), (State.QUEUED, None)]
        assert await store.usage_by_agent() == {"h1": (500, 100, 0), "h2": (500, 100, 0)}
    finally:
        await store.close()


async def test_an_event_leaves_in_memory_the_row_the_database_holds(tmp_path: Path) -> None:
    """Events derive the new row from the cached one instead of reading it back:
    it must be the row the database now holds, field for field."""
    async with opened_store(tmp_path / "db.sqlite3") as store:
        j = await store.insert_job(job("a"))
        await store.assign(j.id, 1, "h1")
        await store.set_logs(j.id, 1, "tail")
        steps = [(State.RUNNING, {"message": "running", "started_at": "2026-12-07T10:00:00Z"}),
                 (State.EXECUTOR_ERROR, {"message": "exited 3", "exit_code": 3,
                                         "finished_at": "2026-12-07T10:00:05Z", "logs": "x\n"})]
        for state, values in steps:
            returned = await store.apply_event(j.id, 1, state, agent="h1", **values)
            cached = await store.get_live("a")
            stored = await store._run(store._get, j.id)
            assert returned == cached == stored, (returned, stored)
            assert stored is not None and stored.state is state


USAGE_FROM_JOBS = (
    "SELECT agent, COUNT(*), SUM(json_extract(spec, '$.cpu_limit')), "
    "SUM(json_extract(spec, '$.memory_limit')), SUM(json_extract(spec, '$.gpu_limit')) "
    "FROM jobs WHERE state IN ('ASSIGNED', 'RUNNING') AND agent IS NOT NULL GROUP BY agent")


async def assert_usage_is_the_sum_of_jobs(store: Store) -> None:
    rows = await store._run(lambda: store.db.execute(USAGE_FROM_JOBS).fetchall())
    assert await store.usage_by_agent() == {r[0]: (r[2], r[3], r[4]) for r in rows}
    assert await store.active_counts() == {r[0]: r[1] for r in rows}
    assert sorted(await store.agents_with_active_jobs()) == sorted(r[0] for r in rows)


async def test_the_room_agents_hold_follows_every_write(tmp_path: Path) -> None:
    """Placement reads what the active jobs of each agent hold from a table that
    triggers keep: after any mix of writes, refused ones and failed ones, it must be
    the sum over the jobs, and it is rebuilt from them at each open."""
    rng = random.Random(5)
    store, faulty = await open_faulty(tmp_path / "db.sqlite3")
    agents = ["h1", "h2", "h3"]
    ids: list[str] = []
    try:
        for step in range(600):
            op = rng.choice(("insert", "insert", "assign", "assign_many", "event", "event",
                             "requeue", "remove", "restart", "failed assign"))
            pick = rng.choice(ids) if ids else None
            if op == "insert" or pick is None:
                new = job(f"j{step}")
                new.id = f"id-{step}"
                new.spec = {"cpu_limit": rng.choice((0, 100, 250)),
                            "memory_limit": rng.choice((64, 500)), "gpu_limit": rng.choice((0, 1))}
                ids.append((await store.insert_job(new)).id)
                continue
            row = await store.get(pick)
            assert row is not None
            if op == "assign":
                await store.assign(pick, row.attempt, rng.choice(agents))
            elif op == "assign_many":
                picks = rng.sample(ids, min(3, len(ids)))
                rows = [await store.get(i) for i in picks]
                await store.assign_many([(r.id, r.attempt, rng.choice(agents))
                                         for r in rows if r is not None])
            elif op == "event":
                state = rng.choice((State.RUNNING, State.COMPLETE, State.EXECUTOR_ERROR,
                                    State.LOST))
                await store.apply_event(pick, rng.choice((row.attempt, row.attempt - 1)), state,
                                        agent=rng.choice((row.agent, "h3", None)))
            elif op == "requeue":
                await store.requeue(pick, row.attempt, "agent refused it")
            elif op == "remove":
                await store.mark_removed(pick)
            elif op == "restart" and row.terminal:
                await store.restart_job(pick, row.spec, "i", "c")
            elif op == "failed assign":  # its second statement fails: all of it is undone
                faulty.fail_on = "UPDATE attempts"
                with contextlib.suppress(sqlite3.OperationalError):
                    await store.assign(pick, row.attempt, rng.choice(agents))
                faulty.fail_on = None
            if step % 25 == 0:
                await assert_usage_is_the_sum_of_jobs(store)
        await assert_usage_is_the_sum_of_jobs(store)
        assert await store.usage_by_agent()  # the walk left some jobs on agents
        await store._run(lambda: store.db.execute("UPDATE agent_usage SET cpu = cpu + 1"))
    finally:
        await store.close()
    # the drift made above, on purpose, is undone at open
    async with opened_store(tmp_path / "db.sqlite3") as store:
        await assert_usage_is_the_sum_of_jobs(store)


async def test_removing_a_removed_job_again_does_not_hide_the_job_now_under_its_name(
        tmp_path: Path) -> None:
    async with opened_store(tmp_path / "db.sqlite3") as store:
        old = await store.insert_job(job("a"))
        await store.mark_removed(old.id)
        new = job("a")
        new.id = "id-a-new"
        await store.insert_job(new)
        again = await store.mark_removed(old.id)  # a late second DELETE of the old one
        assert again is not None and again.removed
        forget_cached_rows(store)
        found = await store.get_live("a")
        assert found is not None and found.id == "id-a-new"


def names_in_database_file(path: Path) -> list[str]:
    """The live names in the database file itself, the WAL ignored."""
    db = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
    try:
        return [n for (n,) in db.execute("SELECT name FROM jobs WHERE removed = 0")]
    except sqlite3.OperationalError:  # not even the schema was copied yet
        return []
    finally:
        db.close()


async def test_commits_reach_the_database_file_through_the_checkpoint_thread(
        tmp_path: Path) -> None:
    """The loop's connection never checkpoints (that waits for the disk): the
    Checkpointer's thread copies the WAL into the database file."""
    path = tmp_path / "db.sqlite3"
    store = Store(path)
    store._checkpointer.interval = 0.05
    async with contextlib.AsyncExitStack() as stack:
        await store.open()
        stack.push_async_callback(store.close)
        assert store.db.execute("PRAGMA wal_autocheckpoint").fetchone() == (0,)
        await store.insert_job(job("a"))
        for _ in range(100):  # bounded: 5 s
            if names_in_database_file(path) == ["a"]:
                break
            await asyncio.sleep(0.05)
        assert names_in_database_file(path) == ["a"]  # autocheckpoint is off: the thread


async def test_the_wal_starts_over_under_steady_writes_and_nothing_is_lost(
        tmp_path: Path) -> None:
    """Under writes that never pause, a passive checkpoint never lets the WAL start
    over: the checkpoint thread holds the batches for a moment to restart it."""
    path = tmp_path / "db.sqlite3"
    store = Store(path)
    store._checkpointer.interval = 0.02
    names: list[str] = []

    def slow_read() -> int:
        # a transaction open nearly all the time: a plain RESTART would find it busy
        count = store.db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
        time.sleep(0.002)
        return int(count)

    async def writer(k: int) -> None:
        deadline = time.monotonic() + 10
        for i in range(2000):  # bounded; stops after a few checkpoints
            if store._checkpointer.checkpoints >= 3 or time.monotonic() > deadline:
                return
            row = await store.insert_job(job(f"w{k}-{i}"))
            assert await store.assign(row.id, 1, "h1")
            await store._run(slow_read)
            names.append(row.name)

    async with contextlib.AsyncExitStack() as stack:
        await store.open()
        stack.push_async_callback(store.close)
        async with asyncio.timeout(60):
            await asyncio.gather(*(writer(k) for k in range(8)))
        assert store._checkpointer.checkpoints >= 3
        assert store._checkpointer.restarts_missed == 0  # the batches held, each time
        assert store._checkpointer.failures == 0
        # the WAL holds the marker's write and what followed it, not a second of writes
        frames = store.db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]
        assert frames < 200, frames
    assert sorted(committed_names(path)) == sorted(names)


async def test_an_idle_store_is_not_checkpointed_again(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite3")
    store._checkpointer.interval = 0.02
    async with contextlib.AsyncExitStack() as stack:
        await store.open()
        stack.push_async_callback(store.close)
        await store.insert_job(job("a"))
        for _ in range(250):  # bounded: 5 s
            if store._checkpointer.checkpoints:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)  # ten intervals without writes
        assert store._checkpointer.checkpoints == 1
