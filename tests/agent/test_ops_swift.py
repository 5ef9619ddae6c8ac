"""agent.ops_swift against the real all-in-one Swift of ``tests.support.swift`` (no mocks)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
import tracemalloc
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.chrislinks import expand_links
from agent.fstree import remove_tree
from agent.ops_swift import SwiftOpError, SwiftSettings, copy_from_swift, upload_to_swift
from tests.support.swift import LISTING_LIMIT, SwiftService

OUTPUT_DIR = "home/alice/feeds/feed_1/pl-simple_2/data"
MiB = 1 << 20


@pytest.fixture
def settings(swift_service: SwiftService) -> SwiftSettings:
    """A fresh container of the test user (a test owns everything in it)."""
    container = f"ops-{uuid.uuid4().hex[:10]}"
    conn = swift_service.connection()
    conn.put_container(container)
    conn.close()
    return SwiftSettings(auth_url=swift_service.auth_url, username=swift_service.user,
                         key=swift_service.key, container=container)


@pytest.fixture
def swift(swift_service: SwiftService, settings: SwiftSettings) -> Iterator[object]:
    conn = swift_service.connection()
    yield conn
    conn.close()


def put(service: SwiftService, settings: SwiftSettings, objects: dict[str, bytes | str]) -> None:
    service.put_objects(settings.container, {
        k: v.encode() if isinstance(v, str) else v for k, v in objects.items()})


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative POSIX path -> content); symlinks fail the test."""
    out = {}
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            assert not os.path.islink(os.path.join(top, name)), name
        for name in files:
            path = Path(top, name)
            out[path.relative_to(root).as_posix()] = path.read_bytes()
    return out


def names(swift: object, container: str, prefix: str = "") -> dict[str, bytes]:
    _, listing = swift.get_container(container, prefix=prefix, full_listing=True)  # type: ignore[attr-defined]
    return {o["name"]: swift.get_object(container, o["name"])[1]  # type: ignore[attr-defined]
            for o in listing}


# -- settings ----------------------------------------------------------------------------


def test_settings_from_op() -> None:
    data = {"auth_url": "http://127.0.0.1:1/auth/v1.0", "username": "chris:chris1234",
            "key": "s3cret", "container": "users"}
    s = SwiftSettings.from_op(data)
    assert (s.auth_url, s.username, s.key, s.container) == tuple(data.values())
    assert "s3cret" not in repr(s)
    for missing in ("auth_url", "username", "key", "container"):
        with pytest.raises(ValueError, match=missing):
            SwiftSettings.from_op({k: v for k, v in data.items() if k != missing})
        with pytest.raises(ValueError, match=missing):
            SwiftSettings.from_op({**data, missing: ""})
    with pytest.raises(ValueError, match="auth_url"):
        SwiftSettings.from_op({**data, "auth_url": "file:///etc/passwd"})
    with pytest.raises(ValueError, match="container"):
        SwiftSettings.from_op({**data, "container": "a/b"})


# -- copy --------------------------------------------------------------------------------


def test_copy_nested_prefix(swift_service: SwiftService, settings: SwiftSettings,
                            tmp_path: Path) -> None:
    put(swift_service, settings, {
        "home/alice/uploads/in/a.txt": "A",
        "home/alice/uploads/in/sub/b.txt": "B",
        "home/alice/uploads/in/sub/deep/c.bin": b"\x00\x01",
        "home/alice/uploads/in/empty": b"",
        "home/alice/uploads/other/x.txt": "not mine",
    })
    incoming = tmp_path / "key-j1" / "incoming"
    n = copy_from_swift(settings, ["/home/alice/uploads/in/"], OUTPUT_DIR, incoming)
    assert n == 4
    assert tree(incoming) == {"a.txt": b"A", "sub/b.txt": b"B", "sub/deep/c.bin": b"\x00\x01",
                              "empty": b""}
    assert (incoming / "a.txt").stat().st_mode & 0o777 == 0o644
    # a re-run is idempotent and leaves no temporary files behind
    assert copy_from_swift(settings, ["home/alice/uploads/in"], OUTPUT_DIR, incoming) == 4
    assert sorted(tree(incoming)) == ["a.txt", "empty", "sub/b.txt", "sub/deep/c.bin"]


