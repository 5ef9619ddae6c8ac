"""agent.durable: atomic replacement at once, fsync in the background."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent import durable
from agent.durable import DurableWriter


def test_replace_is_visible_at_once_and_leaves_no_temp_file(tmp_path: Path) -> None:
    writer = DurableWriter("t")
    try:
        target = tmp_path / "a.json"
        writer.replace(target, b"one")
        assert target.read_bytes() == b"one"
        writer.replace(target, b"two")
        assert target.read_bytes() == b"two"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
        assert os.stat(target).st_mode & 0o777 == 0o600
    finally:
        writer.close()


def test_files_deleted_before_their_fsync_are_skipped(tmp_path: Path) -> None:
    writer = DurableWriter("t")
    for i in range(50):
        path = tmp_path / f"{i}.json"
        writer.replace(path, b"x")
        if i % 2:
            path.unlink()
    writer.close()  # waits for the fsync thread, which must not choke on the gaps
    assert len(list(tmp_path.iterdir())) == 25


def test_a_failed_write_raises_and_replaces_nothing(tmp_path: Path) -> None:
    writer = DurableWriter("t")
    try:
        with pytest.raises(OSError):
            writer.replace(tmp_path / "missing-dir" / "a.json", b"x")
        assert list(tmp_path.iterdir()) == []
    finally:
        writer.close()


def test_writes_of_one_burst_are_synced_together(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    batches: list[set[str]] = []
    monkeypatch.setattr(durable, "sync_files", lambda paths: batches.append(set(paths)))
    writer = DurableWriter("t", delay=30.0)  # longer than the test: close() ends the wait
    for i in range(20):
        writer.replace(tmp_path / f"{i}.json", b"x")
    writer.replace(tmp_path / "0.json", b"rewritten")
    writer.close()
    assert batches[0] == {os.fspath(tmp_path / f"{i}.json") for i in range(20)}
    assert all(not batch for batch in batches[1:])  # close()'s own flush found nothing left
