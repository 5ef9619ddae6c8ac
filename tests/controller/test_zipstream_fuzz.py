"""Bounded, deterministic fuzzing of the streaming unzip (controller.storage.zipstream),
and regressions for what it found.

Each input is a valid zip with a few bytes flipped, overwritten, inserted, deleted or
cut off, fed to a :class:`ZipUpload` in random chunk sizes as the API feeds it.  The
property: the upload unpacks to exactly what :mod:`zipfile` reads from the same bytes
(names as pfleet maps them, contents), or it is refused with a ``StorageError``
(400/413); either way, once discarded nothing is left in the staging dir or the spool
dir, and nothing is ever written anywhere else.  Refusing more than zipfile does is
allowed (the streaming checks are stricter), so the test also requires that the
unchanged zips and a share of the mutated ones are accepted.
"""

from __future__ import annotations

import io
import os
import random
import stat
import struct
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from controller.storage import zipstream
from controller.storage.paths import StorageError
from controller.storage.tailspool import MEMORY_LIMIT, TailSpool
from controller.storage.zipmode import STAGING_DIR, ZipUpload, prepare_upload_dirs
from controller.storage.zipstream import unpack_zip
from tests.support.zips import make_zip

MAX_FILES = 40
MAX_BYTES = 256 << 10
CASES_PER_BASE = 250  # x 7 bases; with the cut-offs and crafted cases ~2,400 uploads
_SIGS = (b"PK\x03\x04", b"PK\x01\x02", b"PK\x05\x06", b"PK\x06\x06", b"PK\x06\x07",
         b"PK\x07\x08")
_CHUNK_SIZES = (1, 2, 3, 4, 5, 17, 29, 30, 31, 46, 100, 1000, 1 << 16)
_VALUES = (0, 1, 2, 8, 0x7F, 0x80, 0xFF, 0x800, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF)

# relative path ('/'-terminated for a dir) -> (content, owner-executable) of a file
Tree = dict[str, tuple[bytes, bool] | None]


# -- the zips to start from ---------------------------------------------------------------


def _zip(write: Callable[[zipfile.ZipFile], None], *, prefix: bytes = b"",
         seekable: bool = True, comment: bytes = b"") -> bytes:
    buf = io.BytesIO()
    target: io.RawIOBase | io.BytesIO = buf if seekable else _Unseekable(buf)
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zf:
        write(zf)
        zf.comment = comment
    return prefix + buf.getvalue()


class _Unseekable(io.RawIOBase):
    """A write-only stream: zipfile then writes data descriptors after each entry."""

    def __init__(self, buf: io.BytesIO) -> None:
        super().__init__()
        self.buf = buf

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        return self.buf.write(data)


def _info(name: str, mode: int, method: int = zipfile.ZIP_STORED) -> zipfile.ZipInfo:
    zi = zipfile.ZipInfo(name, (2024, 1, 2, 3, 4, 6))
    zi.create_system, zi.external_attr, zi.compress_type = 3, mode << 16, method
    return zi


def _stored_modes(zf: zipfile.ZipFile) -> None:
    zf.writestr(_info("bin/run.sh", stat.S_IFREG | 0o755), b"#!/bin/sh\necho hi\n")
    zf.writestr(_info("mode-dir", stat.S_IFDIR | 0o755), b"")
    zf.writestr(_info("dir/", stat.S_IFDIR | 0o755), b"")
    zf.writestr(_info("dir/plain", stat.S_IFREG | 0o644), bytes(range(256)))
    zf.writestr(_info("win\\path.txt", 0), b"backslash")


def _other_methods(zf: zipfile.ZipFile) -> None:  # streams one entry, spools the rest
    zf.writestr("first.txt", b"first " * 30)
    zf.writestr(_info("b.bz2", 0o644, zipfile.ZIP_BZIP2), b"bzip2 " * 40)
    zf.writestr(_info("l.xz", 0o644, zipfile.ZIP_LZMA), b"lzma " * 40)
    zf.writestr("after/last.txt", b"last")


