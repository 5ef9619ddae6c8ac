"""No orphaned workloads: a removal the agent was killed in, or the engine refused,
is finished later; workloads no record knows are named and left to the controller;
damaged records are set aside, not lost."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from agent import protocol as p
from agent.outbox import Outbox
from agent.runtimes.base import LABEL_AGENT, Handle, JobStatus, RuntimeUnavailable
from agent.runtimes.docker import DockerRuntime, DockerSettings
from agent.runtimes.fake import FakeRuntime
from agent.supervisor import DAMAGED_KEPT, Supervisor, Tracked
from tests.support.engines import BUSYBOX_IMAGE, Engine

WAIT = 20.0
LOGGER = "pfleet.agent.supervisor"


class FlakyRuntime(FakeRuntime):
    """The fake runtime with an engine that can be down (every call raises
    ``RuntimeUnavailable``) and a removal that can hang (where a kill -9 lands)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.hang = False
        self.removing = asyncio.Event()  # set when a removal reached the engine
        self.on_remove: Callable[[], None] = lambda: None

    def _check(self) -> None:
        if self.down:
            raise RuntimeUnavailable("engine down (test)")

    async def status(self, handles: list[Handle]) -> dict[str, JobStatus]:
        self._check()
        return await super().status(handles)

    async def list_ours(self) -> list[Handle]:
        self._check()
        return await super().list_ours()

    async def remove(self, handle: Handle, force: bool = True) -> None:
        self._check()
        self.on_remove()
        self.removing.set()
        if self.hang:
            await asyncio.Event().wait()  # until cancelled, like the killed agent
        await super().remove(handle, force)


def spec(job: str = "job1", attempt: int = 1) -> p.JobSpec:
    return p.JobSpec(job=job, attempt=attempt, name=f"{job}-jid", jid=f"{job}-jid",
                     kind="plugin", image="img", command=["sleep"],
                     env=["PFLEET_FAKE_RUN_FOR=600"])


def make(runtime: FakeRuntime | DockerRuntime, tmp_path: Path, storebase: Path | None = None
         ) -> tuple[Supervisor, Outbox]:
    box = Outbox(tmp_path / "outbox")
    return Supervisor(runtime, box, tmp_path / "state", storebase or tmp_path,
                      poll_interval=0.05), box


