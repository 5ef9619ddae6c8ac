from __future__ import annotations

from pathlib import Path

from agent.outbox import Outbox
from agent.protocol import Event


def event(job: str, state: str = "running") -> Event:
    return Event(seq=0, job=job, attempt=1, state=state)


def test_events_survive_a_restart_in_order_until_acked(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    a, b, c = box.enqueue(event("a")), box.enqueue(event("b")), box.enqueue(event("c"))
    assert (a.seq, b.seq, c.seq) == (1, 2, 3)
    box.ack(b.seq)
    reloaded = Outbox(tmp_path)
    assert [e.job for e in reloaded.pending()] == ["a", "c"]
    assert reloaded.enqueue(event("d")).seq == 4  # numbering goes on after the last pending
    assert [e.job for e in reloaded.pending(after=1)] == ["c", "d"]
    assert reloaded.pending_jobs() == {("a", 1), ("c", 1), ("d", 1)}


def test_a_torn_write_is_dropped_not_fatal(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    box.enqueue(event("a"))
    (tmp_path / "0000000000000002.json").write_text('{"seq": 2, "job"')
    (tmp_path / "0000000000000003.tmp").write_text("partial")
    reloaded = Outbox(tmp_path)
    assert [e.job for e in reloaded.pending()] == ["a"]
    assert not list(tmp_path.glob("*.tmp"))


def test_enqueue_never_raises_when_the_disk_refuses(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "box")
    box.directory = tmp_path / "box" / "missing"  # every write now fails (ENOENT)
    sent = box.enqueue(event("a", "exited"))
    assert [e.seq for e in box.pending()] == [sent.seq]
