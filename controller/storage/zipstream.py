"""Unpacking the uploaded zip while it arrives, in one pass.

A zip describes each entry twice: in a local header just before the entry's data,
and in the central directory at the end.  The local headers are enough to write
the data as it arrives, so a well-formed upload is written once, straight into
the staging directory, instead of being spooled whole and then unpacked in a
second pass (which doubles the bytes written and halves the throughput).

The central directory stays the authority.  When the upload ends, it is read
from a sparse spool that holds only the tail of the upload; every entry is
checked by the rules of :mod:`controller.storage.unzip`, and each must match
what was streamed at its offset (name, method, CRC, sizes).  Modes (exec bit,
links, special files) exist only there, so they are applied or refused then.

An entry that cannot be streamed safely (stored data with a trailing data
descriptor, encryption, methods other than stored and deflated, bytes before
the first header) sends the rest of the upload to the spool at its true offsets;
those entries are extracted from it at the end, so every zip that :mod:`zipfile`
reads still works, only without the single pass.

Nothing here is visible to a job: the caller unpacks into a private staging
directory, renames it into place only after :meth:`ZipStreamUnpacker.finish`,
and removes it on any error.
"""

from __future__ import annotations

import os
import struct
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from controller.storage import unzip
from controller.storage.tailspool import TailSpool

__all__ = ["ZipStreamUnpacker", "unpack_zip"]

_LOCAL_SIG = b"PK\x03\x04"
_LOCAL = struct.Struct("<4s5H3L2H")  # sig, versions, flags, method, time, date, crc, sizes, lens
_FLAG_ENCRYPTED = 0x1
_FLAG_DESCRIPTOR = 0x8
_FLAG_UTF8 = 0x800
_ZIP64_ID = 0x0001
_U32_MAX = 0xFFFFFFFF
_STREAMABLE = frozenset({zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED})
_OUT_CHUNK = 1 << 20  # bound on one inflate step's output (a bomb expands ~1000x)


@dataclass(frozen=True)
class _Streamed:
    """What the local header promised for an entry that was written as it arrived."""

    name: str
    method: int
    crc: int
    csize: int
    usize: int
    parts: tuple[str, ...]
    is_dir: bool = False

    def matches(self, info: zipfile.ZipInfo) -> bool:
        return (self.name, self.method, self.crc, self.csize, self.usize) == (
            info.orig_filename, info.compress_type, info.CRC, info.compress_size,
            info.file_size)


class _Entry:
    """The entry whose data is arriving: its file, running CRC and counters."""

    def __init__(self, meta: _Streamed, offset: int, fd: int | None) -> None:
        self.meta, self.offset, self.fd = meta, offset, fd
        self.left = meta.csize  # compressed bytes still to come
        self.crc = 0
        self.size = 0  # uncompressed bytes written
        self.inflater = (zlib.decompressobj(-zlib.MAX_WBITS)
                         if meta.method == zipfile.ZIP_DEFLATED else None)


