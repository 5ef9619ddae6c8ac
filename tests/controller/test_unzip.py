"""Safe unpacking of the zipfile-mode ``data_file`` (controller.storage.unzip)."""

from __future__ import annotations

import io
import os
import stat
import struct
import tracemalloc
import zipfile
from pathlib import Path

import pytest

from controller.storage import unzip
from controller.storage.paths import StorageError, key_dir, safe_join
from controller.storage.zipstream import unpack_zip

MiB = 1 << 20
LIMITS = {"max_files": 1000, "max_bytes": 64 * MiB}


def make_zip(entries: list[tuple[str | zipfile.ZipInfo, bytes]], **kw: object) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, **kw) as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return buf.getvalue()


def info(name: str, mode: int) -> zipfile.ZipInfo:
    zi = zipfile.ZipInfo(name)
    zi.create_system = 3
    zi.external_attr = mode << 16
    return zi


def tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() + ("/" if p.is_dir() else "") for p in root.rglob("*")}


def unpack(tmp_path: Path, data: bytes, **limits: int) -> tuple[int, Path]:
    zip_path = tmp_path / "data.zip"
    zip_path.write_bytes(data)
    dest = tmp_path / "incoming"
    dest.mkdir()
    return unpack_zip(zip_path, dest, **{**LIMITS, **limits}), dest


def nothing_outside_dest(tmp_path: Path) -> bool:
    """Only the zip and the destination remain (the spool is gone)."""
    return sorted(p.name for p in tmp_path.iterdir()) == ["data.zip", "incoming"]


def refused(tmp_path: Path, data: bytes, **limits: int) -> StorageError:
    with pytest.raises(StorageError) as exc:
        unpack(tmp_path, data, **limits)
    assert exc.value.field == "data_file"
    return exc.value


def patch_central(data: bytes, offset: int, fmt: str, value: int, *, local: bool = False) -> bytes:
    """Overwrite a field in every central-directory header (and local header)."""
    out = bytearray(data)
    sigs = [(b"PK\x01\x02", offset)]
    if local:
        # central offsets 10..27 map to local offsets 8..25 (no 'version made by')
        sigs.append((b"PK\x03\x04", offset - 2))
    for sig, off in sigs:
        start = 0
        while (pos := out.find(sig, start)) >= 0:
            struct.pack_into(fmt, out, pos + off, value)
            start = pos + 4
    return bytes(out)


# -- paths --------------------------------------------------------------------------


def test_safe_join_accepts_relative_and_refuses_escapes(tmp_path: Path) -> None:
    assert safe_join(tmp_path, "a/./b//c") == tmp_path / "a" / "b" / "c"
    assert safe_join(tmp_path, "") == tmp_path
    for bad, why in [
        ("/etc", "must be relative"),
        ("\\x", "must be relative"),
        ("C:\\x", "must be relative"),
        ("a/../../x", "must not contain '..'"),
        ("..", "must not contain '..'"),
        ("a\x00b", "NUL"),
    ]:
        with pytest.raises(StorageError, match=why) as exc:
            safe_join(tmp_path, bad, field="job_output_path")
        assert exc.value.status == 400
        assert exc.value.field == "job_output_path"
        assert str(exc.value).startswith("job_output_path: ")


def test_key_dir(tmp_path: Path) -> None:
    assert key_dir(tmp_path, "chris-jid-4") == tmp_path / "key-chris-jid-4"
    with pytest.raises(StorageError, match="jid: invalid job id"):
        key_dir(tmp_path, "../x")


# -- good zips ----------------------------------------------------------------------


def test_unpacks_files_and_dirs_and_counts_without_links(tmp_path: Path) -> None:
    data = make_zip(
        [
            ("a.txt", b"A"),
            ("sub/b.txt", b"B" * 3000),
            ("empty/", b""),
            ("sub/deeper/c.bin", bytes(range(256))),
            ("x.chrislink", b"home/bob"),
        ]
    )
    nfiles, dest = unpack(tmp_path, data)
    assert nfiles == 3
    assert tree(dest) == {
        "a.txt",
        "sub/",
        "sub/b.txt",
        "empty/",
        "sub/deeper/",
        "sub/deeper/c.bin",
        "x.chrislink",
    }
    assert (dest / "sub/b.txt").read_bytes() == b"B" * 3000
    assert (dest / "sub/deeper/c.bin").read_bytes() == bytes(range(256))