def _descriptors(zf: zipfile.ZipFile) -> None:
    zf.writestr("s.txt", b"stored with a descriptor", zipfile.ZIP_STORED)
    zf.writestr("d.txt", b"deflated with a descriptor " * 9)


def _zip64(zf: zipfile.ZipFile) -> None:
    for name, data in (("big1", b"sixty-four " * 20), ("big2", b"")):
        with zf.open(name, "w", force_zip64=True) as out:
            out.write(data)
    zf.writestr("small", b"s")


def _duplicates() -> bytes:
    data = make_zip({"dup1": b"first", "other": b"o", "dup2": b"second"})
    return data.replace(b"dup2", b"dup1")  # later wins, in zipfile as in pfleet


BASES: dict[str, Callable[[], bytes]] = {
    "deflated": lambda: make_zip({
        "a.txt": "hello " * 40, "d/b.bin": random.Random(1).randbytes(700),
        "d/e/": b"", "empty.txt": b"", "x/y/z.txt": b"z" * 3000}),
    "stored-modes": lambda: _zip(_stored_modes),
    "other-methods": lambda: _zip(_other_methods),
    "descriptors": lambda: _zip(_descriptors, seekable=False),
    "zip64-comment": lambda: _zip(_zip64, comment=b"a comment"),
    "prefixed": lambda: _zip(lambda zf: zf.writestr("p.txt", b"after a prefix " * 5),
                             prefix=b"#!sfx stub\n"),
    "duplicates": _duplicates,
}


# -- what zipfile reads, mapped by pfleet's rules ------------------------------------------


