"""A job's outputs: listing them and streaming them as a zip.

Outputs are written by plugins, i.e. untrusted code: symlinks are never followed
or reported (they could point at other users' data), and ``*.chrislink`` files are
never reported (pfcon#175: in fslink mode they are deleted as they are met).
"""

from __future__ import annotations

import os
import stat
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

from agent.chrislinks import iter_files

__all__ = ["ZIP64_THRESHOLD", "iter_output_files", "list_outputs", "zip_chunks"]

# Entries at least this big get zip64 headers up front: the size is only known from
# stat() and a file that keeps growing past 4 GiB must not break the stream.
ZIP64_THRESHOLD = 1 << 30
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


def iter_output_files(
    root: Path, *, skip_chrislinks: bool = True, delete_chrislinks: bool = False
) -> Iterator[tuple[str, Path]]:
    """Yield ``(relative posix path, absolute path)`` of the regular files under root.

    Order is ``os.walk`` top-down (a directory's files, then each subdirectory in
    directory order; unsorted, like pfcon). Symlinks are neither yielded nor
    descended into; unreadable directories are skipped, and a missing root yields
    nothing. ``*.chrislink`` entries are skipped unless ``skip_chrislinks`` is false;
    with ``delete_chrislinks`` every non-directory ``*.chrislink`` entry (symlinks
    too) is unlinked from disk as it is met.
    """
    return iter_files(root, skip_links=skip_chrislinks, delete_links=delete_chrislinks)


def list_outputs(root: Path, *, delete_chrislinks: bool, skip_chrislinks: bool = True) -> list[str]:
    """Return the relative paths of the output files (the JSON ``rel_file_paths``).

    ``skip_chrislinks=False`` is for ``filesystem`` mode, which does not filter them.
    """
    return [
        rel
        for rel, _ in iter_output_files(
            root, skip_chrislinks=skip_chrislinks, delete_chrislinks=delete_chrislinks
        )
    ]


class _Drain:
    """Write-only, unseekable sink: zipfile then writes data descriptors, never seeks."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0

    def write(self, data: bytes) -> int:
        if data:
            self.parts.append(bytes(data))
            self.size += len(data)
        return len(data)

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        data = b"".join(self.parts)
        self.parts.clear()
        self.size = 0
        return data


def _zip_name(rel: str) -> str:
    """``rel`` as a zip can hold it: bytes that were not UTF-8 (kept by the file system
    API as surrogate escapes, which zipfile cannot encode) become U+FFFD."""
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        return rel.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return rel


def _zip_date(mtime: float) -> tuple[int, int, int, int, int, int]:
    """Clamp to the zip format's 1980..2107 range (containers often have mtime 0)."""
    date = time.localtime(mtime)[:6]
    if date[0] < 1980:
        return (1980, 1, 1, 0, 0, 0)
    if date[0] > 2107:
        return (2107, 12, 31, 23, 59, 58)
    return date  # type: ignore[return-value]


def zip_chunks(
    root: Path, chunk_size: int = 1 << 20, *, compresslevel: int | None = None
) -> Iterator[bytes]:
    """Stream a deflate zip of the output files under root, in chunks of ~chunk_size.

    One entry per file from :func:`iter_output_files` (arcname = relative path, no
    directory entries, symlinks and ``*.chrislink`` skipped); an empty or missing
    root gives a valid empty zip. Nothing is buffered beyond about two chunks plus
    the central directory (~100 bytes per entry), so multi-GiB outputs are fine.
    Files that vanish or turn into non-regular files before being opened are skipped.
    Blocking: run it in a thread.
    """
    sink = _Drain()
    with zipfile.ZipFile(
        sink, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=compresslevel
    ) as zf:
        for rel, path in iter_output_files(root):
            try:
                fd = os.open(path, _OPEN_FLAGS)
            except OSError:
                continue
            with os.fdopen(fd, "rb") as src:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    continue
                info = zipfile.ZipInfo(_zip_name(rel), _zip_date(st.st_mtime))
                info.compress_type = zipfile.ZIP_DEFLATED
                info._compresslevel = compresslevel  # ZipFile.open ignores the archive's
                info.external_attr = (stat.S_IFREG | stat.S_IMODE(st.st_mode)) << 16
                info.file_size = st.st_size
                with zf.open(info, "w", force_zip64=st.st_size >= ZIP64_THRESHOLD) as dst:
                    while data := src.read(chunk_size):
                        dst.write(data)
                        if sink.size >= chunk_size:
                            yield sink.take()
            if sink.size >= chunk_size:
                yield sink.take()
    if sink.size:
        yield sink.take()
