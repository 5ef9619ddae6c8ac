"""A mount source reached through a symbolic link is refused before anything starts:
the engine would follow the link out of the storeBase."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from agent import protocol as p
from agent.fstree import first_link
from agent.outbox import Outbox
from agent.runtimes.fake import FakeRuntime
from agent.supervisor import Supervisor

WAIT = 30.0


def spec_with(source: str) -> p.JobSpec:
    return p.JobSpec(job="job1", attempt=1, name="jid1", jid="jid1", kind="plugin",
                     image="img", command=["true"],
                     mounts=[p.Mount("key-jid1/incoming", "/share/incoming", True),
                             p.Mount(source, "/share/outgoing", False)])


async def final_event(box: Outbox) -> p.Event:
    deadline = time.monotonic() + WAIT
    while True:
        ended = [e for e in box.pending() if e.state in ("exited", "failed")]
        if ended:
            return ended[0]
        assert time.monotonic() < deadline, "the job never ended"
        await asyncio.sleep(0.02)


async def run(tmp_path: Path, storebase: Path, source: str) -> tuple[p.Event, FakeRuntime]:
    runtime = FakeRuntime()
    box = Outbox(tmp_path / "outbox")
    sup = Supervisor(runtime, box, tmp_path / "state", storebase, poll_interval=0.05)
    try:
        await sup.startup()
        await sup.run(spec_with(source))
        return await final_event(box), runtime
    finally:
        await sup.close()


@pytest.fixture
def storebase(tmp_path: Path) -> Path:
    root = tmp_path / "storeBase"
    (root / "key-jid1" / "incoming").mkdir(parents=True)
    (root / "home" / "alice" / "feed").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "home" / "alice" / "evil").symlink_to(tmp_path / "outside")
    (root / "home" / "alice" / "inside").symlink_to(root / "home" / "alice" / "feed")
    return root


async def test_a_mount_through_a_symlink_is_refused_and_nothing_starts(
        tmp_path: Path, storebase: Path) -> None:
    event, runtime = await run(tmp_path, storebase, "home/alice/evil/out/data")
    assert event.state == "failed"
    assert event.message == ("refusing to mount 'home/alice/evil/out/data' at /share/outgoing: "
                             "'home/alice/evil' is a symbolic link")
    assert await runtime.list_ours() == []


async def test_even_a_link_that_stays_inside_the_storebase_is_refused(
        tmp_path: Path, storebase: Path) -> None:
    event, runtime = await run(tmp_path, storebase, "home/alice/inside")
    assert event.state == "failed" and "'home/alice/inside' is a symbolic link" in event.message
    assert await runtime.list_ours() == []


async def test_real_and_missing_sources_start_as_before(tmp_path: Path,
                                                        storebase: Path) -> None:
    event, _ = await run(tmp_path, storebase, "home/alice/feed/not-yet/there")
    assert event.state == "exited" and event.exit_code == 0


def test_first_link_names_the_leading_link_only(storebase: Path) -> None:
    assert first_link(storebase, "home/alice/evil/a/b") == "home/alice/evil"
    assert first_link(storebase, "/home//alice/./evil/") == "home/alice/evil"
    assert first_link(storebase, "home/alice/feed") is None
    assert first_link(storebase, "home/nobody/evil") is None  # stops where nothing exists
    assert first_link(storebase, "") is None