def test_copy_prefix_is_a_string_prefix(swift_service: SwiftService, settings: SwiftSettings,
                                        tmp_path: Path) -> None:
    """As in pfcon: 'a/b' also matches 'a/bc/...', with the prefix removed once."""
    put(swift_service, settings, {"a/b/x": "1", "a/bc/y": "2", "a/c/z": "3", "a/b/a/b/w": "4"})
    n = copy_from_swift(settings, ["a/b"], OUTPUT_DIR, tmp_path / "in")
    assert tree(tmp_path / "in") == {"x": b"1", "c/y": b"2", "a/b/w": b"4"}
    assert n == 3


def test_copy_several_input_dirs_and_directory_markers(
        swift_service: SwiftService, settings: SwiftSettings, tmp_path: Path) -> None:
    put(swift_service, settings, {"p/one/f": "1", "q/two/g": "2", "p/one/empty/": b""})
    n = copy_from_swift(settings, ["p", "q"], OUTPUT_DIR, tmp_path / "in")
    assert n == 2
    assert tree(tmp_path / "in") == {"one/f": b"1", "two/g": b"2"}
    assert (tmp_path / "in" / "one" / "empty").is_dir()


def test_copy_link_outside_the_prefix(swift_service: SwiftService, settings: SwiftSettings,
                                      tmp_path: Path) -> None:
    """§3.6, first observed case."""
    data = "home/user/feeds/feed_1/pl-dircopy_1/data"
    put(swift_service, settings, {
        f"{data}/a.txt": "a", f"{data}/sub/b.txt": "b",
        f"{data}/home_user_uploads_x.chrislink": "home/user/uploads/x\n",
        "home/user/uploads/x/up.txt": "up",
        "home/user/uploads/xy/not-linked.txt": "no",
    })
    incoming = tmp_path / "in"
    n = copy_from_swift(settings, [data + "/"], OUTPUT_DIR, incoming)
    assert n == 3  # the link file is not counted
    assert tree(incoming) == {
        "a.txt": b"a", "sub/b.txt": b"b",
        "home_user_uploads_x.chrislink": b"home/user/uploads/x\n",
        "home/user/uploads/x/up.txt": b"up",  # outside the prefix: at its full name
    }
    expand_links(incoming)
    assert tree(incoming) == {"a.txt": b"a", "sub/b.txt": b"b",
                              "home_user_uploads_x/up.txt": b"up"}


def test_copy_link_inside_the_prefix(swift_service: SwiftService, settings: SwiftSettings,
                                     tmp_path: Path) -> None:
    """§3.6, second observed case: only incoming/test/test_file.txt."""
    put(swift_service, settings, {
        "home/user/cube/test/test_file.txt": "t",
        "home/user/cube/test.chrislink": "home/user/cube/test",
    })
    incoming = tmp_path / "in"
    assert copy_from_swift(settings, ["home/user/cube"], OUTPUT_DIR, incoming) == 1
    assert tree(incoming) == {"test/test_file.txt": b"t",
                              "test.chrislink": b"home/user/cube/test"}
    expand_links(incoming)
    assert tree(incoming) == {"test/test_file.txt": b"t"}


