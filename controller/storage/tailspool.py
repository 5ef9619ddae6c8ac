"""The part of an upload that could not be unpacked as it arrived.

For a well-formed zip that is only the central directory, a few hundred bytes:
it stays in memory.  Past ``memory_limit`` (an upload that fell back to spooling
whole entries) it moves to a file, written at its true offsets so the file is
sparse: the bytes before the spooled part read as zeros and take no space.
Either way :meth:`TailSpool.reader` gives :mod:`zipfile` a seekable view of the
whole upload, whose central directory offsets then point where they should.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import BinaryIO, cast

__all__ = ["TailSpool"]

MEMORY_LIMIT = 1 << 20


class TailSpool:
    """The bytes of an upload from absolute offset ``start`` on, appended in order."""

    def __init__(self, path: Path, start: int, memory_limit: int = MEMORY_LIMIT) -> None:
        self.path, self.start, self.memory_limit = path, start, memory_limit
        self._data = bytearray()
        self._fd: int | None = None
        self.in_file = False  # moved to ``path`` (which the owner removes)
        self._size = start  # absolute end of what was appended

    def append(self, data: bytes | bytearray | memoryview) -> None:
        if self._fd is None and len(self._data) + len(data) <= self.memory_limit:
            self._data += data
        else:
            if self._fd is None:
                self._fd = _create(self.path)
                self.in_file = True
                self._pwrite(memoryview(self._data), self.start)
                self._data = bytearray()
            self._pwrite(memoryview(data), self._size)
        self._size += len(data)

    def _pwrite(self, view: memoryview, at: int) -> None:
        assert self._fd is not None
        while view:
            n = os.pwrite(self._fd, view, at)
            view, at = view[n:], at + n

    def reader(self) -> BinaryIO:
        """The whole upload as a read-only file (zeros before ``start``)."""
        if self._fd is not None:
            self.close()
            return open(self.path, "rb")  # the caller closes it
        return cast(BinaryIO, _SparseBytes(self.start, bytes(self._data)))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _create(path: Path) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    try:
        return os.open(path, flags, 0o600)
    except FileNotFoundError:  # the spool dir was removed under a running controller
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, flags, 0o600)


class _SparseBytes(io.RawIOBase):
    """``start`` zero bytes followed by ``data``, without holding the zeros."""

    def __init__(self, start: int, data: bytes) -> None:
        super().__init__()
        self._start, self._data = start, data
        self._size = start + len(data)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise OSError("negative seek position")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self._size - self._pos))
        zeros = max(0, min(n, self._start - self._pos))
        view[:zeros] = bytes(zeros)
        if n > zeros:
            begin = self._pos + zeros - self._start
            view[zeros:n] = self._data[begin:begin + n - zeros]
        self._pos += n
        return n

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = self._size - self._pos
        buffer = bytearray(max(0, size))
        n = self.readinto(buffer)
        return bytes(buffer[:n])
