"""Small uploads staged on the event loop: which ones, how, and the slow-storeBase gate."""

from __future__ import annotations

import io
import random
import struct
import threading
import zipfile
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from controller.jobs import JOBS
from controller.storage import inline, zipmode
from controller.storage.inline import InlineGate, ZipSummary, small_enough, summarize
from controller.storage.zipmode import STAGING_DIR, ZipUpload, prepare_upload_dirs
from tests.conftest import Harness
from tests.support.zips import make_zip

FIELDS = {"entrypoint": "true", "auid": "a", "number_of_workers": "1", "cpu_limit": "1000",
          "memory_limit": "200", "gpu_limit": "0", "image": "x", "type": "ds"}


def zip_with(files: dict[str, bytes], *, method: int = zipfile.ZIP_DEFLATED,
             comment: bytes = b"") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.comment = comment
    return buf.getvalue()


# ------------------------------------------------------------------ the summary


@pytest.mark.parametrize("method", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
@pytest.mark.parametrize("comment", [b"", b"a zip comment"])
def test_summary_matches_what_zipfile_reads(method: int, comment: bytes) -> None:
    files = {"a.txt": b"A" * 1000, "d/": b"", "d/b.bin": bytes(range(256)) * 9}
    data = zip_with(files, method=method, comment=comment)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        infos = zf.infolist()
        expected = ZipSummary(len(infos), sum(i.file_size for i in infos), False,
                              sum(len(i.orig_filename.encode()) for i in infos), 2)
    assert summarize(data) == expected


@pytest.mark.parametrize("name", ["in/x.chrislink", "x.chrislink/.", "a\\x.chrislink"])
def test_summary_sees_link_files_as_the_unpacker_names_them(name: str) -> None:
    summary = summarize(zip_with({name: b"SERVICES/PACS"}))
    assert summary is not None and summary.has_links
    assert not summarize(zip_with({"x.chrislink.txt": b"no"})).has_links  # type: ignore[union-attr]


@pytest.mark.parametrize("method", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_only_stored_and_deflated_entries_are_summarized(method: int) -> None:
    """Other methods decompress in unbounded steps: never on the loop."""
    assert summarize(zip_with({"a.txt": b"A" * 100}, method=method)) is None
    assert not small_enough(zip_with({"a.txt": b"A" * 100}, method=method), 100, 1 << 30)


def test_an_unsafe_name_has_no_summary() -> None:
    assert summarize(zip_with({"../escape.txt": b"x"})) is None  # the worker says why


@pytest.mark.parametrize("damage", ["prefixed", "truncated", "no-end", "empty", "trailing"])
def test_an_unusual_or_damaged_zip_has_no_summary(damage: str) -> None:
    data = zip_with({"a.txt": b"A", "b.txt": b"B"})
    bad = {"prefixed": b"junk" + data, "truncated": data[:-30], "no-end": data[:-22],
           "empty": b"", "trailing": data + b"\0"}[damage]
    assert summarize(bad) is None


def test_summary_of_mangled_bytes_never_raises() -> None:
    rng = random.Random(5)
    data = zip_with({f"f{i}.txt": bytes([i]) * i for i in range(6)})
    answered = 0
    for _ in range(3000):
        mangled = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            mangled[rng.randrange(len(mangled))] = rng.randrange(256)
        if summarize(bytes(mangled)) is not None:
            answered += 1
    assert answered  # most single-byte changes leave the directory readable


def test_small_enough_bounds_the_work_done_on_the_loop() -> None:
    limits = (100_000, 10 << 30)
    assert small_enough(make_zip({"a.txt": b"hello"}), *limits)
    # a compressible image: a few hundred bytes that unpack to 300 KiB
    assert not small_enough(make_zip({"mask.nii": bytes(300 << 10)}), *limits)
    assert not small_enough(make_zip({f"f{i}": b"x" for i in range(inline.MAX_ENTRIES + 1)}),
                            *limits)
    assert not small_enough(make_zip({"in/x.chrislink": b"SERVICES/PACS"}), *limits)
    big = zip_with({"r.bin": random.Random(1).randbytes(inline.MAX_UPLOAD_BYTES)},
                   method=zipfile.ZIP_STORED)
    assert not small_enough(big, *limits)
    assert not small_enough(b"not a zip", *limits)
    deep = "/".join(["d"] * inline.MAX_DEPTH) + "/f.txt"
    assert not small_enough(make_zip({deep: b"x"}), *limits)
    long_names = {("n" * 250) + str(i): b"" for i in range(inline.MAX_NAME_BYTES // 250 + 1)}
    assert not small_enough(make_zip(long_names), *limits)
    # beyond the configured limits: the worker's unpacker refuses it with the reason
    assert not small_enough(make_zip({"a": b"1", "b": b"2"}), 1, 1 << 20)
    assert not small_enough(make_zip({"a": b"123"}), 10, 2)


def lying_zip(declared: int, actual: int) -> bytes:
    """One deflated entry of ``actual`` zero bytes whose central directory says
    ``declared`` (its local header tells the truth)."""
    data = bytearray(make_zip({"a.bin": bytes(actual)}))
    central = data.find(b"PK\x01\x02")
    struct.pack_into("<L", data, central + 24, declared)
    return bytes(data)


def test_filesystem_type_reads_the_longest_mount_point_above_the_path() -> None:
    mountinfo = ("22 1 8:1 / / rw - ext4 /dev/root rw\n"
                 "30 22 0:40 / /mnt/store\\040box rw shared:1 - nfs4 srv:/x rw\n"
                 "31 30 0:41 / /mnt/store\\040box/sub rw - tmpfs tmpfs rw\n")
    assert inline.filesystem_type(Path("/mnt/store box/k"), mountinfo) == "nfs4"
    assert inline.filesystem_type(Path("/mnt/store box/sub/k"), mountinfo) == "tmpfs"
    assert inline.filesystem_type(Path("/mnt/store boxer"), mountinfo) == "ext4"
    assert inline.filesystem_type(Path("/dev/shm")) == "tmpfs"  # this machine's


def test_the_gate_stays_closed_on_a_network_filesystem(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(inline, "filesystem_type", lambda path: "nfs4")
    assert not InlineGate(tmp_path).is_open()
    monkeypatch.setattr(inline, "filesystem_type", lambda path: "xfs")
    assert InlineGate(tmp_path).is_open()


# ------------------------------------------------------------------ the gate


def test_a_slow_staging_closes_the_gate_for_a_while() -> None:
    now = [100.0]
    gate = InlineGate(clock=lambda: now[0])
    gate.record(inline.SLOW_SECONDS / 2)
    assert gate.is_open()
    gate.record(inline.SLOW_SECONDS * 3)
    assert not gate.is_open()
    now[0] += inline.BACKOFF_SECONDS - 1
    assert not gate.is_open()
    now[0] += 1
    assert gate.is_open()


# ------------------------------------------------------------------ zipmode


def new_upload(tmp_path: Path) -> ZipUpload:
    prepare_upload_dirs(tmp_path / "sb", tmp_path / "spool")
    return ZipUpload(tmp_path / "sb", tmp_path / "spool", max_files=100, max_bytes=1 << 20)


def test_only_an_upload_still_in_memory_can_be_staged_inline(tmp_path: Path) -> None:
    held = new_upload(tmp_path)
    held.hold([make_zip({"a.txt": b"A"})])
    assert held.can_stage_inline()
    fed = new_upload(tmp_path)
    fed.feed([make_zip({"a.txt": b"A"})])  # written to the staging dir already
    assert not fed.can_stage_inline()
    fed.discard()


def test_a_rerun_finishes_on_the_worker_path_with_the_old_inputs_replaced(
        tmp_path: Path) -> None:
    sb = tmp_path / "sb"
    (sb / "key-j1" / "incoming").mkdir(parents=True)
    (sb / "key-j1" / "incoming" / "old.txt").write_text("from the failed attempt")
    upload = new_upload(tmp_path)
    upload.hold([make_zip({"new.txt": b"N"})])
    assert zipmode.stage_small_upload(sb, "j1", upload) is None  # key-j1 exists
    assert (sb / "key-j1" / "incoming" / "old.txt").exists()  # nothing removed yet
    out = zipmode.stage_zip_inputs(sb, "j1", upload)  # finish() is not repeated
    assert out["nfiles"] == 1 and out["jid"] == "j1"
    assert sorted(p.name for p in (sb / "key-j1" / "incoming").iterdir()) == ["new.txt"]
    assert list((sb / STAGING_DIR).iterdir()) == []


# ------------------------------------------------------------------ through the API


def record_staging(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool]]:
    """(how, on the loop's thread) for every staging the controller does."""
    calls: list[tuple[str, bool]] = []
    loop_thread = threading.current_thread()
    for how in ("stage_small_upload", "stage_zip_inputs"):
        original = getattr(zipmode, how)

        def wrapper(*args: Any, _original: Any = original, _how: str = how) -> Any:
            calls.append((_how, threading.current_thread() is loop_thread))
            return _original(*args)

        monkeypatch.setattr(zipmode, how, wrapper)
    return calls


async def post(harness: Harness, jid: str, data: bytes) -> tuple[int, dict[str, Any]]:
    form = aiohttp.FormData()
    for key, value in {**FIELDS, "jid": jid}.items():
        form.add_field(key, value)
    form.add_field("data_file", data, filename="data_file")
    async with (aiohttp.ClientSession(headers=harness.headers()) as s,
                s.post(harness.base + "pluginjobs/", data=form) as r):
        return r.status, await r.json()


async def test_small_uploads_are_staged_on_the_loop_and_others_on_a_worker(
        harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = record_staging(monkeypatch)
    status, body = await post(harness, "small", make_zip({"a.txt": b"A", "d/b.txt": b"B"}))
    assert (status, body["data"]["nfiles"]) == (201, 2)
    assert calls == [("stage_small_upload", True)]
    incoming = harness.config.storebase_mount / "key-small" / "incoming"
    assert (incoming / "d" / "b.txt").read_bytes() == b"B"
    assert (incoming.parent / "outgoing").stat().st_mode & 0o777 == 0o777

    calls.clear()
    status, body = await post(harness, "mask", make_zip({"mask.nii": bytes(300 << 10)}))
    assert (status, body["data"]["nfiles"]) == (201, 1)
    assert calls == [("stage_zip_inputs", False)]


async def test_a_bad_small_upload_is_refused_inline_and_leaves_nothing(
        harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = record_staging(monkeypatch)
    good = make_zip({"a.txt": b"A" * 50})
    at = good.index(b"PK\x01\x02")  # damage the entry's data: the CRC check refuses it
    bad = good[:at - 3] + bytes([good[at - 3] ^ 0xFF]) + good[at - 2:]
    status, body = await post(harness, "bad", bad)
    assert status == 400, body
    assert calls == [("stage_small_upload", True)]
    sb = harness.config.storebase_mount
    assert not (sb / "key-bad").exists()
    assert list((sb / STAGING_DIR).iterdir()) == []
    jobs = harness.app[JOBS]
    assert await jobs.find("plugin", "bad") is None


async def test_local_headers_claiming_more_than_the_directory_make_a_corrupt_zip(
        harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """The unpacker on the loop holds to what the central directory declared."""
    calls = record_staging(monkeypatch)
    status, body = await post(harness, "liar", lying_zip(100, 1 << 20))
    assert status == 400, body
    assert "central directory" in body["message"]
    assert calls == [("stage_small_upload", True)]
    sb = harness.config.storebase_mount
    assert not (sb / "key-liar").exists()
    assert list((sb / STAGING_DIR).iterdir()) == []


async def test_a_link_named_to_pass_the_directory_check_is_expanded_on_a_worker(
        harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = record_staging(monkeypatch)
    monkeypatch.setattr(inline, "summarize", lambda data: ZipSummary(1, 10, False, 10, 1))
    status, body = await post(harness, "links", make_zip({"x.chrislink": b"SERVICES/PACS"}))
    # the link's target does not exist here: what matters is where it was expanded
    assert calls == [("stage_small_upload", True), ("stage_zip_inputs", False)], body
    assert status in (201, 400)


async def test_after_a_slow_staging_uploads_go_to_a_worker(
        harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = record_staging(monkeypatch)
    monkeypatch.setattr(inline, "SLOW_SECONDS", 0.0)  # every staging counts as slow
    for jid in ("first", "second"):
        status, _ = await post(harness, jid, make_zip({"a.txt": b"A"}))
        assert status == 201
    assert calls == [("stage_small_upload", True), ("stage_zip_inputs", False)]