def test_copy_nested_links(swift_service: SwiftService, settings: SwiftSettings,
                           tmp_path: Path) -> None:
    """§3.6, pfcon's own expectation: home_bob -> PIPELINES_bob -> pipeline.yml."""
    put(swift_service, settings, {
        "home/alice/uploads/links/home_bob.chrislink": "home/bob",
        "home/bob/PIPELINES_bob.chrislink": "PIPELINES/bob",
        "PIPELINES/bob/pipeline.yml": "steps: []",
        "PIPELINES/bobby/other.yml": "not linked",
    })
    incoming = tmp_path / "in"
    assert copy_from_swift(settings, ["home/alice/uploads/links"], OUTPUT_DIR, incoming) == 1
    assert tree(incoming) == {
        "home_bob.chrislink": b"home/bob",
        "home/bob/PIPELINES_bob.chrislink": b"PIPELINES/bob",
        "PIPELINES/bob/pipeline.yml": b"steps: []",
    }
    expand_links(incoming)
    assert tree(incoming) == {"home_bob/PIPELINES_bob/pipeline.yml": b"steps: []"}


def test_copy_link_loops_terminate(swift_service: SwiftService, settings: SwiftSettings,
                                   tmp_path: Path) -> None:
    put(swift_service, settings, {
        "a/fa": "A", "a/b.chrislink": "b", "a/self.chrislink": "a",
        "b/fb": "B", "b/a.chrislink": "a", "b/c.chrislink": "c/",
        "c/fc": "C", "c/b.chrislink": "b",
    })
    incoming = tmp_path / "in"
    assert copy_from_swift(settings, ["a"], OUTPUT_DIR, incoming) == 3
    assert tree(incoming) == {
        "fa": b"A", "b.chrislink": b"b", "self.chrislink": b"a",
        "b/fb": b"B", "b/a.chrislink": b"a", "b/c.chrislink": b"c/",
        "c/fc": b"C", "c/b.chrislink": b"b",
    }


@pytest.mark.parametrize(("target", "why"), [
    (OUTPUT_DIR, "output dir"),
    (OUTPUT_DIR + "/", "output dir"),
    ("home/alice/feeds/feed_1", "output dir or one of its ancestors"),
    ("home/alice/./feeds", "output dir or one of its ancestors"),
    ("home", "ancestors"),
    ("home/alice/../bob", "invalid target"),
    ("/etc", "invalid target"),
    ("   ", "invalid target"),
])
def test_copy_refuses_bad_links(swift_service: SwiftService, settings: SwiftSettings,
                                tmp_path: Path, target: str, why: str) -> None:
    put(swift_service, settings, {"in/ok.txt": "ok", "in/z/bad.chrislink": target,
                                  f"{OUTPUT_DIR}/out.txt": "output"})
    with pytest.raises(SwiftOpError, match=why) as info:
        copy_from_swift(settings, ["in"], OUTPUT_DIR, tmp_path / "in")
    assert "in/z/bad.chrislink" in str(info.value)
    assert not (tmp_path / "in" / OUTPUT_DIR).exists()


def test_copy_refuses_a_bad_link_reached_through_a_link(
        swift_service: SwiftService, settings: SwiftSettings, tmp_path: Path) -> None:
    put(swift_service, settings, {"in/l.chrislink": "elsewhere",
                                  "elsewhere/x.chrislink": "home/alice/feeds"})
    with pytest.raises(SwiftOpError, match=r"elsewhere/x\.chrislink"):
        copy_from_swift(settings, ["in"], OUTPUT_DIR, tmp_path / "in")


def test_copy_allows_a_link_to_a_sibling_of_the_output_dir(
        swift_service: SwiftService, settings: SwiftSettings, tmp_path: Path) -> None:
    sibling = "home/alice/feeds/feed_1/pl-dircopy_1/data"
    put(swift_service, settings, {"in/prev.chrislink": sibling, f"{sibling}/r.txt": "r"})
    assert copy_from_swift(settings, ["in"], OUTPUT_DIR, tmp_path / "in") == 1
    assert (tmp_path / "in" / sibling / "r.txt").read_bytes() == b"r"