class ZipStreamUnpacker:
    """Feed it the upload's bytes in order (blocking calls: run them off the loop),
    then call :meth:`finish`.  Any :class:`StorageError` (400/413/507 as in
    :func:`controller.storage.unzip.extract_rest`) leaves partial content in
    ``dest`` for the caller to remove; :meth:`close` releases open files."""

    def __init__(self, dest: Path, spool: Path, *, max_files: int, max_bytes: int) -> None:
        self.dest, self.spool = dest, spool
        self.max_files, self.max_bytes = max_files, max_bytes
        self._offset = 0  # absolute offset of the next byte fed
        self._head = bytearray()  # a local header being assembled
        self._head_at = 0
        self._entry: _Entry | None = None
        self._spool: TailSpool | None = None  # from its start on, bytes go to the spool
        self._streamed: dict[int, _Streamed] = {}
        self.has_links = False  # set by finish(): a ``*.chrislink`` file was unpacked
        self._entries = 0
        self._declared = 0
        self._written = 0

    # ------------------------------------------------------------------ feeding

    def feed(self, chunks: Iterable[bytes]) -> None:
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                if self._spool is not None:
                    self._to_spool(view)
                    break
                if self._entry is not None:
                    view = self._entry_data(self._entry, view)
                else:
                    view = self._header(view)

    def _header(self, view: memoryview) -> memoryview:
        head = self._head
        if not head:
            self._head_at = self._offset
        need = 30 if len(head) < 30 else self._header_size()
        while len(head) < need and view:
            take = min(need - len(head), len(view))
            head += view[:take]
            view = view[take:]
            self._offset += take
            if len(head) >= 4 and head[:4] != _LOCAL_SIG:
                self._start_spool()  # the central directory, or something zipfile may know
                return view
            if len(head) == 30:
                need = self._header_size()
        if len(head) == need:
            self._open_entry()
        return view

    def _header_size(self) -> int:
        nlen, elen = struct.unpack_from("<2H", self._head, 26)
        return 30 + nlen + elen

    def _open_entry(self) -> None:
        head, at = self._head, self._head_at
        _sig, _v, flags, method, _t, _d, crc, csize, usize, nlen, _e = _LOCAL.unpack_from(head)
        sizes = (usize, csize)
        if _U32_MAX in sizes:
            sizes = _zip64_sizes(bytes(head[30 + nlen:]), usize, csize)
        if (sizes is None or flags & (_FLAG_ENCRYPTED | _FLAG_DESCRIPTOR)
                or method not in _STREAMABLE):
            self._start_spool()  # zipfile extracts this entry and the rest at the end
            return
        usize, csize = sizes
        raw_name = bytes(head[30:30 + nlen])
        self._head = bytearray()
        try:
            name = raw_name.decode("utf-8" if flags & _FLAG_UTF8 else "cp437")
        except UnicodeDecodeError:  # flagged UTF-8, but is not
            raise unzip.bad_zip(" (an entry name is not valid UTF-8)") from None
        checked = unzip.check_name(name)
        self._entries += 1
        if self._entries > self.max_files:
            raise unzip.too_many(self.max_files)
        if checked is None:  # './': nothing to write; the central directory check skips it
            self._begin(_Entry(_Streamed(name, method, crc, csize, usize, ()), at, None))
            return
        parts, is_dir = checked
        if method == zipfile.ZIP_STORED and csize != usize:
            raise unzip.corrupt(name)
        if not is_dir:
            self._declared += usize
            if self._declared > self.max_bytes:
                raise unzip.too_big(self.max_bytes)
        meta = _Streamed(name, method, crc, csize, usize, parts, is_dir)
        with unzip.os_errors(name):
            if is_dir:
                unzip.mkdirs(self.dest, parts)
                fd = None
            else:
                parent = unzip.mkdirs(self.dest, parts[:-1])
                fd = unzip.create_file(parent / parts[-1], name, 0o644)  # exec bit: at the end
        self._begin(_Entry(meta, at, fd))

    def _begin(self, entry: _Entry) -> None:
        self._entry = entry
        if entry.left == 0:
            self._close_entry(entry)

    def _entry_data(self, entry: _Entry, view: memoryview) -> memoryview:
        n = min(len(view), entry.left)
        data, view = view[:n], view[n:]
        entry.left -= n
        self._offset += n
        if entry.fd is not None:
            if entry.inflater is None:
                self._write(entry, data)
            else:
                self._inflate(entry, data)
        if entry.left == 0:
            self._close_entry(entry)
        return view

    def _inflate(self, entry: _Entry, data: memoryview) -> None:
        inflater = entry.inflater
        assert inflater is not None
        pending: bytes | memoryview = data
        try:
            while True:
                out = inflater.decompress(pending, _OUT_CHUNK)
                if out:
                    self._write(entry, out)
                pending = inflater.unconsumed_tail
                if not pending and len(out) < _OUT_CHUNK:
                    return
        except zlib.error:
            raise unzip.corrupt(entry.meta.name) from None

    def _write(self, entry: _Entry, data: bytes | memoryview) -> None:
        entry.size += len(data)
        if entry.size > entry.meta.usize:
            raise unzip.corrupt(entry.meta.name)  # more than the header declared
        self._written += len(data)
        if self._written > self.max_bytes:
            raise unzip.too_big(self.max_bytes)
        entry.crc = zlib.crc32(data, entry.crc)
        assert entry.fd is not None
        with unzip.os_errors(entry.meta.name):
            view = memoryview(data)
            while view:
                view = view[os.write(entry.fd, view):]

    def _close_entry(self, entry: _Entry) -> None:
        self._entry = None
        meta = entry.meta
        if entry.fd is not None:
            os.close(entry.fd)
            entry.fd = None
            inflated = entry.inflater is None or entry.inflater.eof
            if not inflated or entry.size != meta.usize or entry.crc != meta.crc:
                raise unzip.corrupt(meta.name)
        if meta.parts:
            self._streamed[entry.offset] = meta

    # ------------------------------------------------------------------ the spool

    def _start_spool(self) -> None:
        """Send everything from the header being read on to the spool."""
        head, self._head = self._head, bytearray()
        self._spool = TailSpool(self.spool, self._head_at)
        if head:
            self._append(bytes(head))

    def _to_spool(self, view: memoryview) -> None:
        self._append(view)
        self._offset += len(view)

    def _append(self, data: bytes | memoryview) -> None:
        assert self._spool is not None
        with unzip.os_errors("(spool)"):
            self._spool.append(data)

    # ------------------------------------------------------------------ the end

    def finish(self) -> int:
        """Check everything against the central directory and extract what was
        spooled; returns the number of regular files (pfcon's ``nfiles``, without
        ``*.chrislink`` files)."""
        spool = self._spool
        if self._entry is not None or self._head or spool is None:
            raise unzip.bad_zip()  # the upload ended inside an entry, or before the end
        with spool.reader() as tail:
            return self._check_and_extract(tail, spool.start)

    def _check_and_extract(self, tail: BinaryIO, spooled_from: int) -> int:
        try:
            zf = zipfile.ZipFile(tail)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError):
            raise unzip.bad_zip() from None
        except NotImplementedError:  # an entry needs a zip version newer than 6.3
            raise unzip.bad_zip(" (needs a newer zip version)") from None
        with zf:
            entries = unzip.plan(zf.infolist(), self.max_files, self.max_bytes)
            streamed = self._streamed
            rest: list[unzip.Entry] = []
            exec_bit = {e.parts: e.owner_exec for e in entries}  # a later duplicate wins
            for entry in entries:
                offset = entry.info.header_offset
                meta = streamed.pop(offset, None)
                if meta is None:
                    if offset < spooled_from:
                        raise unzip.corrupt(entry.info.filename)
                    rest.append(entry)
                    continue
                if not meta.matches(entry.info) or meta.parts != entry.parts:
                    raise unzip.corrupt(entry.info.filename)
                if entry.is_dir and not meta.is_dir:  # a directory by its mode bits only
                    self._file_to_dir(entry)
                if entry.owner_exec and exec_bit[entry.parts]:
                    os.chmod(self.dest.joinpath(*entry.parts), 0o755)
            if streamed:
                first = min(streamed)
                raise unzip.bad_zip(f" (entry {streamed[first].name!r} is not in the "
                                    "central directory)")
            unzip.extract_rest(zf, rest, self.dest, self.max_bytes - self._written)
        files = {e.parts for e in entries if not e.is_dir}
        links = sum(1 for parts in files if parts[-1].endswith(unzip.LINK_SUFFIX))
        self.has_links = links > 0
        return len(files) - links

    def _file_to_dir(self, entry: unzip.Entry) -> None:
        """Make the empty file streamed for ``entry`` the directory its mode says."""
        path = self.dest.joinpath(*entry.parts)
        with unzip.os_errors(entry.info.filename):
            if os.lstat(path).st_size or entry.info.file_size:
                raise unzip.conflict(entry.info.filename)
            path.unlink()
            unzip.mkdirs(self.dest, entry.parts)

    @property
    def spool_file_made(self) -> bool:
        return self._spool is not None and self._spool.in_file

    def close(self) -> None:
        """Release open files (idempotent); the caller removes ``dest`` and the spool."""
        if self._entry is not None and self._entry.fd is not None:
            os.close(self._entry.fd)
            self._entry.fd = None
        if self._spool is not None:
            self._spool.close()