async def until(condition: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


def states(box: Outbox, job: str = "job1") -> list[str]:
    return [e.state for e in box.pending() if e.job == job]


def jobs_files(tmp_path: Path) -> list[str]:
    jobs = tmp_path / "state" / "jobs"
    return sorted(str(f.relative_to(jobs)) for f in jobs.rglob("*") if f.is_file())


async def running(sup: Supervisor, box: Outbox, job: str = "job1") -> None:
    await sup.run(spec(job))
    await until(lambda: "running" in states(box, job), f"{job} never reported running")


async def killed_during_removal(sup: Supervisor, runtime: FlakyRuntime, box: Outbox) -> None:
    """Drop job1 and stop the agent while the engine is removing its workload: the
    state a kill -9 between the record's deletion and the removal leaves."""
    runtime.hang = True
    task = asyncio.create_task(sup.remove("job1", 1, "job1-jid"))
    await asyncio.wait_for(runtime.removing.wait(), WAIT)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await sup.close()
    box.close()
    runtime.hang = False


# ------------------------------------------------------------- kill -9 / restart


@pytest.mark.parametrize("record_left", [False, True])
async def test_a_removal_cut_short_by_a_kill_is_finished_after_the_restart(
        tmp_path: Path, record_left: bool) -> None:
    runtime = FlakyRuntime()
    sup, box = make(runtime, tmp_path)
    await sup.startup()
    await running(sup, box)
    record = (tmp_path / "state" / "jobs" / "job1.json").read_text()
    await killed_during_removal(sup, runtime, box)
    assert jobs_files(tmp_path) == ["removing/job1.1.json"]  # the marker outlived the record
    assert [h.name for h in await runtime.list_ours()] == ["job1-jid"]
    if record_left:  # killed between writing the marker and deleting the record
        (tmp_path / "state" / "jobs" / "job1.json").write_text(record)

    again, box = make(runtime, tmp_path)
    await again.startup()
    try:
        await until(lambda: "removed" in states(box), "removal never finished")
        assert again.active == {}  # never started again
    finally:
        await again.close()
    assert await runtime.list_ours() == []
    assert states(box) == ["running", "removed"]
    assert jobs_files(tmp_path) == []


async def test_a_removed_event_already_queued_is_not_reported_again(tmp_path: Path) -> None:
    """Killed after ``removed`` reached the outbox but before the marker was deleted."""
    runtime = FlakyRuntime()
    sup, box = make(runtime, tmp_path)
    marker = tmp_path / "state" / "jobs" / "removing" / "job1.1.json"
    saved: list[str] = []
    runtime.on_remove = lambda: saved.append(marker.read_text())
    await sup.startup()
    await running(sup, box)
    await sup.remove("job1", 1, "job1-jid")
    await sup.close()
    box.close()
    assert states(box) == ["running", "removed"] and not marker.exists()
    marker.write_text(saved[0])

    again, box = make(runtime, tmp_path)
    await again.startup()
    try:
        await until(lambda: not marker.exists(), "the marker was never finished")
    finally:
        await again.close()
    assert states(box) == ["running", "removed"]


# ------------------------------------------------------------------ engine down


async def test_a_removal_the_engine_refused_is_retried_until_it_answers(
        tmp_path: Path) -> None:
    runtime = FlakyRuntime()
    sup, box = make(runtime, tmp_path)
    await sup.startup()
    poller = asyncio.create_task(sup.run_forever())
    try:
        await running(sup, box)
        runtime.down = True
        await sup.remove("job1", 1, "job1-jid")
        await asyncio.sleep(0.2)  # a few polls meet the engine still down
        assert states(box) == ["running"]  # not removed yet: not reported
        assert jobs_files(tmp_path) == ["removing/job1.1.json"]
        await sup.run(spec())  # the same attempt again: removed means never restarted
        assert sup.active == {}

        runtime.down = False
        await until(lambda: "removed" in states(box), "removal never retried")
        await sup.remove("job1", 1, "job1-jid")  # the controller asking again
    finally:
        poller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await poller
        await sup.close()
    assert await runtime.list_ours() == []
    assert states(box) == ["running", "removed"]
    assert jobs_files(tmp_path) == []


async def test_an_ended_attempt_the_engine_could_not_remove_is_removed_later(
        tmp_path: Path) -> None:
    runtime = FlakyRuntime()
    sup, box = make(runtime, tmp_path)
    await sup.startup()
    try:
        await sup.run(p.JobSpec(job="job1", attempt=1, name="job1-jid", jid="job1-jid",
                                kind="plugin", image="img", command=["true"]))
        await until(lambda: "exited" in states(box), "job1 never ended")
        runtime.down = True
        await sup.remove("job1", 1, "job1-jid")
        assert jobs_files(tmp_path) == ["removing/job1.1.json"]
    finally:
        await sup.close()
    runtime.down = False
    again, box = make(runtime, tmp_path)
    await again.startup()
    try:
        await until(lambda: not jobs_files(tmp_path), "the marker was never finished")
    finally:
        await again.close()
    assert await runtime.list_ours() == []
    assert states(box) == ["running", "exited"]  # its final event was already sent


# --------------------------------------------------------- workloads, no record


async def test_workloads_without_a_record_are_named_and_left_to_the_controller(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    runtime = FlakyRuntime()
    await runtime.start(spec("stray1"))
    await runtime.start(spec("stray2"))
    sup, _box = make(runtime, tmp_path)
    with caplog.at_level(logging.INFO, LOGGER):
        await sup.startup()
    try:
        lines = [r.getMessage() for r in caplog.records if "without a job record" in r.getMessage()]
        assert len(lines) == 1 and "stray1-jid,stray2-jid" in lines[0]
        assert len(await runtime.list_ours()) == 2  # left alone
        # The controller's reconcile sends Remove for one of a deleted job:
        await sup.remove("stray1", 1, "stray1-jid")
    finally:
        await sup.close()
    assert [h.name for h in await runtime.list_ours()] == ["stray2-jid"]


# ---------------------------------------------------------------- damaged records


async def test_damaged_records_are_set_aside_bounded_and_named(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    jobs = tmp_path / "state" / "jobs"
    (jobs / "removing").mkdir(parents=True)
    (jobs / "good.json").write_text(Tracked(spec("good")).to_json())
    (jobs / "other.json").write_text(Tracked(spec("good")).to_json())  # another job's
    (jobs / "removing" / "x.1.json").write_text('{"job": "x"}')
    for n in range(DAMAGED_KEPT + 2):
        (jobs / f"bad{n:02d}.json").write_text(f"damaged {n}")
    runtime = FlakyRuntime()
    sup, _box = make(runtime, tmp_path)
    with caplog.at_level(logging.ERROR, LOGGER):
        await sup.startup()
    try:
        assert list(sup.active) == ["good"]
    finally:
        await sup.close()
    assert sorted(f.name for f in jobs.glob("*.json")) == ["good.json"]
    assert not list((jobs / "removing").iterdir())
    kept = sorted((jobs / "damaged").iterdir())
    assert len(kept) == DAMAGED_KEPT
    # Each is named in the log with where it went; the oldest four made room.
    moved = dict(tuple(w.split("=", 1)[1] for w in r.getMessage().split()[4:6])
                 for r in caplog.records if "set aside" in r.getMessage())
    assert len(moved) == DAMAGED_KEPT + 4
    assert moved[str(jobs / "removing" / "x.1.json")].endswith("-removing-x.1.json")
    assert set(kept) <= {Path(to) for to in moved.values()}  # each named where it went
    assert {f.read_text() for f in kept} == {
        *(f"damaged {n}" for n in range(4, DAMAGED_KEPT + 2)), '{"job": "x"}',
        Tracked(spec("good")).to_json()}


# ------------------------------------------------------------------ real Docker


class HangingDocker(DockerRuntime):
    """The real Docker runtime whose removal hangs when asked (where a kill lands)."""

    hang = False
    removing: asyncio.Event

    async def remove(self, handle: Handle, force: bool = True) -> None:
        if self.hang:
            self.removing.set()
            await asyncio.Event().wait()
        await super().remove(handle, force)


def containers(engine: Engine, agent: str) -> list[str]:
    client = engine.client()
    try:
        rows = client.api.containers(all=True, filters={"label": f"{LABEL_AGENT}={agent}"})
        return [str(r["Names"][0]).lstrip("/") for r in rows]
    finally:
        client.close()


def remove_containers(engine: Engine, agent: str) -> None:
    client = engine.client()
    try:
        for row in client.api.containers(all=True, filters={"label": f"{LABEL_AGENT}={agent}"}):
            client.api.remove_container(row["Id"], force=True)
    finally:
        client.close()


@pytest.fixture
async def agent_name(docker_engine: Engine) -> AsyncIterator[str]:
    name = f"orphans-{uuid.uuid4().hex[:8]}"
    yield name
    await asyncio.to_thread(remove_containers, docker_engine, name)


async def test_docker_a_container_left_by_a_killed_removal_is_removed_at_restart(
        docker_engine: Engine, agent_name: str, storebase: Path, tmp_path: Path) -> None:
    settings = DockerSettings(base_url=docker_engine.url, engine=docker_engine.kind,
                              agent_name=agent_name, storebase=str(storebase))
    name = f"pfleet-orph-{uuid.uuid4().hex[:10]}"
    job = p.JobSpec(job=f"job-{name}", attempt=1, name=name, jid=name, kind="plugin",
                    image=BUSYBOX_IMAGE, command=["sleep", "600"])
    runtime = HangingDocker(settings)
    runtime.removing = asyncio.Event()
    sup, box = make(runtime, tmp_path, storebase)
    await sup.startup()
    poller = asyncio.create_task(sup.run_forever())
    try:
        await sup.run(job)
        await until(lambda: "running" in states(box, job.job), "never running")
        runtime.hang = True
        task = asyncio.create_task(sup.remove(job.job, 1, name))
        await asyncio.wait_for(runtime.removing.wait(), WAIT)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    finally:
        poller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await poller
        await sup.close()
        await runtime.close()
        box.close()
    assert await asyncio.to_thread(containers, docker_engine, agent_name) == [name]
    assert jobs_files(tmp_path) == [f"removing/job-{name}.1.json"]

    restarted = DockerRuntime(settings)
    again, box = make(restarted, tmp_path, storebase)
    await again.startup()
    try:
        await until(lambda: "removed" in states(box, job.job), "removal never finished")
    finally:
        await again.close()
        await restarted.close()
    assert await asyncio.to_thread(containers, docker_engine, agent_name) == []
    assert states(box, job.job) == ["running", "removed"]
    assert jobs_files(tmp_path) == []