def test_copy_refuses_names_escaping_incoming(swift_service: SwiftService,
                                              settings: SwiftSettings, tmp_path: Path) -> None:
    # 'a/b' is a string prefix of 'a/b../evil': without care it would land at ../evil
    put(swift_service, settings, {"a/b../evil": "evil", "a/b/ok": "ok"})
    incoming = tmp_path / "deep" / "in"
    with pytest.raises(SwiftOpError, match="outside incoming"):
        copy_from_swift(settings, ["a/b"], OUTPUT_DIR, incoming)
    assert not (tmp_path / "deep" / "evil").exists()
    with pytest.raises(SwiftOpError, match="empty"):
        copy_from_swift(settings, ["/"], OUTPUT_DIR, incoming)
    with pytest.raises(SwiftOpError, match=r"'\.\.'"):
        copy_from_swift(settings, ["a/../b"], OUTPUT_DIR, incoming)
    with pytest.raises(SwiftOpError, match="output dir"):
        copy_from_swift(settings, ["a/b/"], "home/../etc", incoming)


def test_copy_refuses_file_and_directory_conflicts(
        swift_service: SwiftService, settings: SwiftSettings, tmp_path: Path) -> None:
    put(swift_service, settings, {"c/x": "file", "c/x/y": "under the file"})
    with pytest.raises(SwiftOpError, match="both a file and a directory"):
        copy_from_swift(settings, ["c"], OUTPUT_DIR, tmp_path / "in")


def test_copy_many_objects_in_parallel(swift_service: SwiftService, settings: SwiftSettings,
                                       tmp_path: Path) -> None:
    """More objects than one listing page, fetched on 8 threads, all intact."""
    objects = {f"many/d{i % 7}/f{i:04d}": os.urandom(i * 37 % 5000)
               for i in range(LISTING_LIMIT + 17)}
    put(swift_service, settings, objects)
    t0 = time.monotonic()
    assert copy_from_swift(settings, ["many"], OUTPUT_DIR, tmp_path / "in",
                           workers=8) == len(objects)
    print(f"{len(objects)} objects copied in {time.monotonic() - t0:.2f} s")
    assert tree(tmp_path / "in") == {k.removeprefix("many/"): v for k, v in objects.items()}


def test_copy_large_object_with_bounded_memory(swift: object, settings: SwiftSettings,
                                               tmp_path: Path) -> None:
    source = tmp_path / "big.bin"
    digest = hashlib.sha256()
    with source.open("wb") as f:
        for i in range(20):
            block = hashlib.sha256(str(i).encode()).digest() * (MiB // 32)
            f.write(block)
            digest.update(block)
    with source.open("rb") as f:
        swift.put_object(settings.container, "big/data/big.bin", f,  # type: ignore[attr-defined]
                         content_length=20 * MiB)
    incoming = tmp_path / "in"
    tracemalloc.start()
    try:
        assert copy_from_swift(settings, ["big/data"], OUTPUT_DIR, incoming) == 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * MiB, f"peak {peak / MiB:.1f} MiB"
    got = hashlib.sha256()
    with (incoming / "big.bin").open("rb") as f:
        while block := f.read(MiB):
            got.update(block)
    assert got.hexdigest() == digest.hexdigest()
    assert [p.name for p in incoming.iterdir()] == ["big.bin"]  # no temporary file left


# -- upload ------------------------------------------------------------------------------


def make_outputs(outgoing: Path) -> dict[str, bytes]:
    files = {"a.txt": b"A", "sub/b.txt": b"B", "sub/deep/c.bin": os.urandom(70_000),
             "empty": b""}
    for rel, content in files.items():
        (outgoing / rel).parent.mkdir(parents=True, exist_ok=True)
        (outgoing / rel).write_bytes(content)
    return files


def test_upload_a_tree_then_nothing_twice(swift: object, settings: SwiftSettings,
                                          tmp_path: Path) -> None:
    outgoing = tmp_path / "outgoing"
    files = make_outputs(outgoing)
    prefix = OUTPUT_DIR
    assert upload_to_swift(settings, outgoing, "/" + prefix) == (4, 0)
    expected = {f"{prefix}/{k}": v for k, v in files.items()}
    assert names(swift, settings.container) == expected
    assert upload_to_swift(settings, outgoing, prefix + "/", workers=1) == (0, 4)
    assert names(swift, settings.container) == expected


def test_upload_skips_links_and_special_files(swift: object, settings: SwiftSettings,
                                              tmp_path: Path) -> None:
    outgoing = tmp_path / "outgoing"
    files = make_outputs(outgoing)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "secret").write_text("not an output")
    (outgoing / "link-to-file").symlink_to(elsewhere / "secret")
    (outgoing / "sub" / "link-to-dir").symlink_to(elsewhere)
    (outgoing / "dangling").symlink_to(tmp_path / "nowhere")
    (outgoing / "home_bob.chrislink").write_text("home/bob")
    os.mkfifo(outgoing / "fifo")
    assert upload_to_swift(settings, outgoing, "out") == (len(files), 0)
    assert names(swift, settings.container) == {f"out/{k}": v for k, v in files.items()}


