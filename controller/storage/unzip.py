"""The rules for the ``data_file`` zip of a zipfile-mode plugin job, and the
extraction of entries from a file.

The zip comes from a client: no entry may land outside the destination, links
and special files are refused, and both the declared and the actually
decompressed sizes are capped (a zip bomb stops at the limit instead of filling
the storeBase).  :mod:`controller.storage.zipstream` applies these rules while the
upload arrives and uses :func:`extract_rest` for entries it could not stream.
"""

from __future__ import annotations

import bz2
import copy
import errno
import lzma
import os
import stat
import struct
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from controller.storage.paths import StorageError

__all__ = ["CHUNK_SIZE", "Entry", "check_name", "extract_rest", "plan"]

CHUNK_SIZE = 1 << 20
FIELD = "data_file"
LINK_SUFFIX = ".chrislink"

_MIB = 1 << 20
_SUPPORTED_METHODS = frozenset(
    {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
)
_FLAG_ENCRYPTED = 0x1
_FLAG_UNREADABLE = 0x60  # patched data, strong encryption: zipfile cannot read these
# errors that mean "this entry cannot be created here" rather than a server fault
_CLIENT_ERRNOS = {errno.ENAMETOOLONG, errno.EINVAL, errno.EILSEQ}
_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


def bad_zip(detail: str = "") -> StorageError:
    return StorageError(f"{FIELD}: Bad zip file{detail}", field=FIELD, status=400)


def _refuse(name: str, why: str, status: int = 400) -> StorageError:
    return StorageError(f"{FIELD}: entry {name!r} {why}", field=FIELD, status=status)


def corrupt(name: str) -> StorageError:
    return bad_zip(f" (entry {name!r} is corrupt)")


def conflict(name: str) -> StorageError:
    return _refuse(name, "is both a file and a directory")


def too_many(max_files: int) -> StorageError:
    return StorageError(f"{FIELD}: more than {max_files} entries", field=FIELD, status=413)


def too_big(max_bytes: int) -> StorageError:
    return StorageError(
        f"{FIELD}: uncompressed size over {_mib(max_bytes)} MiB", field=FIELD, status=413
    )


@dataclass(frozen=True)
class Entry:
    info: zipfile.ZipInfo
    parts: tuple[str, ...]
    is_dir: bool
    owner_exec: bool


def _mib(n: int) -> str:
    return f"{n / _MIB:g}"


def check_name(name: str) -> tuple[tuple[str, ...], bool] | None:
    """(path parts, is a directory) of a safe entry name; None for a harmless no-op
    (``./``); raises for names that escape the destination."""
    # Windows tools sometimes write backslashes; treat them as separators so that
    # '..\\x' cannot slip past the checks below
    if "\0" in name:
        raise _refuse(name, "has a NUL character in its name")
    norm = name.replace("\\", "/")
    if norm.startswith("/") or (len(norm) >= 2 and norm[1] == ":" and norm[0].isalpha()):
        raise _refuse(name, "has an absolute path")
    raw_parts = norm.split("/")
    if ".." in raw_parts:
        raise _refuse(name, "contains '..'")
    parts = tuple(p for p in raw_parts if p not in ("", "."))
    is_dir = norm.endswith("/")
    if not parts:
        if is_dir:
            return None
        raise _refuse(name, "has an empty name")
    return parts, is_dir


def _check_entry(info: zipfile.ZipInfo) -> Entry | None:
    """Validate one central-directory entry; None for a harmless no-op (``./``)."""
    # the name as stored: zipfile's ``filename`` drops everything from a NUL on,
    # and the streamed local header is checked by this one
    name = info.orig_filename
    if info.flag_bits & _FLAG_ENCRYPTED:
        raise _refuse(name, "is encrypted")
    if info.flag_bits & _FLAG_UNREADABLE:
        raise _refuse(name, "cannot be decompressed")
    if info.compress_type not in _SUPPORTED_METHODS:
        raise _refuse(name, f"uses unsupported compression method {info.compress_type}")
    mode = info.external_attr >> 16
    fmt = stat.S_IFMT(mode)
    if stat.S_ISLNK(mode):
        raise _refuse(name, "is a symbolic link")
    if fmt and fmt not in (stat.S_IFREG, stat.S_IFDIR):
        raise _refuse(name, "is a special file")
    checked = check_name(name)
    if checked is None:
        if stat.S_ISDIR(mode) or name.endswith("/"):
            return None
        raise _refuse(name, "has an empty name")
    parts, is_dir = checked
    is_dir = is_dir or stat.S_ISDIR(mode)
    return Entry(info, parts, is_dir, bool(mode & stat.S_IXUSR) and not is_dir)


def plan(infos: list[zipfile.ZipInfo], max_files: int, max_bytes: int) -> list[Entry]:
    """Check every central-directory entry and the declared totals."""
    if len(infos) > max_files:
        raise too_many(max_files)
    entries = [e for e in map(_check_entry, infos) if e is not None]
    declared = sum(e.info.file_size for e in entries if not e.is_dir)
    if declared > max_bytes:
        raise too_big(max_bytes)
    files: dict[tuple[str, ...], str] = {}
    dirs: dict[tuple[str, ...], str] = {}
    for e in entries:
        (dirs if e.is_dir else files)[e.parts] = e.info.filename
        for i in range(1, len(e.parts)):
            dirs.setdefault(e.parts[:i], e.info.filename)
    for parts in files.keys() & dirs.keys():
        raise conflict(files[parts])
    return entries


def mkdirs(dest: Path, parts: tuple[str, ...]) -> Path:
    """Create dest/parts... (0755 regardless of umask: the plugin user must read it)."""
    path = dest
    for part in parts:
        path = path / part
        try:
            os.mkdir(path, 0o755)
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                raise conflict("/".join(parts[:parts.index(part) + 1])) from None
            continue
        os.chmod(path, 0o755)
    return path


@contextmanager
def os_errors(name: str) -> Iterator[None]:
    """Turn the OS errors a client's entry can cause into its answer (507, 400)."""
    try:
        yield
    except OSError as exc:
        if exc.errno in _SPACE_ERRNOS:
            raise StorageError(
                f"{FIELD}: not enough storage space to unpack", field=FIELD, status=507
            ) from None
        if exc.errno in _CLIENT_ERRNOS or exc.errno == errno.ELOOP:
            raise _refuse(name, "cannot be created on this storage") from None
        raise


def create_file(path: Path, name: str, mode: int) -> int:
    """Open ``path`` for writing an entry (never through a link), with ``mode``
    whatever the umask; a directory in the way is the entry's conflict."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
    except IsADirectoryError:
        raise conflict(name) from None
    os.fchmod(fd, mode)
    return fd


def _extract_file(
    zf: zipfile.ZipFile, entry: Entry, target: Path, budget: int, chunk_size: int
) -> int:
    """Stream one entry to ``target``; return the bytes written, never more than budget."""
    written = 0
    fd = create_file(target, entry.info.filename, 0o755 if entry.owner_exec else 0o644)
    with os.fdopen(fd, "wb") as out:
        for chunk in _chunks(zf, entry.info, chunk_size):
            written += len(chunk)
            if written > budget:
                raise _RanOver
            out.write(chunk)
    return written


def _chunks(zf: zipfile.ZipFile, info: zipfile.ZipInfo, size: int) -> Iterator[bytes]:
    """The entry's bytes, at most ``size`` at a time, CRC checked.

    zipfile inflates deflated data in bounded steps, but hands a whole read of
    bzip2 or LZMA data to the decompressor at once: a few hundred bytes of it can
    expand to gigabytes in memory.  Those two are decompressed here, from the
    entry's raw bytes, with ``max_length``.
    """
    if info.compress_type not in (zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA):
        with zf.open(info) as src:
            while chunk := src.read(size):
                yield chunk
        return
    raw = copy.copy(info)  # the same bytes, read as stored and unchecked
    raw.compress_type, raw.file_size = zipfile.ZIP_STORED, info.compress_size
    del raw.CRC
    crc = 0
    with zf.open(raw) as src:
        decompressor = _decompressor(info.compress_type, src)
        data = b""
        while not decompressor.eof:
            if decompressor.needs_input:
                data = src.read(_RAW_READ)
                if not data:
                    raise EOFError("the entry's compressed data ends early")
            chunk = decompressor.decompress(data, max_length=size)
            data = b""
            if chunk:
                crc = zlib.crc32(chunk, crc)
                yield chunk
    if crc != info.CRC:
        raise zipfile.BadZipFile(f"bad CRC-32 for {info.filename!r}")


_RAW_READ = 64 << 10


def _decompressor(method: int, src: BinaryIO) -> bz2.BZ2Decompressor | lzma.LZMADecompressor:
    if method == zipfile.ZIP_BZIP2:
        return bz2.BZ2Decompressor()
    # zip's LZMA: a version (2 bytes), the properties' size (2), the properties, then
    # a raw LZMA1 stream (as zipfile reads it)
    head = src.read(4)
    if len(head) < 4:
        raise EOFError("the entry's LZMA header ends early")
    (size,) = struct.unpack("<H", head[2:4])
    props = src.read(size)
    if len(props) < size:
        raise EOFError("the entry's LZMA header ends early")
    return lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=[
        lzma._decode_filter_properties(lzma.FILTER_LZMA1, props)])  # as zipfile does


class _RanOver(Exception):
    """The decompressed bytes exceeded the budget (declared sizes lied)."""


def extract_rest(zf: zipfile.ZipFile, entries: list[Entry], dest: Path, budget: int,
                 chunk_size: int = CHUNK_SIZE) -> None:
    """Extract ``entries`` (already checked by :func:`plan`) from ``zf`` into
    ``dest``, at most ``budget`` decompressed bytes in all (413 past it)."""
    max_bytes = budget
    for entry in entries:
        name = entry.info.filename
        with os_errors(name):
            try:
                if entry.is_dir:
                    mkdirs(dest, entry.parts)
                    continue
                parent = mkdirs(dest, entry.parts[:-1])
                budget -= _extract_file(zf, entry, parent / entry.parts[-1], budget, chunk_size)
            except _RanOver:
                raise too_big(max_bytes) from None
            except (zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError, ValueError):
                raise corrupt(name) from None
            except OSError as exc:
                if exc.errno is not None:
                    raise
                raise corrupt(name) from None  # bz2's "Invalid data stream"
            except (NotImplementedError, RuntimeError):
                raise _refuse(name, "cannot be decompressed") from None