def _zip64_sizes(extra: bytes, usize: int, csize: int) -> tuple[int, int] | None:
    """The 64-bit sizes from a local header's ZIP64 extra field, in its order
    (uncompressed, then compressed, each only when the 32-bit field is full)."""
    pos = 0
    while pos + 4 <= len(extra):
        field_id, size = struct.unpack_from("<2H", extra, pos)
        body = extra[pos + 4:pos + 4 + size]
        pos += 4 + size
        if field_id != _ZIP64_ID:
            continue
        values = [v for (v,) in struct.iter_unpack("<Q", body[:len(body) // 8 * 8])]
        if usize == _U32_MAX:
            if not values:
                return None
            usize = values.pop(0)
        if csize == _U32_MAX:
            if not values:
                return None
            csize = values.pop(0)
        return usize, csize
    return None


def unpack_zip(zip_path: Path, dest: Path, *, max_files: int, max_bytes: int,
               chunk_size: int = unzip.CHUNK_SIZE) -> int:
    """Unpack the zip file at ``zip_path`` into the existing empty dir ``dest``
    the way an upload is unpacked (the spool sits next to the zip); returns the
    number of regular files without ``*.chrislink``.  On error ``dest`` may hold
    partial content: the caller removes it."""
    spool = zip_path.with_name(zip_path.name + ".spool")
    unpacker = ZipStreamUnpacker(dest, spool, max_files=max_files, max_bytes=max_bytes)
    try:
        with open(zip_path, "rb") as src:
            while chunk := src.read(chunk_size):
                unpacker.feed([chunk])
        return unpacker.finish()
    finally:
        unpacker.close()
        spool.unlink(missing_ok=True)
