from __future__ import annotations

from pathlib import Path

from controller.states import State
from controller.store import JobRow, Store


def job(name: str) -> JobRow:
    return JobRow(id=f"id-{name}", seq=0, name=name, jid=name, kind="plugin",
                  state=State.QUEUED, attempt=1, agent=None,
                  spec={"cpu_limit": 500, "memory_limit": 100, "gpu_limit": 0}, image="i",
                  cmd="c", message="queued")


async def test_terminal_states_are_sinks_and_old_attempts_are_fenced(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite3")
    await store.open()
    try:
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
    finally:
        await store.close()


async def test_state_survives_reopening_and_usage_counts_active_jobs(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite3")
    await store.open()
    a = await store.insert_job(job("a"))
    b = await store.insert_job(job("b"))
    await store.insert_job(job("c"))
    assert await store.assign(a.id, 1, "h1") and await store.assign(b.id, 1, "h1")
    await store.apply_event(b.id, 1, State.COMPLETE, exit_code=0)
    await store.close()

    store = Store(tmp_path / "db.sqlite3")
    await store.open()
    try:
        assert await store.usage_by_agent() == {"h1": (500, 100, 0)}
        assert [j.name for j in await store.queued()] == ["c"]
        assert (await store.insert_job(job("d"))).seq == 4  # ordering goes on
        removed = await store.mark_removed(a.id)
        assert removed is not None and removed.state is State.CANCELED and removed.removed
        assert await store.get_live("a") is None
        # The name is free again for a new job.
        assert (await store.insert_job(JobRow(**{**job("a").__dict__, "id": "id-a2"}))).name == "a"
    finally:
        await store.close()


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