def test_valid_empty_zip_gives_zero_files(tmp_path: Path) -> None:
    nfiles, dest = unpack(tmp_path, make_zip([]))
    assert nfiles == 0
    assert list(dest.iterdir()) == []


def test_modes_are_normalised_but_owner_exec_kept(tmp_path: Path) -> None:
    data = make_zip(
        [
            (info("run.sh", stat.S_IFREG | 0o4775), b"#!/bin/sh\n"),
            (info("secret.txt", stat.S_IFREG | 0o600), b"s"),
            (info("d/", stat.S_IFDIR | 0o700), b""),
            ("plain.txt", b"p"),
        ]
    )
    old = os.umask(0o077)
    try:
        nfiles, dest = unpack(tmp_path, data)
    finally:
        os.umask(old)
    assert nfiles == 3
    assert stat.S_IMODE((dest / "run.sh").stat().st_mode) == 0o755
    assert stat.S_IMODE((dest / "secret.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((dest / "plain.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((dest / "d").stat().st_mode) == 0o755


def test_streams_large_entry_intact(tmp_path: Path) -> None:
    payload = os.urandom(3 * MiB + 17)
    nfiles, dest = unpack(tmp_path, make_zip([("big.bin", payload)]))
    assert nfiles == 1
    assert (dest / "big.bin").read_bytes() == payload


def test_backslashes_are_separators(tmp_path: Path) -> None:
    nfiles, dest = unpack(tmp_path, make_zip([("dir\\file.txt", b"x")]))
    assert nfiles == 1
    assert tree(dest) == {"dir/", "dir/file.txt"}


def test_duplicate_names_later_wins_and_counts_once(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="Duplicate name"):
        data = make_zip([("x.txt", b"first"), ("x.txt", b"second")])
    nfiles, dest = unpack(tmp_path, data)
    assert nfiles == 1
    assert (dest / "x.txt").read_bytes() == b"second"


# -- bad and hostile zips -----------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [b"1000", b"", b"PK\x03\x04garbage", pytest.param(None, id="truncated")],
)
def test_not_a_zip(tmp_path: Path, data: bytes | None) -> None:
    if data is None:
        full = make_zip([("a.txt", os.urandom(5000))])
        data = full[: len(full) // 2]
    err = refused(tmp_path, data)
    assert str(err) == "data_file: Bad zip file"
    assert err.status == 400


def test_corrupt_entry_data(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("a.txt", b"hello world")
    data = buf.getvalue().replace(b"hello world", b"hello WORLD")
    err = refused(tmp_path, data)
    assert str(err) == "data_file: Bad zip file (entry 'a.txt' is corrupt)"
    assert err.status == 400


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("../evil", "data_file: entry '../evil' contains '..'"),
        ("a/../../evil", "data_file: entry 'a/../../evil' contains '..'"),
        ("..\\evil", "data_file: entry '..\\\\evil' contains '..'"),
        ("/abs", "data_file: entry '/abs' has an absolute path"),
        ("\\abs", "data_file: entry '\\\\abs' has an absolute path"),
        ("C:\\x.txt", "data_file: entry 'C:\\\\x.txt' has an absolute path"),
        ("c:/x.txt", "data_file: entry 'c:/x.txt' has an absolute path"),
        ("./", None),
    ],
)
def test_refuses_escaping_names(tmp_path: Path, name: str, message: str | None) -> None:
    data = make_zip([("ok.txt", b"ok"), (name, b"x")])
    if message is None:  # './' is harmless: a directory entry for dest itself
        nfiles, dest = unpack(tmp_path, data)
        assert (nfiles, tree(dest)) == (1, {"ok.txt"})
        return
    err = refused(tmp_path, data)
    assert str(err) == message
    assert err.status == 400
    assert not (tmp_path / "evil").exists()
    assert nothing_outside_dest(tmp_path)


@pytest.mark.parametrize(
    ("mode", "why"),
    [
        (stat.S_IFLNK | 0o777, "is a symbolic link"),
        (stat.S_IFIFO | 0o644, "is a special file"),
        (stat.S_IFCHR | 0o644, "is a special file"),
    ],
)
def test_refuses_links_and_special_files(tmp_path: Path, mode: int, why: str) -> None:
    err = refused(tmp_path, make_zip([(info("link", mode), b"/etc/passwd")]))
    assert str(err) == f"data_file: entry 'link' {why}"
    assert err.status == 400
    # its data may have been streamed as a plain file (modes live in the central
    # directory); never as a link or a special file
    assert all(p.is_file() and not p.is_symlink() for p in (tmp_path / "incoming").iterdir())


def test_refuses_encrypted_entries(tmp_path: Path) -> None:
    data = patch_central(make_zip([("s.txt", b"secret")]), 8, "<H", 0x1)
    assert str(refused(tmp_path, data)) == "data_file: entry 's.txt' is encrypted"


def test_refuses_unsupported_compression(tmp_path: Path) -> None:
    data = patch_central(make_zip([("d64.bin", b"x" * 100)]), 10, "<H", 9)
    err = refused(tmp_path, data)
    assert str(err) == "data_file: entry 'd64.bin' uses unsupported compression method 9"


@pytest.mark.parametrize(
    ("entries", "culprit"),
    [
        ([("a", b"f"), ("a/b", b"x")], "a"),
        ([("a/b", b"x"), ("a", b"f")], "a"),
        ([("d/", b""), ("d", b"f")], "d"),
    ],
)
def test_refuses_file_directory_conflicts(
    tmp_path: Path, entries: list[tuple[str, bytes]], culprit: str
) -> None:
    err = refused(tmp_path, make_zip(entries))
    assert str(err) == f"data_file: entry {culprit!r} is both a file and a directory"


def test_too_many_entries(tmp_path: Path) -> None:
    data = make_zip([(f"f{i}.txt", b"x") for i in range(10)])
    err = refused(tmp_path, data, max_files=5)
    assert (str(err), err.status) == ("data_file: more than 5 entries", 413)
    assert len(list((tmp_path / "incoming").iterdir())) <= 5  # stopped at the sixth


def test_exactly_max_files_is_fine(tmp_path: Path) -> None:
    nfiles, _ = unpack(tmp_path, make_zip([(f"f{i}.txt", b"x") for i in range(10)]), max_files=10)
    assert nfiles == 10


def test_declared_size_over_limit_refused_before_writing(tmp_path: Path) -> None:
    data = make_zip([("a.bin", bytes(6 * MiB)), ("b.bin", bytes(5 * MiB))])
    err = refused(tmp_path, data, max_bytes=10 * MiB)
    assert (str(err), err.status) == ("data_file: uncompressed size over 10 MiB", 413)
    assert sum(p.stat().st_size for p in (tmp_path / "incoming").iterdir()) <= 10 * MiB


def bomb() -> bytes:
    return make_zip([("bomb.bin", bytes(50 * MiB))])


def test_lying_sizes_never_write_past_the_declared_size(tmp_path: Path) -> None:
    # the central directory and local header claim 1000 bytes for 50 MiB of zeros
    data = patch_central(bomb(), 24, "<I", 1000, local=True)
    err = refused(tmp_path, data, max_bytes=10 * MiB)
    assert str(err) == "data_file: Bad zip file (entry 'bomb.bin' is corrupt)"
    assert (tmp_path / "incoming" / "bomb.bin").stat().st_size <= 1000


def test_actual_bytes_are_counted_while_extracting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A zip with data descriptors is extracted from the spool; bypass the declared-size
    # check there to prove the running count alone stops a bomb.
    real_plan = unzip.plan
    monkeypatch.setattr(unzip, "plan", lambda infos, mf, mb: real_plan(infos, mf, 1 << 40))
    err = refused(tmp_path, make_unseekable_zip([("bomb.bin", bytes(50 * MiB))]),
                  max_bytes=10 * MiB)
    assert (str(err), err.status) == ("data_file: uncompressed size over 10 MiB", 413)
    assert (tmp_path / "incoming" / "bomb.bin").stat().st_size <= 10 * MiB


def test_budget_spans_entries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_plan = unzip.plan
    monkeypatch.setattr(unzip, "plan", lambda infos, mf, mb: real_plan(infos, mf, 1 << 40))
    data = make_unseekable_zip([(f"part{i}.bin", bytes(3 * MiB)) for i in range(4)])
    err = refused(tmp_path, data, max_bytes=10 * MiB)
    assert str(err) == "data_file: uncompressed size over 10 MiB"
    assert sum(p.stat().st_size for p in (tmp_path / "incoming").iterdir()) <= 10 * MiB


# -- streaming while the upload arrives ---------------------------------------------


class _Unseekable(io.RawIOBase):
    """A write-only stream zipfile cannot seek in, so it writes data descriptors."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b: bytes) -> int:  # type: ignore[override]
        self.buf += b
        return len(b)


def make_unseekable_zip(entries: list[tuple[str | zipfile.ZipInfo, bytes]]) -> bytes:
    out = _Unseekable()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return bytes(out.buf)


@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
def test_headers_and_data_split_across_chunks(tmp_path: Path, chunk_size: int) -> None:
    entries = [("a/b.txt", b"hello" * 100), ("c/", b""), ("d.bin", os.urandom(10_000))]
    zip_path = tmp_path / "data.zip"
    zip_path.write_bytes(make_zip(entries))
    dest = tmp_path / "incoming"
    dest.mkdir()
    assert unpack_zip(zip_path, dest, chunk_size=chunk_size, **LIMITS) == 2
    assert (dest / "a/b.txt").read_bytes() == b"hello" * 100
    assert (dest / "d.bin").read_bytes() == entries[2][1]
    assert nothing_outside_dest(tmp_path)


def test_data_descriptors_are_extracted_from_the_spool(tmp_path: Path) -> None:
    payload = os.urandom(200_000)
    data = make_unseekable_zip([("x/big.bin", payload), (info("run.sh", stat.S_IFREG | 0o755),
                                                          b"#!/bin/sh\n")])
    assert zipfile.ZipFile(io.BytesIO(data)).infolist()[0].flag_bits & 0x8  # as intended
    nfiles, dest = unpack(tmp_path, data)
    assert nfiles == 2
    assert (dest / "x/big.bin").read_bytes() == payload
    assert stat.S_IMODE((dest / "run.sh").stat().st_mode) == 0o755
    assert nothing_outside_dest(tmp_path)


def test_spooled_entries_larger_than_the_memory_tail(tmp_path: Path) -> None:
    # 3 MiB of incompressible data behind data descriptors: spooled to a file
    payload = os.urandom(3 * MiB)
    nfiles, dest = unpack(tmp_path, make_unseekable_zip([("r.bin", payload)]))
    assert (nfiles, (dest / "r.bin").read_bytes() == payload) == (1, True)
    assert nothing_outside_dest(tmp_path)  # the spool file is gone


def test_streams_until_an_entry_it_cannot_then_spools_the_rest(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("first.txt", b"1" * 5000)
        zf.writestr("lzma.txt", b"2" * 5000, compress_type=zipfile.ZIP_LZMA)
        zf.writestr("stored.txt", b"3" * 5000, compress_type=zipfile.ZIP_STORED)
    nfiles, dest = unpack(tmp_path, buf.getvalue())
    assert nfiles == 3
    for name, digit in (("first.txt", b"1"), ("lzma.txt", b"2"), ("stored.txt", b"3")):
        assert (dest / name).read_bytes() == digit * 5000


def test_bytes_before_the_first_header_are_allowed(tmp_path: Path) -> None:
    # a self-extracting stub in front of the zip, as zipfile itself accepts
    data = b"#!/bin/sh\nexit 0\n" + make_zip([("a.txt", b"A")])
    nfiles, dest = unpack(tmp_path, data)
    assert (nfiles, (dest / "a.txt").read_bytes()) == (1, b"A")


def test_zip64_entries_stream(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with (zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf,
          zf.open("big.bin", "w", force_zip64=True) as out):
        out.write(b"z" * 70_000)
    nfiles, dest = unpack(tmp_path, buf.getvalue())
    assert (nfiles, (dest / "big.bin").read_bytes()) == (1, b"z" * 70_000)


def test_local_name_must_match_the_central_directory(tmp_path: Path) -> None:
    data = make_zip([("good.txt", b"x")])
    local = data.index(b"PK\x03\x04")
    data = data[:local + 30] + b"evil.txt" + data[local + 38:]
    err = refused(tmp_path, data)
    assert (str(err), err.status) == ("data_file: Bad zip file (entry 'good.txt' is corrupt)",
                                      400)


def test_entries_outside_the_central_directory_are_refused(tmp_path: Path) -> None:
    hidden = make_zip([("hidden.txt", b"h")])
    buf = io.BytesIO()
    buf.write(hidden[:hidden.index(b"PK\x01\x02")])  # a local entry and no directory
    with zipfile.ZipFile(buf, "a") as zf:  # a zip appended after it
        zf.writestr("ok.txt", b"o")
    data = buf.getvalue()
    assert [i.filename for i in zipfile.ZipFile(io.BytesIO(data)).infolist()] == ["ok.txt"]
    err = refused(tmp_path, data)
    assert str(err) == ("data_file: Bad zip file (entry 'hidden.txt' is not in the central "
                        "directory)")


def test_a_nul_in_a_name_is_refused(tmp_path: Path) -> None:
    data = make_zip([("a.txt", b"x")])
    data = data.replace(b"a.txt", b"a\0txt")  # in the local header and the directory
    err = refused(tmp_path, data)
    assert (str(err), err.status) == (
        "data_file: entry 'a\\x00txt' has a NUL character in its name", 400)


def test_a_directory_by_its_mode_only(tmp_path: Path) -> None:
    # no trailing '/', only S_IFDIR in the central directory: streamed as an empty file,
    # then made the directory it is
    nfiles, dest = unpack(tmp_path, make_zip([(info("d", stat.S_IFDIR | 0o755), b""),
                                             ("f.txt", b"f")]))
    assert nfiles == 1
    assert (dest / "d").is_dir()


def test_upload_ending_inside_an_entry_is_a_bad_zip(tmp_path: Path) -> None:
    data = make_zip([("a.bin", os.urandom(50_000))])
    err = refused(tmp_path, data[:20_000])
    assert (str(err), err.status) == ("data_file: Bad zip file", 400)
    assert nothing_outside_dest(tmp_path)


@pytest.mark.parametrize("method", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_a_bzip2_or_lzma_bomb_stops_at_the_limit_without_expanding_in_memory(
        tmp_path: Path, method: int) -> None:
    """zipfile hands a whole read of bzip2/LZMA data to the decompressor: a few
    kilobytes of zeros became tens of megabytes at once.  A zip that lies about the
    size must stop at the limit, with memory bounded by the chunk size."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as zf:
        zf.writestr("zeros.bin", bytes(64 << 20))
    data = bytearray(buf.getvalue())
    for sig, size_at in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):  # both say 10 bytes
        struct.pack_into("<L", data, data.find(sig) + size_at, 10)
    (tmp_path / "bomb.zip").write_bytes(bytes(data))
    del buf, data
    dest = tmp_path / "out"
    dest.mkdir()
    tracemalloc.start()
    try:
        with pytest.raises(StorageError) as refused:
            unpack_zip(tmp_path / "bomb.zip", dest, max_files=10, max_bytes=4 << 20,
                       chunk_size=1 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert refused.value.status == 413
    assert peak < 16 << 20, f"peak {peak >> 20} MiB"
    assert (dest / "zeros.bin").stat().st_size <= 4 << 20


@pytest.mark.parametrize("method", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_bzip2_and_lzma_entries_are_checked_by_their_crc(tmp_path: Path, method: int) -> None:
    content = os.urandom(3000) * 50  # several reads' worth, compressible
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as zf:
        zf.writestr("a.bin", content)
    good = buf.getvalue()
    dest = tmp_path / "ok"
    dest.mkdir()
    (tmp_path / "ok.zip").write_bytes(good)
    assert unpack_zip(tmp_path / "ok.zip", dest, max_files=10, max_bytes=1 << 20) == 1
    assert (dest / "a.bin").read_bytes() == content
    bad = bytearray(good)
    for sig, crc_at in ((b"PK\x03\x04", 14), (b"PK\x01\x02", 16)):  # a wrong CRC in both
        struct.pack_into("<L", bad, bad.find(sig) + crc_at, 0x12345678)
    (tmp_path / "bad.zip").write_bytes(bytes(bad))
    dest = tmp_path / "bad"
    dest.mkdir()
    with pytest.raises(StorageError, match="corrupt"):
        unpack_zip(tmp_path / "bad.zip", dest, max_files=10, max_bytes=1 << 20)