def zipfile_tree(data: bytes) -> Tree | None:
    """What must be unpacked from ``data``, or None when it must be refused.  A
    directory's data is never read (nor is it by ``extractall``)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = zf.infolist()
            contents = [None if _is_dir(i) else zf.read(i) for i in infos]
    except Exception:  # anything zipfile cannot read must be refused
        return None
    if len(infos) > MAX_FILES:
        return None
    files: dict[tuple[str, ...], tuple[bytes, bool]] = {}
    dirs: set[tuple[str, ...]] = set()
    declared = 0
    for info, content in zip(infos, contents, strict=True):
        mode = info.external_attr >> 16
        if (info.flag_bits & 0x1 or stat.S_ISLNK(mode)
                or stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR)):
            return None
        name = info.orig_filename.replace("\\", "/")
        raw_parts = name.split("/")
        if ("\0" in name or name.startswith("/") or ".." in raw_parts
                or (len(name) >= 2 and name[1] == ":" and name[0].isalpha())):
            return None
        parts = tuple(p for p in raw_parts if p not in ("", "."))
        if not parts:
            if content is None:
                continue
            return None
        if content is None:
            dirs.add(parts)
        else:
            files[parts] = (content, bool(mode & stat.S_IXUSR))  # a later duplicate wins
            declared += info.file_size
        dirs.update(parts[:i] for i in range(1, len(parts)))
    if declared > MAX_BYTES or files.keys() & dirs:
        return None
    return ({"/".join(p): c for p, c in files.items()}
            | {"/".join(p) + "/": None for p in dirs})


def _is_dir(info: zipfile.ZipInfo) -> bool:
    return (info.orig_filename.replace("\\", "/").endswith("/")
            or stat.S_ISDIR(info.external_attr >> 16))


def disk_tree(root: Path) -> Tree:
    """What is in ``root``; only plain files (0644/0755) and dirs (0755) may be."""
    tree: Tree = {}
    for path in root.rglob("*"):
        st = os.lstat(path)
        rel = path.relative_to(root).as_posix()
        if stat.S_ISDIR(st.st_mode):
            assert stat.S_IMODE(st.st_mode) == 0o755, rel
            tree[rel + "/"] = None
        else:
            assert stat.S_ISREG(st.st_mode), rel
            assert stat.S_IMODE(st.st_mode) in (0o644, 0o755), rel
            tree[rel] = (path.read_bytes(), bool(st.st_mode & stat.S_IXUSR))
    return tree


# -- feeding an upload --------------------------------------------------------------------


def chunks(rng: random.Random, data: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        size = rng.choice(_CHUNK_SIZES)
        out.append(data[pos:pos + size])
        pos += size
    return out


def upload_outcome(root: Path, data: bytes, rng: random.Random) -> Tree | StorageError:
    """Feed ``data`` to a new upload under ``root``; its tree, or its refusal.  Either
    way the upload is discarded after, and must leave nothing."""
    storebase, spool_dir = root / "sb", root / "spool"
    upload = ZipUpload(storebase, spool_dir, max_files=MAX_FILES, max_bytes=MAX_BYTES)
    try:
        pieces = chunks(rng, data)
        while pieces:  # one chunk or a batch of them per call, as the API does
            n = rng.choice((1, 1, 3))
            upload.feed(pieces[:n])
            pieces = pieces[n:]
        try:
            upload.finish()
        except StorageError as exc:
            return exc
        tree = disk_tree(upload.staging)
        assert upload.nfiles == sum(1 for k in tree if not k.endswith("/"))
        return tree
    finally:
        upload.discard()
        assert list((storebase / STAGING_DIR).iterdir()) == []
        assert list(spool_dir.iterdir()) == []
        assert sorted(p.name for p in root.iterdir()) == ["sb", "spool"]
        assert sorted(p.name for p in storebase.iterdir()) == [STAGING_DIR]


def check(root: Path, data: bytes, rng: random.Random, label: str) -> bool:
    """The property for one input; returns whether it was accepted."""
    want = zipfile_tree(data)
    got = upload_outcome(root, data, rng)
    why = f"{label}: {data.hex()}"
    if isinstance(got, StorageError):
        assert got.field == "data_file", why
        assert got.status in (400, 413), why
        assert str(root) not in got.message, why
        return False
    assert want is not None, f"accepted what must be refused; {why}"
    assert got == want, why
    return True


# -- mutations ----------------------------------------------------------------------------


def _structure(data: bytes) -> list[int]:
    return sorted(m for sig in _SIGS for m in _find_all(data, sig))


def _find_all(data: bytes, sub: bytes) -> list[int]:
    out, pos = [], data.find(sub)
    while pos >= 0:
        out.append(pos)
        pos = data.find(sub, pos + 1)
    return out


def mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    marks = _structure(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        if not out:
            break
        if marks and rng.random() < 0.7:  # mostly in or near a header's fields
            pos = min(len(out) - 1, rng.choice(marks) + rng.randrange(48))
        else:
            pos = rng.randrange(len(out))
        kind = rng.randrange(6)
        if kind == 0:
            out[pos] ^= 1 << rng.randrange(8)
        elif kind == 1:
            out[pos] = rng.randrange(256)
        elif kind == 2:
            fmt = rng.choice(("<H", "<L"))
            value = rng.choice(_VALUES) & (0xFFFF if fmt == "<H" else 0xFFFFFFFF)
            if pos + struct.calcsize(fmt) <= len(out):
                struct.pack_into(fmt, out, pos, value)
        elif kind == 3:
            out[pos:pos] = rng.randbytes(rng.randrange(1, 9))
        elif kind == 4:
            del out[pos:pos + rng.randrange(1, 9)]
        else:
            del out[pos:]
    return bytes(out)


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    prepare_upload_dirs(tmp_path / "sb", tmp_path / "spool")  # as the controller starts
    # the spool kept in memory, moved to a sparse file midway, or a file from the start
    limits = random.Random(tmp_path.name)

    def spool(path: Path, start: int) -> TailSpool:
        return TailSpool(path, start, limits.choice((0, 40, MEMORY_LIMIT)))

    monkeypatch.setattr(zipstream, "TailSpool", spool)
    return tmp_path


@pytest.mark.parametrize("base", sorted(BASES))
def test_mutated_zips_unpack_as_zipfile_reads_them_or_are_refused(
        root: Path, base: str) -> None:
    data = BASES[base]()
    rng = random.Random(f"zipstream-fuzz-{base}")
    assert check(root, data, rng, f"{base} unchanged")  # the start must be accepted
    accepted = 0
    for i in range(CASES_PER_BASE):
        accepted += check(root, mutate(rng, data), rng, f"{base} case {i}")
    # mostly refusals, but not only: the property must also have compared trees
    assert accepted >= CASES_PER_BASE // 20, accepted


@pytest.mark.parametrize("base", ["deflated", "other-methods", "descriptors",
                                  "zip64-comment"])
def test_cut_off_at_every_structural_boundary(root: Path, base: str) -> None:
    data = BASES[base]()
    rng = random.Random(f"zipstream-cut-{base}")
    cuts = {max(0, m + d) for m in _structure(data) for d in (-1, 0, 1, 4, 26, 30, 31, 46)}
    end = data.rindex(b"PK\x05\x06") + 22  # a zip cut in its comment is still one
    for cut in sorted(cuts):
        accepted = check(root, data[:cut], rng, f"{base} cut at {cut}")
        assert accepted == (cut >= end), cut


def test_a_fake_end_record_in_the_comment_is_refused(root: Path) -> None:
    # zipfile takes the last end record it finds: this one lists no entries, so the
    # streamed entries are in no central directory
    data = _zip(_zip64, comment=b"c PK\x05\x06" + bytes(18) + b"end")
    assert zipfile_tree(data) == {}
    assert not check(root, data, random.Random("fake-eocd"), "fake end record")


def test_cut_off_at_every_byte_of_a_small_zip(root: Path) -> None:
    data = _zip(lambda zf: (zf.writestr("a", b"A"), zf.writestr("d/", b""),
                            zf.writestr(_info("b.bz2", 0o644, zipfile.ZIP_BZIP2), b"B")))
    rng = random.Random("zipstream-cut-small")
    for cut in range(len(data)):
        assert not check(root, data[:cut], rng, f"cut at {cut}")


# -- crafted structures: each must keep the property, and be accepted or refused ---------


def _entry(name: bytes, payload: bytes, *, method: int = zipfile.ZIP_STORED,
           crc: int | None = None, usize: int | None = None) -> tuple[bytes, bytes]:
    """(local header + data, the central record without its offset) of one entry."""
    crc = zlib.crc32(payload) if crc is None else crc
    usize = len(payload) if usize is None else usize
    fields = (20, 0, method, 0, 0x21, crc, len(payload), usize, len(name))
    local = struct.pack("<4s5H3L2H", b"PK\x03\x04", *fields, 0) + name + payload
    central = struct.pack("<4s6H3L3H", b"PK\x01\x02", 20, *fields, 0, 0) + bytes(12)
    return local, central + name


def _raw_zip(entries: list[tuple[bytes, bytes]], *, extra_central: bytes = b"") -> bytes:
    """Locals, then their central records (+ ``extra_central``), then the end record."""
    body, cd = b"", b""
    for local, central in entries:
        cd += central[:42] + struct.pack("<L", len(body)) + central[46:]
        body += local
    cd += extra_central
    count = len(entries) + len(extra_central) // 47  # the crafted extras are 1-char names
    return body + cd + struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, count, count, len(cd),
                                   len(body), 0)


def _central_at(central: bytes, offset: int) -> bytes:
    return central[:42] + struct.pack("<L", offset) + central[46:]


def _patch(data: bytes, sig: bytes, at: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    for pos in _find_all(data, sig):
        struct.pack_into(fmt, out, pos + at, value)
    return bytes(out)


def _overlapping() -> bytes:  # two central records for one local header
    local, central = _entry(b"a", b"A")
    return _raw_zip([(local, central)], extra_central=_central_at(central, 0))


def _hidden() -> bytes:  # a central record pointing at a header inside another's data
    inner_local, inner_central = _entry(b"h", b"hidden")
    outer = _entry(b"o", inner_local)
    return _raw_zip([outer], extra_central=_central_at(inner_central, 30 + 1))


def _short_zip64() -> bytes:  # the first local header's zip64 field lacks csize
    data = bytearray(_zip(_zip64))
    struct.pack_into("<H", data, 30 + len("big1") + 2, 8)
    return bytes(data)


def _deflated(data: bytes, tail: bytes = b"") -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush() + tail


_STORED_A = _raw_zip([_entry(b"a", b"abc")])
_BOMB = make_zip({"zeros": bytes(4 << 20)})
CRAFTED: dict[str, tuple[Callable[[], bytes], bool]] = {
    "overlapping entries": (_overlapping, False),
    "hidden local header": (_hidden, False),
    "local sizes smaller than central": (
        lambda: _patch(_patch(_STORED_A, b"PK\x03\x04", 18, "<L", 2), b"PK\x03\x04", 22,
                       "<L", 2), False),
    "local usize larger than central": (
        lambda: _patch(_raw_zip([_entry(b"d", _deflated(b"x" * 50), method=8,
                                        crc=zlib.crc32(b"x" * 50), usize=50)]),
                       b"PK\x03\x04", 22, "<L", 99), False),
    "zip64 sizes without the extra field": (
        lambda: _patch(_patch(_STORED_A, b"PK\x03\x04", 18, "<L", 0xFFFFFFFF),
                       b"PK\x03\x04", 22, "<L", 0xFFFFFFFF), True),
    "zip64 extra field too short": (_short_zip64, True),
    "directory entry with data": (
        lambda: _zip(lambda zf: zf.writestr(_info("d/", stat.S_IFDIR | 0o755), b"xyz")), True),
    "deflate with trailing garbage": (
        lambda: _raw_zip([_entry(b"t", _deflated(b"y" * 99, b"junk"), method=8,
                                 crc=zlib.crc32(b"y" * 99), usize=99)]), True),
    "deflate ending early": (
        lambda: _raw_zip([_entry(b"e", _deflated(b"y" * 99)[:-3], method=8,
                                 crc=zlib.crc32(b"y" * 99), usize=99)]), False),
    "deflate bomb": (lambda: _BOMB, False),
    "deflate bomb with lying sizes": (
        lambda: _patch(_patch(_BOMB, b"PK\x03\x04", 22, "<L", 100), b"PK\x01\x02", 24,
                       "<L", 100), False),
    "central directory offset outside the file": (
        lambda: _patch(_STORED_A, b"PK\x05\x06", 16, "<L", 0xFFFFFF00), False),
    "central directory size into the data": (
        lambda: _patch(_STORED_A, b"PK\x05\x06", 12, "<L", 50), False),
    "total entries mismatch": (
        lambda: _patch(_patch(_STORED_A, b"PK\x05\x06", 8, "<H", 7), b"PK\x05\x06", 10,
                       "<H", 7), True),
    "cp437 name without the utf-8 flag": (lambda: _raw_zip([_entry(b"caf\x82", b"c")]), True),
    "empty name": (lambda: _raw_zip([_entry(b"", b"c")]), False),
    "drive letter name": (lambda: _raw_zip([_entry(b"C:x", b"c")]), False),
    "names differing only by case": (lambda: make_zip({"Read.me": b"1", "read.me": b"2"}),
                                     True),
    "a file and a directory of one name": (lambda: make_zip({"x": b"1", "x/": b""}), False),
    "utf-8 flag on an invalid central name only": (
        lambda: _patch(_raw_zip([_entry(b"\xff", b"c")]), b"PK\x01\x02", 8, "<H", 0x800),
        False),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_structures(root: Path, case: str) -> None:
    build, accepted = CRAFTED[case]
    data = build()
    for seed in range(4):  # a few chunkings of each
        assert check(root, data, random.Random(f"{case}-{seed}"), case) == accepted


# -- regressions -------------------------------------------------------------------------


def refusal(tmp_path: Path, data: bytes) -> StorageError:
    zip_path = tmp_path / "data.zip"
    zip_path.write_bytes(data)
    dest = tmp_path / "incoming"
    dest.mkdir()
    with pytest.raises(StorageError) as exc:
        unpack_zip(zip_path, dest, max_files=MAX_FILES, max_bytes=MAX_BYTES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.zip", "incoming"]
    return exc.value


def _set_flags(data: bytes, bits: int, sigs: tuple[bytes, ...]) -> bytes:
    out = bytearray(data)
    for sig, at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        if sig in sigs:
            for pos in _find_all(data, sig):
                out[pos + at:pos + at + 2] = struct.pack(
                    "<H", struct.unpack_from("<H", out, pos + at)[0] | bits)
    return bytes(out)


def test_a_streamed_name_flagged_utf8_that_is_not_is_a_bad_zip(tmp_path: Path) -> None:
    data = _set_flags(make_zip({"ab.txt": b"x"}), 0x800, (b"PK\x03\x04", b"PK\x01\x02"))
    err = refusal(tmp_path, data.replace(b"ab.txt", b"\xffb.txt"))
    assert (str(err), err.status) == (
        "data_file: Bad zip file (an entry name is not valid UTF-8)", 400)


@pytest.mark.parametrize(("method", "at"), [
    (zipfile.ZIP_BZIP2, 10),  # bz2 reports bad data as an OSError without errno
    (zipfile.ZIP_LZMA, 8),  # lzma.LZMAError for the data
    (zipfile.ZIP_LZMA, 4),  # and for the properties in front of it
])
def test_corrupt_bzip2_or_lzma_data_is_corrupt(tmp_path: Path, method: int, at: int) -> None:
    data = bytearray(_zip(lambda zf: zf.writestr(_info("a.txt", 0o644, method), b"hi " * 99)))
    pos = data.index(b"a.txt") + len("a.txt") + at  # into the local entry's data
    data[pos:pos + 8] = b"\xff" * 8
    err = refusal(tmp_path, bytes(data))
    assert (str(err), err.status) == ("data_file: Bad zip file (entry 'a.txt' is corrupt)", 400)


def test_an_entry_needing_a_newer_zip_version_is_a_bad_zip(tmp_path: Path) -> None:
    data = bytearray(make_zip({"a.txt": b"x"}))
    struct.pack_into("<H", data, data.index(b"PK\x01\x02") + 6, 99)  # 'version needed' 9.9
    err = refusal(tmp_path, bytes(data))
    assert (str(err), err.status) == ("data_file: Bad zip file (needs a newer zip version)", 400)


def test_a_nul_in_a_spooled_name_is_refused(tmp_path: Path) -> None:
    # zipfile's ZipInfo.filename stops at the NUL ('a' twice here); the stored name counts
    data = _zip(lambda zf: (zf.writestr(_info("s.bz2", 0o644, zipfile.ZIP_BZIP2), b"s"),
                            zf.writestr("a_one", b"1"), zf.writestr("a_two", b"2")))
    err = refusal(tmp_path, data.replace(b"a_", b"a\0"))
    assert (str(err), err.status) == (
        "data_file: entry 'a\\x00one' has a NUL character in its name", 400)


def test_a_later_duplicate_without_the_exec_bit_wins(tmp_path: Path) -> None:
    # the streamed file kept the exec bit of an earlier entry of the same name
    data = _zip(lambda zf: (zf.writestr(_info("run1", stat.S_IFREG | 0o755), b"old"),
                            zf.writestr(_info("run2", stat.S_IFREG | 0o644), b"new")))
    dest = tmp_path / "incoming"
    dest.mkdir()
    (tmp_path / "data.zip").write_bytes(data.replace(b"run2", b"run1"))
    unpack_zip(tmp_path / "data.zip", dest, max_files=MAX_FILES, max_bytes=MAX_BYTES)
    assert (dest / "run1").read_bytes() == b"new"
    assert stat.S_IMODE((dest / "run1").stat().st_mode) == 0o644


@pytest.mark.parametrize("bits", [0x20, 0x40])  # patched data, strong encryption
def test_flags_zipfile_cannot_read_are_refused_when_streamed(tmp_path: Path, bits: int) -> None:
    data = _set_flags(make_zip({"a.txt": b"x"}), bits, (b"PK\x03\x04", b"PK\x01\x02"))
    err = refusal(tmp_path, data)
    assert (str(err), err.status) == ("data_file: entry 'a.txt' cannot be decompressed", 400)
