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
