"""Safe unpacking of the ``data_file`` zip uploaded with a zipfile-mode plugin job.

The zip comes from a client, so every entry is checked before anything is
written: no entry may land outside the destination, links and special files are
refused, and both the declared and the actually decompressed sizes are capped
(a zip bomb stops at the limit instead of filling the storeBase).
"""

from __future__ import annotations

import errno
import os
import stat
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from controller.storage.paths import StorageError

__all__ = ["CHUNK_SIZE", "unpack_zip"]

CHUNK_SIZE = 1 << 20
FIELD = "data_file"
LINK_SUFFIX = ".chrislink"

_MIB = 1 << 20
_SUPPORTED_METHODS = frozenset(
    {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
)
_FLAG_ENCRYPTED = 0x1
# errors that mean "this entry cannot be created here" rather than a server fault
_CLIENT_ERRNOS = {errno.ENAMETOOLONG, errno.EINVAL, errno.EILSEQ}
_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


def _bad_zip(detail: str = "") -> StorageError:
    return StorageError(f"{FIELD}: Bad zip file{detail}", field=FIELD, status=400)


def _refuse(name: str, why: str, status: int = 400) -> StorageError:
    return StorageError(f"{FIELD}: entry {name!r} {why}", field=FIELD, status=status)


@dataclass(frozen=True)
class _Entry:
    info: zipfile.ZipInfo
    parts: tuple[str, ...]
    is_dir: bool
    owner_exec: bool


def _mib(n: int) -> str:
    return f"{n / _MIB:g}"


def _check_entry(info: zipfile.ZipInfo) -> _Entry | None:
    """Validate one central-directory entry; None for a harmless no-op (``./``)."""
    name = info.filename
    if info.flag_bits & _FLAG_ENCRYPTED:
        raise _refuse(name, "is encrypted")
    if info.compress_type not in _SUPPORTED_METHODS:
        raise _refuse(name, f"uses unsupported compression method {info.compress_type}")
    mode = info.external_attr >> 16
    fmt = stat.S_IFMT(mode)
    if stat.S_ISLNK(mode):
        raise _refuse(name, "is a symbolic link")
    if fmt and fmt not in (stat.S_IFREG, stat.S_IFDIR):
        raise _refuse(name, "is a special file")
    # Windows tools sometimes write backslashes; treat them as separators so that
    # '..\\x' cannot slip past the checks below
    norm = name.replace("\\", "/")
    if norm.startswith("/") or (len(norm) >= 2 and norm[1] == ":" and norm[0].isalpha()):
        raise _refuse(name, "has an absolute path")
    raw_parts = norm.split("/")
    if ".." in raw_parts:
        raise _refuse(name, "contains '..'")
    parts = tuple(p for p in raw_parts if p not in ("", "."))
    is_dir = norm.endswith("/") or stat.S_ISDIR(mode)
    if not parts:
        if is_dir:
            return None
        raise _refuse(name, "has an empty name")
    return _Entry(info, parts, is_dir, bool(mode & stat.S_IXUSR) and not is_dir)


def _plan(infos: list[zipfile.ZipInfo], max_files: int, max_bytes: int) -> list[_Entry]:
    """Check every entry and the declared totals before anything touches the disk."""
    if len(infos) > max_files:
        raise StorageError(f"{FIELD}: more than {max_files} entries", field=FIELD, status=413)
    entries = [e for e in map(_check_entry, infos) if e is not None]
    declared = sum(e.info.file_size for e in entries if not e.is_dir)
    if declared > max_bytes:
        raise _too_big(max_bytes)
    files: dict[tuple[str, ...], str] = {}
    dirs: dict[tuple[str, ...], str] = {}
    for e in entries:
        (dirs if e.is_dir else files)[e.parts] = e.info.filename
        for i in range(1, len(e.parts)):
            dirs.setdefault(e.parts[:i], e.info.filename)
    for parts in files.keys() & dirs.keys():
        raise _refuse(files[parts], "is both a file and a directory")
    return entries


def _too_big(max_bytes: int) -> StorageError:
    return StorageError(
        f"{FIELD}: uncompressed size over {_mib(max_bytes)} MiB", field=FIELD, status=413
    )


def _mkdirs(dest: Path, parts: tuple[str, ...]) -> Path:
    """Create dest/parts... (0755 regardless of umask: the plugin user must read it)."""
    path = dest
    for part in parts:
        path = path / part
        try:
            os.mkdir(path, 0o755)
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                raise _refuse("/".join(parts), "conflicts with an existing file") from None
            continue
        os.chmod(path, 0o755)
    return path


def _extract_file(
    zf: zipfile.ZipFile, entry: _Entry, target: Path, budget: int, chunk_size: int
) -> int:
    """Stream one entry to ``target``; return the bytes written, never more than budget."""
    mode = 0o755 if entry.owner_exec else 0o644
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    written = 0
    with zf.open(entry.info) as src:
        fd = os.open(target, flags, 0o600)
        with os.fdopen(fd, "wb") as out:
            os.fchmod(fd, mode)
            while chunk := src.read(chunk_size):
                written += len(chunk)
                if written > budget:
                    raise _RanOver
                out.write(chunk)
    return written


class _RanOver(Exception):
    """The decompressed bytes exceeded the budget (declared sizes lied)."""


def unpack_zip(zip_path: Path, dest: Path, *, max_files: int, max_bytes: int) -> int:
    """Unpack the client's zip at ``zip_path`` into the existing empty dir ``dest``.

    Returns the number of regular files written, not counting ``*.chrislink``
    files (pfcon's ``nfiles``). Raises :class:`StorageError` (field ``data_file``)
    for a bad or hostile zip: 400 for corrupt zips and refused entries, 413 over
    ``max_files`` entries or ``max_bytes`` uncompressed bytes (checked from the
    central directory first and again while decompressing), 507 when the disk is
    full. On error, ``dest`` may hold partial content: the caller must remove it.
    """
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError):
        raise _bad_zip() from None
    with zf:
        entries = _plan(zf.infolist(), max_files, max_bytes)
        budget = max_bytes
        written: set[tuple[str, ...]] = set()
        for entry in entries:
            name = entry.info.filename
            try:
                if entry.is_dir:
                    _mkdirs(dest, entry.parts)
                    continue
                parent = _mkdirs(dest, entry.parts[:-1])
                budget -= _extract_file(zf, entry, parent / entry.parts[-1], budget, CHUNK_SIZE)
            except _RanOver:
                raise _too_big(max_bytes) from None
            except (zipfile.BadZipFile, EOFError, zlib.error, ValueError):
                raise _bad_zip(f" (entry {name!r} is corrupt)") from None
            except (NotImplementedError, RuntimeError):
                raise _refuse(name, "cannot be decompressed") from None
            except OSError as exc:
                if exc.errno in _SPACE_ERRNOS:
                    raise StorageError(
                        f"{FIELD}: not enough storage space to unpack", field=FIELD, status=507
                    ) from None
                if exc.errno in _CLIENT_ERRNOS or exc.errno == errno.ELOOP:
                    raise _refuse(name, "cannot be created on this storage") from None
                raise
            written.add(entry.parts)
    return sum(1 for parts in written if not parts[-1].endswith(LINK_SUFFIX))
