"""Listing and zipping a job's outputs (controller.storage.outputs)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tracemalloc
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.storage import outputs
from controller.storage.outputs import iter_output_files, list_outputs, zip_chunks

MiB = 1 << 20


@pytest.fixture
def out(tmp_path: Path) -> Path:
    """An output tree with everything a hostile plugin could leave behind."""
    root = tmp_path / "outgoing"
    outside = tmp_path / "outside"
    (outside / "d").mkdir(parents=True)
    (outside / "secret.txt").write_text("secret")
    (outside / "d" / "inner.txt").write_text("inner")
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "res.txt").write_text("result")
    (root / "sub" / "a.dat").write_bytes(b"\x00\x01" * 1000)
    (root / "sub" / "deeper" / "b.txt").write_text("b")
    (root / "evil.chrislink").write_text("home/alice")
    (root / "sub" / "deeper" / "nested.chrislink").write_text("home/alice/x")
    (root / "file-link").symlink_to(outside / "secret.txt")
    (root / "dir-link").symlink_to(outside / "d")
    (root / "dangling").symlink_to(tmp_path / "nowhere")
    (root / "sym.chrislink").symlink_to(outside / "secret.txt")
    os.mkfifo(root / "fifo")
    return root


def walk_reference(root: Path) -> list[str]:
    """What os.walk (pfcon's listing) gives for regular non-link files."""
    found = []
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = Path(dirpath, name)
            if path.is_symlink() or not path.is_file() or name.endswith(".chrislink"):
                continue
            found.append(path.relative_to(root).as_posix())
    return found


def test_iter_yields_regular_files_in_os_walk_order(out: Path) -> None:
    got = list(iter_output_files(out))
    assert [rel for rel, _ in got] == walk_reference(out)
    assert {rel for rel, _ in got} == {"res.txt", "sub/a.dat", "sub/deeper/b.txt"}
    assert all(path == out / rel for rel, path in got)
    assert (out / "evil.chrislink").exists()  # skipped, not deleted


def test_iter_can_include_chrislinks(out: Path) -> None:
    rels = {rel for rel, _ in iter_output_files(out, skip_chrislinks=False)}
    assert rels == {
        "res.txt",
        "sub/a.dat",
        "sub/deeper/b.txt",
        "evil.chrislink",
        "sub/deeper/nested.chrislink",
    }


def test_list_outputs_deleting_chrislinks(out: Path, tmp_path: Path) -> None:
    rels = list_outputs(out, delete_chrislinks=True)
    assert sorted(rels) == ["res.txt", "sub/a.dat", "sub/deeper/b.txt"]
    for gone in ["evil.chrislink", "sub/deeper/nested.chrislink", "sym.chrislink"]:
        assert not os.path.lexists(out / gone)
    assert (tmp_path / "outside" / "secret.txt").read_text() == "secret"  # not the target
    assert (out / "file-link").is_symlink()  # other symlinks are left alone


def test_list_outputs_filesystem_mode_keeps_links(out: Path) -> None:
    rels = list_outputs(out, delete_chrislinks=False, skip_chrislinks=False)
    assert "evil.chrislink" in rels
    assert (out / "evil.chrislink").exists()


def test_missing_root_lists_nothing(tmp_path: Path) -> None:
    assert list_outputs(tmp_path / "nope", delete_chrislinks=False) == []


def stream_to(path: Path, root: Path, **kw: int) -> list[int]:
    sizes = []
    with open(path, "wb") as fh:
        for chunk in zip_chunks(root, **kw):
            assert chunk
            sizes.append(len(chunk))
            fh.write(chunk)
    return sizes


def check_with_cli(path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "zipfile", "-t", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Done testing" in proc.stdout


def test_zip_has_exactly_the_output_files(out: Path, tmp_path: Path) -> None:
    os.utime(out / "res.txt", (0, 0))  # containers often leave mtime 0 (before 1980)
    zip_path = tmp_path / "out.zip"
    stream_to(zip_path, out)
    with zipfile.ZipFile(zip_path) as zf:
        assert zf.testzip() is None
        assert zf.namelist() == walk_reference(out)
        assert zf.read("res.txt") == b"result"
        assert zf.read("sub/a.dat") == b"\x00\x01" * 1000
        assert zf.read("sub/deeper/b.txt") == b"b"
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_DEFLATED}
        assert zf.getinfo("res.txt").date_time == (1980, 1, 1, 0, 0, 0)
    check_with_cli(zip_path)
    assert (out / "evil.chrislink").exists()  # zipping never deletes


def test_a_name_that_is_not_utf8_does_not_cut_the_zip(tmp_path: Path) -> None:
    root = tmp_path / "outgoing"
    root.mkdir()
    with open(os.fsencode(root) + b"/caf\xe9.txt", "wb") as fh:  # latin-1, as a plugin may
        fh.write(b"one")
    (root / "z.txt").write_bytes(b"two")
    data = b"".join(zip_chunks(root))
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert zf.testzip() is None
        assert sorted(zf.namelist()) == ["caf\ufffd.txt", "z.txt"]
        assert zf.read("caf\ufffd.txt") == b"one"


@pytest.mark.parametrize("missing", [False, True])
def test_empty_outputs_give_a_valid_empty_zip(tmp_path: Path, missing: bool) -> None:
    root = tmp_path / "outgoing"
    if not missing:
        (root / "only" / "dirs").mkdir(parents=True)
    data = b"".join(zip_chunks(root))
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert zf.namelist() == []
    assert data.startswith(b"PK\x05\x06")


def test_chunks_are_bounded_for_incompressible_data(tmp_path: Path) -> None:
    root = tmp_path / "outgoing"
    root.mkdir()
    payload = os.urandom(5 * MiB)
    (root / "noise.bin").write_bytes(payload)
    zip_path = tmp_path / "out.zip"
    sizes = stream_to(zip_path, root, chunk_size=256 * 1024)
    assert len(sizes) >= 10
    assert max(sizes) < 2 * 256 * 1024 + 4096
    with zipfile.ZipFile(zip_path) as zf:
        assert zf.read("noise.bin") == payload


def test_forced_zip64_entries_are_valid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outputs, "ZIP64_THRESHOLD", 1)
    root = tmp_path / "outgoing"
    (root / "d").mkdir(parents=True)
    (root / "d" / "x.txt").write_bytes(b"x" * 100_000)
    (root / "y.txt").write_bytes(b"y")
    zip_path = tmp_path / "out.zip"
    stream_to(zip_path, root)
    with zipfile.ZipFile(zip_path) as zf:
        assert sorted(zf.namelist()) == ["d/x.txt", "y.txt"]
        assert zf.read("d/x.txt") == b"x" * 100_000
    check_with_cli(zip_path)


