"""The operation dispatcher (agent.ops): validation, delete, and the swift copy and
upload against the real all-in-one Swift of ``tests.support.swift``."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import pytest

from agent.ops import OpError, run_op, storage_parts
from tests.support.swift import SwiftService


@pytest.fixture
def sb(tmp_path: Path) -> Path:
    root = tmp_path / "storeBase"
    root.mkdir()
    return root


# ------------------------------------------------------------------ dispatch


@pytest.mark.parametrize("op", [{"op": "selftest"}, {"op": None}, {}, {"op": "copy "}])
def test_unknown_operations_are_refused(sb: Path, op: dict[str, Any]) -> None:
    with pytest.raises(OpError, match="unknown operation"):
        run_op(op, sb)


def test_an_op_must_be_an_object(sb: Path) -> None:
    with pytest.raises(OpError, match="expected an object"):
        run_op(["delete"], sb)  # type: ignore[arg-type]


@pytest.mark.parametrize(("value", "parts"), [
    ("home/a/b", ("home", "a", "b")), ("/home/a/b/", ("home", "a", "b")),
    ("home//a/./b", ("home", "a", "b")), ("/", ()), ("", ()),
])
def test_storage_parts(value: str, parts: tuple[str, ...]) -> None:
    assert storage_parts(value, "f") == parts


@pytest.mark.parametrize("value", ["a/../b", "..", "/..", "a/\x00"])
def test_storage_parts_refuses_escapes(value: str) -> None:
    with pytest.raises(OpError, match=r"^f: "):
        storage_parts(value, "f")


# -------------------------------------------------------------------- delete


def test_delete_removes_the_key_dir(sb: Path) -> None:
    (sb / "key-j1" / "incoming" / "d").mkdir(parents=True)
    (sb / "key-j1" / "incoming" / "d" / "f.txt").write_text("x")
    (sb / "key-j2").mkdir()
    assert run_op({"op": "delete", "key_dir": "key-j1"}, sb) == "deleted key-j1\n"
    assert sorted(os.listdir(sb)) == ["key-j2"]
    assert run_op({"op": "delete", "key_dir": "key-j1"}, sb) == "key-j1 already absent\n"


@pytest.mark.parametrize("key", ["home", "key-", "key-../x", "../key-x", "key-a/b", "", 3, None])
def test_delete_refuses_what_is_not_a_key_dir(sb: Path, key: Any) -> None:
    (sb / "home").mkdir()
    with pytest.raises(OpError, match="not a job key directory"):
        run_op({"op": "delete", "key_dir": key}, sb)
    assert (sb / "home").is_dir()


def test_delete_refuses_a_symlinked_key_dir(sb: Path, tmp_path: Path) -> None:
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "f.txt").write_text("keep")
    (sb / "key-j1").symlink_to(outside)
    with pytest.raises(OpError, match="symbolic link"):
        run_op({"op": "delete", "key_dir": "key-j1"}, sb)
    assert (outside / "f.txt").read_text() == "keep"


# -------------------------------------------------------------- upload/copy


CREDS = {"auth_url": "http://127.0.0.1:1/auth/v1.0", "username": "u:v", "key": "k",
         "container": "users"}


@pytest.mark.parametrize(("op", "message"), [
    ({"op": "upload", "storage": "fslink", "key_dir": "key-j1", "job_output_path": "a",
      "swift": CREDS}, "storage: upload does not support storage 'fslink'"),
    ({"op": "upload", "storage": "swift", "key_dir": "key-j1", "job_output_path": "a/../..",
      "swift": CREDS}, "job_output_path: path 'a/../..' must not contain '..'"),
    ({"op": "upload", "storage": "swift", "key_dir": "key-j1", "job_output_path": "/",
      "swift": CREDS}, "job_output_path: must not be empty"),
    ({"op": "upload", "storage": "swift", "key_dir": "key-j1", "job_output_path": "a"},
     "swift: expected an object"),
    ({"op": "upload", "storage": "swift", "key_dir": "key-j1", "job_output_path": "a",
      "swift": {**CREDS, "auth_url": "ftp://x"}}, "swift: swift settings: 'auth_url'"),
    ({"op": "upload", "storage": "swift", "key_dir": "key-j1", "job_output_path": "a",
      "swift": CREDS}, "key-j1 does not exist"),
    ({"op": "copy", "storage": "swift", "key_dir": "key-j1", "input_dirs": ["a"],
      "output_dir": "o", "swift": {**CREDS, "key": ""}}, "swift: swift settings: 'key'"),
    ({"op": "copy", "storage": "s3", "key_dir": "key-j1", "input_dirs": ["a"],
      "output_dir": "o"}, "storage: copy does not support storage 's3'"),
])
def test_bad_swift_ops_touch_nothing(sb: Path, op: dict[str, Any], message: str) -> None:
    with pytest.raises(OpError) as exc:
        run_op(op, sb)
    assert str(exc.value).startswith(message)
    assert os.listdir(sb) == []


def test_upload_without_outgoing_uploads_nothing(sb: Path) -> None:
    (sb / "key-j1").mkdir()
    op = {"op": "upload", "storage": "swift", "key_dir": "key-j1", "job_output_path": "a",
          "swift": CREDS}
    assert run_op(op, sb) == "uploaded 0, skipped 0 (no outgoing directory)\n"


@pytest.fixture
def swift_op_creds(swift_service: SwiftService) -> dict[str, str]:
    container = f"ops-{uuid.uuid4().hex[:10]}"
    conn = swift_service.connection()
    conn.put_container(container)
    conn.close()
    return {"auth_url": swift_service.auth_url, "username": swift_service.user,
            "key": swift_service.key, "container": container}


def test_swift_copy_then_upload(sb: Path, swift_service: SwiftService,
                                swift_op_creds: dict[str, str]) -> None:
    data = "home/alice/feeds/feed_1/pl-dircopy_1/data"
    swift_service.put_objects(swift_op_creds["container"], {
        f"{data}/a.txt": b"a", f"{data}/home_bob.chrislink": b"home/bob",
        "home/bob/PIPELINES_bob.chrislink": b"PIPELINES/bob",
        "PIPELINES/bob/pipeline.yml": b"name: p"})
    copy = {"op": "copy", "storage": "swift", "key_dir": "key-j1", "input_dirs": [data],
            "output_dir": "home/alice/feeds/feed_1/pl-app_2/data", "swift": swift_op_creds}
    (sb / "key-j1" / "incoming").mkdir(parents=True)
    (sb / "key-j1" / "incoming" / "stale.txt").write_text("from an earlier attempt")
    assert run_op(copy, sb) == "copied 2 files from 1 input dirs\n"
    incoming = sb / "key-j1" / "incoming"
    files = {p.relative_to(incoming).as_posix() for p in incoming.rglob("*") if p.is_file()}
    assert files == {"a.txt", "home_bob/PIPELINES_bob/pipeline.yml"}
    outgoing = sb / "key-j1" / "outgoing"
    assert outgoing.is_dir() and (outgoing.stat().st_mode & 0o777) == 0o777

    (outgoing / "sub").mkdir()
    (outgoing / "sub" / "r.txt").write_text("result")
    (outgoing / "x.chrislink").write_text("home/bob")
    upload = {"op": "upload", "storage": "swift", "key_dir": "key-j1",
              "job_output_path": "/home/alice/feeds/feed_1/pl-app_2/data", "swift": swift_op_creds}
    assert run_op(upload, sb) == "uploaded 1, skipped 0\n"
    assert run_op(upload, sb) == "uploaded 0, skipped 1\n"
    conn = swift_service.connection()
    try:
        _, body = conn.get_object(swift_op_creds["container"],
                                  "home/alice/feeds/feed_1/pl-app_2/data/sub/r.txt")
    finally:
        conn.close()
    assert body == b"result"


def test_swift_copy_refuses_a_link_to_the_output_dir(sb: Path, swift_service: SwiftService,
                                                      swift_op_creds: dict[str, str]) -> None:
    swift_service.put_objects(swift_op_creds["container"], {
        "in/evil.chrislink": b"home/alice"})
    copy = {"op": "copy", "storage": "swift", "key_dir": "key-j1", "input_dirs": ["in"],
            "output_dir": "home/alice/feeds/feed_1/pl-app_2/data", "swift": swift_op_creds}
    with pytest.raises(OpError, match=r"evil\.chrislink"):
        run_op(copy, sb)
