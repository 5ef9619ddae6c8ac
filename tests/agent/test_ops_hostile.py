"""Hostile trees against the storage operations (agent.ops, agent.ops_fslink,
agent.chrislinks, agent.fstree): what users and plugins can write into the storage
must give a result or a clear message, never a crash, a hang or a quadratic walk.

Trees deeper than Python's recursion limit are built with ``mkdir``/``open`` relative
to a directory descriptor, as a plugin can (no path ever gets long).
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.fstree import remove_tree
from agent.op_worker import run as run_worker
from agent.ops import run_op
from agent.ops_fslink import CopyError, _Fetch
from tests.support.trees import DEEPER_THAN_RECURSION, deep_tree, remove_deep_trees

OUT = "home/alice/feeds/feed_1/pl-app_2/data"


def copy_op(*input_dirs: str, key: str = "key-j1") -> dict[str, Any]:
    return {"op": "copy", "storage": "fslink", "key_dir": key, "input_dirs": list(input_dirs),
            "output_dir": OUT}


def worker(op: dict[str, Any], sb: Path) -> dict[str, Any]:
    """The op as the worker process reports it (exit code, message)."""
    return run_worker({"storebase": str(sb), "op": op})


@pytest.fixture(autouse=True)
def _remove_deep_trees(tmp_path: Path) -> Iterator[None]:
    yield
    remove_deep_trees(tmp_path)


@pytest.fixture
def sb(tmp_path: Path) -> Path:
    root = tmp_path / "storeBase"
    root.mkdir()
    return root


def test_delete_of_a_key_dir_holding_a_very_deep_tree(sb: Path) -> None:
    # shutil.rmtree recursed per level: RecursionError, the key dir could never go
    outgoing = sb / "key-j1" / "outgoing"
    outgoing.mkdir(parents=True)
    deep_tree(outgoing, DEEPER_THAN_RECURSION)
    result = worker({"op": "delete", "key_dir": "key-j1"}, sb)
    assert (result["exit_code"], result["log"]) == (0, "deleted key-j1\n")
    assert os.listdir(sb) == []


def test_a_copy_rerun_replaces_a_very_deep_incoming(sb: Path) -> None:
    data = sb / "home/alice/data"
    data.mkdir(parents=True)
    rel = deep_tree(data, DEEPER_THAN_RECURSION)
    for _ in range(2):  # the rerun (after an agent restart) clears incoming first
        result = worker(copy_op("home/alice/data"), sb)
        assert result["exit_code"] == 0, result["message"]
    assert (sb / "key-j1" / "incoming" / rel).read_text() == "bottom"


def test_a_link_to_a_very_deep_tree_is_expanded(sb: Path) -> None:
    # the expansion removes the linked tree's top folder from incoming afterwards
    target = sb / "home/bob/deep"
    target.mkdir(parents=True)
    rel = deep_tree(target, DEEPER_THAN_RECURSION)
    (sb / "home/alice/in").mkdir(parents=True)
    (sb / "home/alice/in/home_bob_deep.chrislink").write_text("home/bob/deep")
    result = worker(copy_op("home/alice/in"), sb)
    assert result["exit_code"] == 0, result["message"]
    incoming = sb / "key-j1" / "incoming"
    assert os.listdir(incoming) == ["home_bob_deep"]
    assert (incoming / "home_bob_deep" / rel).read_text() == "bottom"


def test_nested_link_targets_walk_each_directory_once(sb: Path) -> None:
    # links to ever shorter prefixes of one path (deepest first) re-walked the whole
    # tree for each: n links and n files cost n*n copies
    levels = 40
    parts = [f"d{i}" for i in range(levels)]
    for i in range(1, levels + 1):
        d = sb / "home/bob" / "/".join(parts[:i])
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}.txt").write_text(str(i))
    inp = sb / "home/alice/in"
    inp.mkdir(parents=True)
    for i in range(levels, 0, -1):
        target = "home/bob/" + "/".join(parts[:i])
        (inp / f"l{levels - i:03d}.chrislink").write_text(target)
    text = run_op(copy_op("home/alice/in"), sb)
    assert text.splitlines()[0] == f"copied {levels} files (0.0 MiB) from 1 input dirs"
    assert f"followed {levels} ChRIS links" in text


def test_a_link_file_swapped_for_a_fifo_is_refused(sb: Path, tmp_path: Path) -> None:
    # between the listing and the open: with a writer on the fifo a non-blocking read
    # gave None (TypeError), a device would be read instead of a storage path
    (sb / "home").mkdir()
    fifo = sb / "home" / "x.chrislink"
    os.mkfifo(fifo)
    writer = os.open(fifo, os.O_RDWR)  # a writer holds the fifo open
    try:
        fetch = _Fetch(sb, tuple(OUT.split("/")), tmp_path, ())
        with pytest.raises(CopyError, match=r"'home/x\.chrislink' is not a regular file"):
            fetch._read_link(("home", "x.chrislink"))
    finally:
        os.close(writer)


def test_remove_tree_deeper_than_path_max_with_special_files(tmp_path: Path) -> None:
    top = tmp_path / "t"
    top.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("k")
    deep_tree(top, 2500)  # paths of over 5,000 bytes: only reachable relative to a dir
    os.mkfifo(top / "fifo")
    os.mknod(top / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(os.fspath(top / "sock"))
    os.symlink(outside, top / "dir-link")
    os.symlink(outside / "keep.txt", top / "file-link")
    (top / "sub").mkdir()
    os.symlink(outside, top / "sub" / "escape")
    remove_tree(top)
    assert not os.path.lexists(top)
    assert os.listdir(outside) == ["keep.txt"]


def test_remove_tree_refuses_a_symlink_and_reports_errors(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (real / "f").write_text("x")
    os.symlink(real, tmp_path / "link")
    with pytest.raises(OSError):
        remove_tree(tmp_path / "link")
    assert (real / "f").exists()
    errors: list[str] = []
    remove_tree(tmp_path / "missing", lambda path, exc: errors.append(path))
    assert errors == [os.fspath(tmp_path / "missing")]
