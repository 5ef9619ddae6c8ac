"""Removing an ended attempt's workload (REMOVE_JOBS): by its remembered handle, and
by listing the runtime after an agent restart."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from agent import protocol as p
from agent.outbox import Outbox
from agent.runtimes.base import Handle
from agent.runtimes.fake import FakeRuntime
from agent.supervisor import Supervisor

WAIT = 30.0


class CountingRuntime(FakeRuntime):
    """The fake runtime, counting listings and removals."""

    def __init__(self) -> None:
        super().__init__()
        self.listings = 0
        self.removed: list[str] = []

    async def list_ours(self) -> list[Handle]:
        self.listings += 1
        return await super().list_ours()

    async def remove(self, handle: Handle, force: bool = True) -> None:
        self.removed.append(handle.name)
        await super().remove(handle, force)


def plugin_spec(job: str = "job1") -> p.JobSpec:
    return p.JobSpec(job=job, attempt=1, name=f"{job}-jid", jid=f"{job}-jid", kind="plugin",
                     image="img", command=["true"])


async def finished(box: Outbox, job: str) -> None:
    deadline = time.monotonic() + WAIT
    while not any(e.job == job and e.state == "exited" for e in box.pending()):
        assert time.monotonic() < deadline, f"{job} never finished"
        await asyncio.sleep(0.02)


async def run_one(tmp_path: Path, runtime: Any) -> tuple[Supervisor, Outbox]:
    box = Outbox(tmp_path / "outbox")
    sup = Supervisor(runtime, box, tmp_path / "state", tmp_path, poll_interval=0.05)
    await sup.startup()
    await sup.run(plugin_spec())
    await finished(box, "job1")
    return sup, box


async def test_an_ended_workload_is_removed_by_its_handle_without_listing(
        tmp_path: Path) -> None:
    runtime = CountingRuntime()
    sup, _ = await run_one(tmp_path, runtime)
    listed = runtime.listings  # startup lists once, to name workloads without a record
    try:
        await sup.remove("job1", 1, "job1-jid")
    finally:
        await sup.close()
    assert runtime.removed == ["job1-jid"]
    assert runtime.listings == listed
    assert await FakeRuntime.list_ours(runtime) == []


async def test_an_ended_operation_needs_no_removal(tmp_path: Path) -> None:
    runtime = CountingRuntime()
    box = Outbox(tmp_path / "outbox")
    sb = tmp_path / "sb"
    (sb / "key-j1").mkdir(parents=True)
    sup = Supervisor(runtime, box, tmp_path / "state", sb, poll_interval=0.05)
    await sup.startup()
    listed = runtime.listings
    spec = p.JobSpec(job="job1", attempt=1, name="j1-delete", jid="j1", kind="delete",
                     image="", command=[], op={"op": "delete", "key_dir": "key-j1"})
    try:
        await sup.run(spec)
        await finished(box, "job1")
        await sup.remove("job1", 1, "j1-delete")
    finally:
        await sup.close()
    assert (runtime.removed, runtime.listings) == ([], listed)
    assert not (sb / "key-j1").exists()


async def test_after_a_restart_the_runtime_is_listed_to_find_it(tmp_path: Path) -> None:
    runtime = CountingRuntime()
    sup, box = await run_one(tmp_path, runtime)
    await sup.close()
    again = Supervisor(runtime, box, tmp_path / "state", tmp_path, poll_interval=0.05)
    await again.startup()
    try:
        await again.remove("job1", 1, "job1-jid")
    finally:
        await again.close()
    assert runtime.listings >= 1
    assert runtime.removed == ["job1-jid"]


class StartCountingRuntime(FakeRuntime):
    """The fake runtime, counting the workloads it creates."""

    def __init__(self) -> None:
        super().__init__()
        self.starts: list[str] = []

    async def start(self, spec: p.JobSpec) -> Handle:
        self.starts.append(spec.name)
        return await super().start(spec)


async def test_a_run_repeated_after_its_attempt_ended_or_was_removed_starts_nothing(
        tmp_path: Path) -> None:
    """A run that crossed a removal, or a reconcile's copy of one already done, on the
    way to the agent is a duplicate: the attempt never starts a second time."""
    runtime = StartCountingRuntime()
    box = Outbox(tmp_path / "outbox")
    sup = Supervisor(runtime, box, tmp_path / "state", tmp_path, poll_interval=0.05)
    await sup.startup()
    try:
        await sup.run(plugin_spec("ended"))
        await finished(box, "ended")
        await sup.run(plugin_spec("ended"))  # the same attempt, after its end
        await sup.remove("removed", 1, "removed-jid")  # a removal before its run
        await sup.run(plugin_spec("removed"))
        await asyncio.sleep(0.3)  # a start would be on its way by now
        assert runtime.starts == ["ended-jid"]
        assert [e.state for e in box.pending() if e.job == "ended"] == ["running", "exited"]
        assert not [e for e in box.pending() if e.job == "removed"]
    finally:
        await sup.close()
