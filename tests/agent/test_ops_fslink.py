"""The fslink copy operation (agent.ops + agent.ops_fslink, pfcon-api.md §3.4, §3.6):
a real storeBase laid out like CUBE's storage, copied into ``key-<jid>/incoming``.

An input dir is walked as a directory, as pfcon's fslink copy does: ``a/b`` never
matches ``a/bc`` (the string-prefix match is swift's, §3.5).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import ops_fslink
from agent.ops import OpError, run_op


def layout(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if not p.is_dir()}


def copy_op(*input_dirs: str, output_dir: str = "home/alice/feeds/feed_1/pl-app_2/data",
            key: str = "key-j1") -> dict[str, Any]:
    return {"op": "copy", "storage": "fslink", "key_dir": key, "input_dirs": list(input_dirs),
            "output_dir": output_dir}


@pytest.fixture
def sb(tmp_path: Path) -> Path:
    root = tmp_path / "storeBase"
    root.mkdir()
    return root


@pytest.fixture
def memory_sb(tmp_path: Path) -> Iterator[Path]:
    """A storeBase on tmpfs when there is one: 10,000 file creations then measure the
    copy, not how busy the shared test disk happens to be."""
    base = Path("/dev/shm")
    parent = Path(tempfile.mkdtemp(prefix="pfleet-test-", dir=base)) \
        if base.is_dir() and os.access(base, os.W_OK) else tmp_path
    root = parent / "storeBase"
    root.mkdir()
    try:
        yield root
    finally:
        if parent != tmp_path:
            shutil.rmtree(parent, ignore_errors=True)


DATA = "home/alice/feeds/feed_1/pl-dircopy_1/data"


def test_link_outside_the_input_dir(sb: Path) -> None:
    layout(sb, {f"{DATA}/a.txt": "a", f"{DATA}/sub/b.txt": "b",
                f"{DATA}/home_user_uploads_x.chrislink": "home/user/uploads/x\n",
                "home/user/uploads/x/up.txt": "up", "home/user/uploads/y/no.txt": "no"})
    text = run_op(copy_op(DATA), sb)
    incoming = sb / "key-j1" / "incoming"
    assert tree(incoming) == {"a.txt", "sub/b.txt", "home_user_uploads_x/up.txt"}
    assert (incoming / "home_user_uploads_x" / "up.txt").read_text() == "up"
    assert sorted(os.listdir(incoming)) == ["a.txt", "home_user_uploads_x", "sub"]
    assert (sb / "key-j1" / "outgoing").is_dir()
    assert text.splitlines()[0] == "copied 3 files (0.0 MiB) from 1 input dirs"
    assert "followed 1 ChRIS links" in text
    # the storage itself is untouched
    assert (sb / DATA / "home_user_uploads_x.chrislink").is_file()


def test_nested_links_home_bob_pipelines(sb: Path) -> None:
    layout(sb, {f"{DATA}/home_bob.chrislink": "home/bob",
                "home/bob/PIPELINES_bob.chrislink": "PIPELINES/bob",
                "PIPELINES/bob/pipeline.yml": "name: p"})
    run_op(copy_op(DATA), sb)
    incoming = sb / "key-j1" / "incoming"
    assert tree(incoming) == {"home_bob/PIPELINES_bob/pipeline.yml"}
    assert (incoming / "home_bob/PIPELINES_bob/pipeline.yml").read_text() == "name: p"
    assert sorted(os.listdir(incoming)) == ["home_bob"]


def test_link_inside_the_input_dir_gives_only_the_relative_copy(sb: Path) -> None:
    # the observed home/user/cube case: only incoming/test/test_file.txt
    layout(sb, {"home/user/cube/test/test_file.txt": "hello",
                "home/user/cube/test.chrislink": "home/user/cube/test"})
    run_op(copy_op("home/user/cube", output_dir="home/user/out"), sb)
    incoming = sb / "key-j1" / "incoming"
    assert tree(incoming) == {"test/test_file.txt"}
    assert sorted(os.listdir(incoming)) == ["test"]


def test_link_loop_terminates(sb: Path) -> None:
    layout(sb, {f"{DATA}/a.chrislink": "p/a", "p/a/fa.txt": "a", "p/a/b.chrislink": "p/b",
                "p/b/fb.txt": "b", "p/b/a.chrislink": "p/a",
                f"{DATA}/self.chrislink": DATA})
    run_op(copy_op(DATA), sb)
    assert tree(sb / "key-j1" / "incoming") == {"p_a/fa.txt", "p_a/p_b/fb.txt"}


@pytest.mark.parametrize("target", ["home/alice/feeds/feed_1/pl-app_2/data",
                                    "home/alice/feeds/feed_1/pl-app_2/data/",
                                    "home/alice/feeds", "home/alice", "home"])
def test_link_to_the_output_dir_or_an_ancestor_fails(sb: Path, target: str) -> None:
    layout(sb, {f"{DATA}/ok.txt": "ok", "other/evil.chrislink": target,
                f"{DATA}/other.chrislink": "other"})
    with pytest.raises(OpError) as exc:
        run_op(copy_op(DATA), sb)
    shown = target.strip("/")
    assert str(exc.value) == (
        f"ChRIS link 'other/evil.chrislink' points to {shown!r}, which is the job's output "
        "dir or one of its ancestors ('home/alice/feeds/feed_1/pl-app_2/data')")


def test_link_to_a_sibling_of_the_output_dir_is_fine(sb: Path) -> None:
    layout(sb, {f"{DATA}/l.chrislink": "home/alice/feeds/feed_1/pl-app_2/other",
                "home/alice/feeds/feed_1/pl-app_2/other/x.txt": "x",
                "home/alice/feeds/feed_1/pl-app_2/data_old/y.txt": "y"})
    run_op(copy_op(DATA), sb)
    assert tree(sb / "key-j1" / "incoming") == {
        "home_alice_feeds_feed_1_pl-app_2_other/x.txt"}


@pytest.mark.parametrize("target", ["../outside", "home/../../outside", "/etc", "..",
                                    "C:\\Windows", "."])
def test_link_escaping_the_storage_fails(sb: Path, target: str) -> None:
    (sb.parent / "outside").mkdir()
    (sb.parent / "outside" / "secret.txt").write_text("secret")
    layout(sb, {f"{DATA}/evil.chrislink": target})
    with pytest.raises(OpError, match=r"ChRIS link '.*evil.chrislink' has a target outside "
                                      r"the storage root"):
        run_op(copy_op(DATA), sb)
    assert not list((sb / "key-j1" / "incoming").rglob("secret.txt"))


def test_symlink_pointing_outside_the_storage_fails(sb: Path) -> None:
    outside = sb.parent / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    layout(sb, {f"{DATA}/a.txt": "a"})
    (sb / DATA / "escape").symlink_to(outside)
    with pytest.raises(OpError) as exc:
        run_op(copy_op(DATA), sb)
    assert str(exc.value) == (f"symbolic link '{DATA}/escape' points outside the storage root")
    assert not list((sb / "key-j1").rglob("secret.txt"))


def test_link_target_through_an_escaping_symlink_fails(sb: Path) -> None:
    outside = sb.parent / "outside"
    (outside / "x").mkdir(parents=True)
    (outside / "x" / "secret.txt").write_text("secret")
    layout(sb, {f"{DATA}/l.chrislink": "home/evil/x"})
    (sb / "home" / "evil").symlink_to(outside)
    with pytest.raises(OpError, match="symbolic link 'home/evil' points outside"):
        run_op(copy_op(DATA), sb)


def test_symlinks_inside_the_storage_are_skipped_not_followed(sb: Path) -> None:
    layout(sb, {f"{DATA}/a.txt": "a", "home/bob/private.txt": "p"})
    (sb / DATA / "to_bob").symlink_to(sb / "home" / "bob")
    (sb / DATA / "a_again.txt").symlink_to("a.txt")
    text = run_op(copy_op(DATA), sb)
    incoming = sb / "key-j1" / "incoming"
    assert sorted(os.listdir(incoming)) == ["a.txt"]
    assert "skipped 2 symbolic links and special files" in text


def test_input_dirs_are_directories_not_string_prefixes(sb: Path) -> None:
    layout(sb, {"home/a/b/in.txt": "in", "home/a/bc/out.txt": "out", "home/a/b.txt": "f"})
    run_op(copy_op("/home/a/b/"), sb)
    assert tree(sb / "key-j1" / "incoming") == {"in.txt"}


def test_missing_input_dir_contributes_nothing(sb: Path) -> None:
    layout(sb, {"home/a/b/in.txt": "in"})
    text = run_op(copy_op("home/nobody/data", "home/a/b"), sb)
    assert tree(sb / "key-j1" / "incoming") == {"in.txt"}
    assert text.startswith("copied 1 files (0.0 MiB) from 2 input dirs")
    text = run_op(copy_op(), sb)
    assert text.startswith("copied 0 files (0.0 MiB) from 0 input dirs")
    assert os.listdir(sb / "key-j1" / "incoming") == []
    assert (sb / "key-j1" / "outgoing").is_dir()


def test_several_input_dirs_are_merged(sb: Path) -> None:
    layout(sb, {"home/a/d1/x.txt": "x", "home/a/d2/sub/y.txt": "y"})
    run_op(copy_op("home/a/d1", "home/a/d2"), sb)
    assert tree(sb / "key-j1" / "incoming") == {"x.txt", "sub/y.txt"}


def test_the_same_path_in_two_input_dirs_is_copied_whole_once(sb: Path) -> None:
    layout(sb, {"home/a/d1/same.txt": "first " * 1000, "home/a/d2/same.txt": "second",
                "home/a/d2/other.txt": "o"})
    text = run_op(copy_op("home/a/d1", "home/a/d2"), sb)
    incoming = sb / "key-j1" / "incoming"
    assert text.splitlines()[0] == "copied 3 files (0.0 MiB) from 2 input dirs"
    assert tree(incoming) == {"same.txt", "other.txt"}
    assert (incoming / "same.txt").read_text() == "second"  # the later input dir wins


def evict(*paths: Path) -> None:
    """Write the files back and drop their data from the page cache."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cached(path: Path) -> bool:
    """Whether any of the file is in the page cache (``fincore``: a read, even one
    that must not wait, would start reading it in)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES",
                          str(path)], capture_output=True, text=True, check=True,
                         timeout=30).stdout  # fmt: skip
    return int(out.strip()) > 0


def test_files_not_in_the_page_cache_are_copied_too(sb: Path) -> None:
    # cached ones are copied at once, the others once the kernel read them ahead
    files = {f"{DATA}/d{d}/f{f}.txt": f"{d}-{f}-" * (f * 50 + 1) for d in range(3)
             for f in range(40)}
    layout(sb, {**files, f"{DATA}/empty.txt": ""})
    evict(*(sb / rel for rel in list(files)[::2]))
    assert not cached(sb / DATA / "d0" / "f0.txt")  # the test's premise
    assert cached(sb / DATA / "d0" / "f1.txt")
    text = run_op(copy_op(DATA), sb)
    incoming = sb / "key-j1" / "incoming"
    size = sum(len(v) for v in files.values())
    assert text.splitlines()[0] == (f"copied 121 files ({size / (1 << 20):.1f} MiB) "
                                    "from 1 input dirs")
    assert tree(incoming) == {r[len(DATA) + 1:] for r in files} | {"empty.txt"}
    for rel, content in files.items():
        assert (incoming / rel[len(DATA) + 1:]).read_text() == content
    assert (incoming / "empty.txt").read_bytes() == b""


def test_many_uncached_files_and_a_large_one_in_one_directory(sb: Path) -> None:
    # more uncached small files than the walker reads ahead at once, and a large one
    # (the thread pool's), all in one directory
    count = ops_fslink.DEFER_FILES * 2 + 5
    files = {f"{DATA}/f{i:03d}.txt": f"{i}:" + "x" * (i * 37) for i in range(count)}
    big = os.urandom(ops_fslink.INLINE_MAX + 4097)
    layout(sb, files)
    (sb / DATA / "big.bin").write_bytes(big)
    evict(*(sb / rel for rel in files), sb / DATA / "big.bin")
    assert not cached(sb / DATA / "f100.txt")  # the test's premise
    open_before = len(os.listdir("/proc/self/fd"))
    run_op(copy_op(DATA), sb)
    assert len(os.listdir("/proc/self/fd")) == open_before
    incoming = sb / "key-j1" / "incoming"
    assert tree(incoming) == {r[len(DATA) + 1:] for r in files} | {"big.bin"}
    for rel, content in files.items():
        assert (incoming / rel[len(DATA) + 1:]).read_text() == content
    assert (incoming / "big.bin").read_bytes() == big


def test_a_copy_that_fails_among_read_ahead_files_leaves_no_descriptor_open(
        sb: Path, tmp_path: Path) -> None:
    files = {f"{DATA}/f{i:02d}.txt": "y" * 3000 for i in range(40)}
    layout(sb, files)
    evict(*(sb / rel for rel in files))
    incoming = tmp_path / "small"
    incoming.mkdir()
    # a filesystem that fills up part way through the read-ahead batch
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(incoming)],
                   check=True, timeout=30)
    try:
        open_before = len(os.listdir("/proc/self/fd"))
        with pytest.raises(ops_fslink.CopyError, match="No space left on device"):
            ops_fslink.fetch_inputs(sb, [tuple(DATA.split("/"))], ("home", "out"), incoming)
        assert len(os.listdir("/proc/self/fd")) == open_before
    finally:
        subprocess.run(["umount", str(incoming)], check=True, timeout=30)


@pytest.mark.parametrize("evicted", ["d1", "d2"])
def test_the_later_input_dir_wins_whichever_is_cached(sb: Path, evicted: str) -> None:
    layout(sb, {"home/a/d1/same.txt": "first " * 1000, "home/a/d2/same.txt": "second"})
    evict(sb / "home/a" / evicted / "same.txt")
    assert not cached(sb / "home/a" / evicted / "same.txt")
    run_op(copy_op("home/a/d1", "home/a/d2"), sb)
    incoming = sb / "key-j1" / "incoming"
    assert (incoming / "same.txt").read_text() == "second"
    assert tree(incoming) == {"same.txt"}


def test_the_jobs_own_key_dir_is_never_read(sb: Path) -> None:
    layout(sb, {"key-j1/incoming/stale.txt": "old", "data/x.txt": "x",
                "data/key.chrislink": "key-j1"})
    run_op(copy_op("data"), sb)
    assert tree(sb / "key-j1" / "incoming") == {"x.txt"}


def test_a_link_to_a_single_file_brings_that_file(sb: Path) -> None:
    layout(sb, {f"{DATA}/f.chrislink": "home/bob/f.txt", "home/bob/f.txt": "f",
                "home/bob/g.txt": "not this"})
    run_op(copy_op(DATA), sb)
    assert tree(sb / "key-j1" / "incoming") == {"home_bob/f.txt"}


def test_modes_are_0644_and_0755_and_no_temporary_files_remain(sb: Path) -> None:
    layout(sb, {f"{DATA}/d/secret.txt": "s"})
    (sb / DATA / "d" / "secret.txt").chmod(0o600)
    (sb / DATA / "d").chmod(0o700)
    old = os.umask(0o077)
    try:
        run_op(copy_op(DATA), sb)
    finally:
        os.umask(old)
    incoming = sb / "key-j1" / "incoming"
    assert stat.S_IMODE((incoming / "d" / "secret.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((incoming / "d").stat().st_mode) == 0o755
    assert stat.S_IMODE(incoming.stat().st_mode) == 0o755
    assert not [p for p in incoming.rglob("*") if p.name.endswith(".part")]


def test_ten_thousand_small_files(memory_sb: Path) -> None:
    sb = memory_sb
    data = sb / DATA
    for d in range(100):
        sub = data / f"d{d:03d}"
        sub.mkdir(parents=True)
        for f in range(100):
            (sub / f"f{f:03d}.txt").write_text(f"{d}-{f}\n")
    (data / "big.bin").write_bytes(os.urandom(3 << 20))
    text = run_op(copy_op(DATA), sb)
    incoming = sb / "key-j1" / "incoming"
    assert text.splitlines()[0] == "copied 10001 files (3.1 MiB) from 1 input dirs"
    names = tree(incoming)
    assert len(names) == 10001
    assert (incoming / "d042" / "f017.txt").read_text() == "42-17\n"
    assert (incoming / "d099" / "f099.txt").read_text() == "99-99\n"
    assert (incoming / "big.bin").read_bytes() == (data / "big.bin").read_bytes()


def test_a_rerun_gives_the_same_result(sb: Path) -> None:
    layout(sb, {f"{DATA}/a.txt": "a", f"{DATA}/l.chrislink": "home/bob",
                "home/bob/b.txt": "b"})
    first = run_op(copy_op(DATA), sb)
    incoming = sb / "key-j1" / "incoming"
    before = {p: (incoming / p).read_text() for p in tree(incoming)}
    (incoming / "half-copied.txt").write_text("from a killed run")
    (incoming / "a.txt").write_text("changed")
    (sb / "key-j1" / "outgoing" / "out.txt").write_text("kept")
    second = run_op(copy_op(DATA), sb)
    assert second == first
    assert {p: (incoming / p).read_text() for p in tree(incoming)} == before
    assert (sb / "key-j1" / "outgoing" / "out.txt").read_text() == "kept"


@pytest.mark.parametrize(("op", "message"), [
    ({"op": "copy", "storage": "fslink", "key_dir": "../x", "input_dirs": [],
      "output_dir": "o"}, "key_dir: '../x' is not a job key directory"),
    ({"op": "copy", "storage": "fslink", "key_dir": "key-j1", "input_dirs": ["a/../../b"],
      "output_dir": "o"}, "input_dirs: path 'a/../../b' must not contain '..'"),
    ({"op": "copy", "storage": "fslink", "key_dir": "key-j1", "input_dirs": "a",
      "output_dir": "o"}, "input_dirs: expected a list of paths"),
    ({"op": "copy", "storage": "fslink", "key_dir": "key-j1", "input_dirs": ["/"],
      "output_dir": "o"}, "input_dirs: an input dir names the storage root"),
    ({"op": "copy", "storage": "fslink", "key_dir": "key-j1", "input_dirs": [7],
      "output_dir": "o"}, "input_dirs: expected a string"),
    ({"op": "copy", "storage": "fslink", "key_dir": "key-j1", "input_dirs": []},
     "output_dir: expected a string"),
    ({"op": "copy", "storage": "fslink", "key_dir": "key-j1", "input_dirs": [],
      "output_dir": "/"}, "output_dir: must name a directory"),
    ({"op": "copy", "storage": "filesystem", "key_dir": "key-j1", "input_dirs": [],
      "output_dir": "o"}, "storage: copy does not support storage 'filesystem'"),
])
def test_bad_copy_ops_touch_nothing(sb: Path, op: dict[str, Any], message: str) -> None:
    with pytest.raises(OpError) as exc:
        run_op(op, sb)
    assert str(exc.value).startswith(message)
    assert os.listdir(sb) == []