def test_large_output_streams_with_bounded_memory(tmp_path: Path) -> None:
    root = tmp_path / "outgoing"
    root.mkdir()
    size = 300 * MiB
    with open(root / "big.img", "wb") as fh:  # sparse: cheap to create and to read
        fh.truncate(size)
    (root / "small.txt").write_text("s")
    with open(root / "noise.bin", "wb") as fh:  # incompressible: must not pile up either
        for _ in range(40):
            fh.write(os.urandom(MiB))
    zip_path = tmp_path / "out.zip"
    tracemalloc.start()
    try:
        stream_to(zip_path, root)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 32 * MiB
    with zipfile.ZipFile(zip_path) as zf:
        assert zf.getinfo("big.img").file_size == size
        assert zf.getinfo("small.txt").file_size == 1
        assert zf.getinfo("noise.bin").file_size == 40 * MiB
        assert zf.testzip() is None


def test_files_turning_into_symlinks_are_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the plugin swaps a file for a symlink between listing and opening
    root = tmp_path / "outgoing"
    root.mkdir()
    (tmp_path / "secret.txt").write_text("secret")
    (root / "a.txt").write_text("a")
    (root / "b.txt").write_text("b")
    real = outputs.iter_output_files

    def racing(r: Path, **kw: bool) -> Iterator[tuple[str, Path]]:
        for rel, path in real(r, **kw):
            if rel == "b.txt":
                path.unlink()
                path.symlink_to(tmp_path / "secret.txt")
            yield rel, path

    monkeypatch.setattr(outputs, "iter_output_files", racing)
    with zipfile.ZipFile(io.BytesIO(b"".join(zip_chunks(root)))) as zf:
        assert zf.namelist() == ["a.txt"]