def test_upload_of_a_tree_deeper_than_the_recursion_limit(swift: object,
                                                          settings: SwiftSettings,
                                                          tmp_path: Path) -> None:
    # os.walk (Python 3.11) recursed per level: RecursionError, an "internal error"
    outgoing = tmp_path / "outgoing"
    files = make_outputs(outgoing)
    fd = os.open(outgoing, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(1050):  # empty dirs a plugin can nest, relative to a descriptor
        os.mkdir("d", dir_fd=fd)
        sub = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = sub
    os.close(fd)
    try:
        assert upload_to_swift(settings, outgoing, "out") == (len(files), 0)
        assert names(swift, settings.container) == {f"out/{k}": v for k, v in files.items()}
    finally:  # pytest's own clean-up (shutil.rmtree) would crash on it
        remove_tree(outgoing / "d")


def test_upload_of_a_file_swapped_for_a_fifo_does_not_block(
        settings: SwiftSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file that turns into a fifo after the listing: the open must not wait for a
    writer.  Should it wait, a writer opened after a bound releases it, and the test
    fails because a reader was waiting."""
    import threading

    from agent import ops_swift

    outgoing = tmp_path / "outgoing"
    make_outputs(outgoing)
    listed = ops_swift._outgoing_files

    def listing_then_swap(root: Path) -> Iterator[tuple[str, Path]]:
        entries = list(listed(root))
        os.unlink(outgoing / "a.txt")
        os.mkfifo(outgoing / "a.txt")
        yield from entries

    monkeypatch.setattr(ops_swift, "_outgoing_files", listing_then_swap)
    finished = threading.Event()
    reader_waited: list[bool] = []

    def release() -> None:
        if finished.wait(20):
            return
        try:  # succeeds only if the upload is blocked opening the fifo for reading
            os.close(os.open(outgoing / "a.txt", os.O_WRONLY | os.O_NONBLOCK))
            reader_waited.append(True)
        except OSError:
            pass

    releaser = threading.Thread(target=release)
    releaser.start()
    try:
        with pytest.raises(SwiftOpError, match=r"'out/a\.txt' is not a regular file"):
            upload_to_swift(settings, outgoing, "out", workers=1)
    finally:
        finished.set()
        releaser.join()
    assert not reader_waited


def test_upload_skips_objects_that_already_exist(swift: object, settings: SwiftSettings,
                                                 tmp_path: Path) -> None:
    outgoing = tmp_path / "outgoing"
    files = make_outputs(outgoing)
    swift.put_object(settings.container, "out/a.txt", b"from before")  # type: ignore[attr-defined]
    swift.put_object(settings.container, "outx/sub/b.txt", b"sibling")  # type: ignore[attr-defined]
    assert upload_to_swift(settings, outgoing, "out", workers=2) == (3, 1)
    got = names(swift, settings.container, "out/")
    assert got == {**{f"out/{k}": v for k, v in files.items()}, "out/a.txt": b"from before"}


def test_upload_names_with_spaces_and_non_ascii_round_trip(
        swift: object, settings: SwiftSettings, tmp_path: Path) -> None:
    outgoing = tmp_path / "outgoing"
    files = {"dir with spaces/naïve résumé ✓.txt": "ünïcødé".encode(),
             "日本/データ #1 (final)?.csv": b"1,2\n", "100% & more+plus.txt": b"%"}
    for rel, content in files.items():
        (outgoing / rel).parent.mkdir(parents=True, exist_ok=True)
        (outgoing / rel).write_bytes(content)
    assert upload_to_swift(settings, outgoing, "home/zoë/out put") == (3, 0)
    assert set(names(swift, settings.container)) == {f"home/zoë/out put/{k}" for k in files}
    incoming = tmp_path / "incoming"
    assert copy_from_swift(settings, ["home/zoë/out put"], OUTPUT_DIR, incoming) == 3
    assert tree(incoming) == files
    assert upload_to_swift(settings, outgoing, "home/zoë/out put") == (0, 3)


def test_upload_large_file_with_bounded_memory(swift: object, settings: SwiftSettings,
                                               tmp_path: Path) -> None:
    outgoing = tmp_path / "outgoing"
    outgoing.mkdir()
    block = os.urandom(MiB)
    with (outgoing / "big.bin").open("wb") as f:
        for _ in range(20):
            f.write(block)
    tracemalloc.start()
    try:
        assert upload_to_swift(settings, outgoing, "big") == (1, 0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * MiB, f"peak {peak / MiB:.1f} MiB"
    headers = swift.head_object(settings.container, "big/big.bin")  # type: ignore[attr-defined]
    assert int(headers["content-length"]) == 20 * MiB
    assert headers["etag"] == hashlib.md5(block * 20, usedforsecurity=False).hexdigest()


def test_upload_refuses_bad_output_paths(settings: SwiftSettings, tmp_path: Path) -> None:
    with pytest.raises(SwiftOpError, match="empty"):
        upload_to_swift(settings, tmp_path, "/")
    with pytest.raises(SwiftOpError, match=r"'\.\.'"):
        upload_to_swift(settings, tmp_path, "home/alice/../bob")


def test_upload_of_a_missing_outgoing_dir_uploads_nothing(settings: SwiftSettings,
                                                          tmp_path: Path) -> None:
    assert upload_to_swift(settings, tmp_path / "absent", "out") == (0, 0)


# -- errors ------------------------------------------------------------------------------


def test_wrong_key_is_an_authentication_error(settings: SwiftSettings, tmp_path: Path) -> None:
    bad = dataclasses.replace(settings, key="wrong")
    (tmp_path / "outgoing").mkdir()
    with pytest.raises(SwiftOpError, match="authentication failed") as info:
        copy_from_swift(bad, ["in"], OUTPUT_DIR, tmp_path / "in")
    assert "wrong" not in str(info.value)
    with pytest.raises(SwiftOpError, match="authentication failed"):
        upload_to_swift(bad, tmp_path / "outgoing", "out")


def test_missing_container(settings: SwiftSettings, tmp_path: Path) -> None:
    gone = dataclasses.replace(settings, container=settings.container + "-nope")
    outgoing = tmp_path / "outgoing"
    make_outputs(outgoing)
    for run in (lambda: copy_from_swift(gone, ["in"], OUTPUT_DIR, tmp_path / "in"),
                lambda: upload_to_swift(gone, outgoing, "out")):
        with pytest.raises(SwiftOpError, match="does not exist") as info:
            run()
        assert gone.container in str(info.value)


def test_unreachable_swift(settings: SwiftSettings, tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = dataclasses.replace(settings, auth_url=f"http://127.0.0.1:{port}/auth/v1.0",
                               retries=1, starting_backoff=0.01)
    with pytest.raises(SwiftOpError, match="cannot reach Swift"):
        copy_from_swift(down, ["in"], OUTPUT_DIR, tmp_path / "in")
