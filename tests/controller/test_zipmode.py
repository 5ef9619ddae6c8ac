"""Receiving a zipfile-mode upload: staging, deferred refusals, clean-up."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.storage.paths import StorageError
from controller.storage.zipmode import STAGING_DIR, ZipUpload, prepare_upload_dirs, stage_zip_inputs
from tests.support.zips import make_zip


def new_upload(tmp_path: Path, **limits: int) -> ZipUpload:
    prepare_upload_dirs(tmp_path / "sb", tmp_path / "spool")  # as the controller's start
    return ZipUpload(tmp_path / "sb", tmp_path / "spool",
                     **{"max_files": 100, "max_bytes": 1 << 20, **limits})


def test_stage_moves_the_upload_to_incoming(tmp_path: Path) -> None:
    upload = new_upload(tmp_path)
    data = make_zip({"a.txt": b"A", "d/b.txt": b"B"})
    for i in range(0, len(data), 10):  # in small pieces, as the network delivers it
        upload.feed([data[i:i + 10]])
    out = stage_zip_inputs(tmp_path / "sb", "j1", upload)
    assert out["nfiles"] == 2
    key = tmp_path / "sb" / "key-j1"
    assert (key / "incoming" / "d" / "b.txt").read_bytes() == b"B"
    assert (key / "outgoing").stat().st_mode & 0o777 == 0o777
    assert not upload.leaves_files  # the central directory stayed in memory
    upload.discard()  # nothing left to remove, and no error
    assert list((tmp_path / "sb" / STAGING_DIR).iterdir()) == []
    assert list((tmp_path / "spool").iterdir()) == []


def test_a_refusal_is_kept_until_finish_and_leaves_nothing(tmp_path: Path) -> None:
    upload = new_upload(tmp_path, max_files=2)
    upload.feed([make_zip({f"f{i}": b"x" for i in range(5)})])  # no exception here
    assert upload.error is not None
    upload.feed([b"more bytes of the same body are ignored"])
    with pytest.raises(StorageError, match="more than 2 entries"):
        stage_zip_inputs(tmp_path / "sb", "j1", upload)
    upload.discard()
    assert not (tmp_path / "sb" / "key-j1").exists()
    assert list((tmp_path / "sb" / STAGING_DIR).iterdir()) == []
    assert list((tmp_path / "spool").iterdir()) == []


def test_start_removes_what_a_killed_controller_left(tmp_path: Path) -> None:
    sb, spool = tmp_path / "sb", tmp_path / "spool"
    (sb / STAGING_DIR / "abc" / "x").mkdir(parents=True)
    (sb / "key-keep" / "incoming").mkdir(parents=True)
    spool.mkdir()
    (spool / "upload-abc").write_bytes(b"tail")
    (spool / "other").write_bytes(b"not ours")
    assert prepare_upload_dirs(sb, spool) == 2
    assert list((sb / STAGING_DIR).iterdir()) == []
    assert sorted(p.name for p in spool.iterdir()) == ["other"]
    assert (sb / "key-keep" / "incoming").is_dir()
    # on a fresh storeBase it makes both dirs
    assert prepare_upload_dirs(tmp_path / "fresh", tmp_path / "fresh-spool") == 0
    assert (tmp_path / "fresh" / STAGING_DIR).is_dir()
    assert (tmp_path / "fresh-spool").is_dir()
