"""Adversarial review of the agent's durable state: full disks, damaged state files
and restarts that find the world changed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import protocol as p
from agent.durable import DurableWriter
from agent.outbox import Outbox
from agent.runtimes.fake import FakeRuntime
from agent.supervisor import Supervisor, Tracked

WAIT = 20.0
PAGE = 4096


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 16 KiB tmpfs: a real filesystem that runs out of space."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k,mode=0700", "tmpfs", str(mnt)],
                   check=True, timeout=20)
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], timeout=20).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], timeout=20)


def fill(directory: Path, leave: int = 0) -> None:
    """Take all the space of ``directory``'s filesystem but ``leave`` bytes."""
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        with contextlib.suppress(OSError):  # the last bytes may be refused: full is full
            os.write(fd, b"f" * (free - leave))
    finally:
        os.close(fd)


def spec(job: str = "job1", env: list[str] | None = None) -> p.JobSpec:
    return p.JobSpec(job=job, attempt=1, name=f"{job}-jid", jid=f"{job}-jid", kind="plugin",
                     image="img", command=["true"], env=env or [])


async def until(condition: object, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


def supervisor(runtime: FakeRuntime, tmp_path: Path, state: Path | None = None
               ) -> tuple[Supervisor, Outbox]:
    """A supervisor (and its outbox) as the agent makes them, state under ``state``."""
    box = Outbox(tmp_path / "outbox")
    return Supervisor(runtime, box, state or tmp_path / "state", tmp_path,
                      poll_interval=0.05), box


def states(box: Outbox, job: str = "job1") -> list[str]:
    return [e.state for e in box.pending() if e.job == job]


# ------------------------------------------------------------------ full disk


def test_a_short_write_on_a_full_disk_keeps_the_older_file(tiny_fs: Path) -> None:
    writer = DurableWriter("t")
    try:
        target = tiny_fs / "job.json"
        writer.replace(target, b"old record")
        fill(tiny_fs, leave=PAGE)  # the kernel writes one page, then reports no space
        with pytest.raises(OSError):
            writer.replace(target, b"n" * (3 * PAGE))
        assert target.read_bytes() == b"old record"
        assert not list(tiny_fs.glob("*.tmp"))  # no half file left taking the space
    finally:
        writer.close()


async def test_a_full_state_disk_refuses_a_new_job_clearly(tmp_path: Path,
                                                           tiny_fs: Path) -> None:
    runtime = FakeRuntime()
    sup, box = supervisor(runtime, tmp_path, tiny_fs)
    await sup.startup()
    fill(tiny_fs)
    try:
        await sup.run(spec())  # a command handler that raised would drop the link
        [event] = box.pending()
        assert event.state == "failed"
        assert "No space left on device" in event.message
        assert sup.active == {}
        assert await runtime.list_ours() == []  # nothing started without a record
    finally:
        await sup.close()


async def test_a_full_state_disk_at_a_restart_does_not_stop_the_poller(
        tmp_path: Path, tiny_fs: Path) -> None:
    """Killed after creating the container, before recording it: the new agent can
    record nothing more, yet still reports the job to its end."""
    runtime = FakeRuntime()
    job = spec(env=["PFLEET_FAKE_RUN_FOR=0.3", "PFLEET_FAKE_EXIT_CODE=4"])
    (tiny_fs / "jobs").mkdir()
    (tiny_fs / "jobs" / "job1.json").write_text(Tracked(job).to_json())
    await runtime.start(job)
    fill(tiny_fs)
    sup, box = supervisor(runtime, tmp_path, tiny_fs)
    await sup.startup()
    poller = asyncio.create_task(sup.run_forever())
    try:
        await until(lambda: "exited" in states(box) or poller.done(), "never exited")
        assert not poller.done(), poller.exception()
        assert states(box) == ["running", "exited"]
        assert [e.exit_code for e in box.pending() if e.state == "exited"] == [4]
        assert len(await runtime.list_ours()) == 1  # adopted, not started again
        assert not (tiny_fs / "jobs" / "job1.json").exists()
    finally:
        poller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await poller
        await sup.close()


# ------------------------------------------------------------ damaged state


@pytest.mark.parametrize("text", ["[]", "null", "7", '{"spec": "x"}', '{"spec": []}',
                                  '{"spec": {"job": "bad"}}', '\x00\x00\x00'])
async def test_a_job_record_of_the_wrong_shape_is_reported_and_the_rest_kept(
        tmp_path: Path, text: str, caplog: pytest.LogCaptureFixture) -> None:
    runtime = FakeRuntime()
    jobs = tmp_path / "state" / "jobs"
    jobs.mkdir(parents=True)
    (jobs / "good.json").write_text(Tracked(spec("good")).to_json())
    (jobs / "bad.json").write_text(text)
    sup, _box = supervisor(runtime, tmp_path)
    with caplog.at_level(logging.ERROR, "pfleet.agent.supervisor"):
        await sup.startup()
    try:
        assert list(sup.active) == ["good"]
        assert any("bad.json" in r.getMessage() for r in caplog.records)
    finally:
        await sup.close()


@pytest.mark.parametrize("data", [[1, 2], None, "x",
                                  {"seq": 2, "job": "j", "attempt": "x", "state": "running"},
                                  {"seq": 2, "job": 5, "attempt": "1", "state": None},
                                  {"seq": 2, "job": "j", "attempt": 1}])
def test_an_outbox_entry_of_the_wrong_shape_is_dropped_not_fatal(
        tmp_path: Path, data: object) -> None:
    box = Outbox(tmp_path)
    box.enqueue(p.Event(seq=0, job="a", attempt=1, state="running"))
    (tmp_path / "0000000000000002.json").write_text(json.dumps(data))
    reloaded = Outbox(tmp_path)
    assert [e.job for e in reloaded.pending()] == ["a"]
    assert reloaded.enqueue(p.Event(seq=0, job="b", attempt=1, state="running")).seq == 2
    p.encode(reloaded.pending()[0])  # what is kept can be sent


def test_an_outbox_entry_from_a_newer_agent_is_kept(tmp_path: Path) -> None:
    """A downgrade must not lose the final events still waiting for their ack."""
    entry = {"seq": 1, "job": "a", "attempt": 1, "state": "exited", "exit_code": 0,
             "some_future_field": True}
    (tmp_path / "0000000000000001.json").write_text(json.dumps(entry))
    box = Outbox(tmp_path)
    assert [(e.job, e.state) for e in box.pending()] == [("a", "exited")]
    box.ack(1)
    assert not list(tmp_path.glob("*.json"))


def test_an_entry_whose_name_and_seq_disagree_can_still_be_acked(tmp_path: Path) -> None:
    entry = {"seq": 9, "job": "a", "attempt": 1, "state": "running"}
    (tmp_path / "0000000000000003.json").write_text(json.dumps(entry))
    box = Outbox(tmp_path)
    [event] = box.pending()
    box.ack(event.seq)
    assert not list(tmp_path.glob("*.json"))  # else resent after every restart


def test_unknown_and_out_of_order_acks_are_harmless(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    seqs = [box.enqueue(p.Event(seq=0, job=j, attempt=1, state="running")).seq
            for j in "abc"]
    box.ack(99)
    box.ack(seqs[2])
    box.ack(seqs[0])
    box.ack(seqs[0])
    assert [e.job for e in box.pending()] == ["b"]
    assert [e.job for e in Outbox(tmp_path).pending()] == ["b"]


# ------------------------------------------------------------------ restarts


async def test_a_running_job_whose_container_vanished_while_down_is_lost_not_rerun(
        tmp_path: Path) -> None:
    before = FakeRuntime()
    sup, box = supervisor(before, tmp_path)
    await sup.startup()
    await sup.run(spec(env=["PFLEET_FAKE_RUN_FOR=60"]))
    await until(lambda: "running" in states(box), "never running")
    await sup.close()  # the agent is killed; meanwhile the container is removed
    after = FakeRuntime()
    sup = Supervisor(after, box, tmp_path / "state", tmp_path, poll_interval=0.05)
    await sup.startup()
    try:
        await asyncio.sleep(0.5)  # room for a start the restart must not make
        await sup.check()
        await until(lambda: "lost" in states(box), "never reported lost")
        assert await after.list_ours() == []  # the job did not run a second time
        assert states(box) == ["running", "lost"]
    finally:
        await sup.close()


async def test_a_job_that_ended_while_the_agent_was_down_is_reported_once(
        tmp_path: Path) -> None:
    runtime = FakeRuntime()
    sup, box = supervisor(runtime, tmp_path)
    await sup.startup()
    await sup.run(spec(env=["PFLEET_FAKE_RUN_FOR=0.2", "PFLEET_FAKE_EXIT_CODE=3"]))
    await until(lambda: "running" in states(box), "never running")
    await sup.close()
    await asyncio.sleep(0.3)
    sup, box = supervisor(runtime, tmp_path)
    await sup.startup()
    try:
        await sup.check()
        await until(lambda: "exited" in states(box), "never exited")
        assert states(box) == ["running", "exited"]
        assert [e.exit_code for e in box.pending() if e.state == "exited"] == [3]
    finally:
        await sup.close()
