"""Which uploads are staged on the event loop instead of a worker thread.

Handing a staging to a worker thread costs more than the staging of a small zip:
the thread and the loop trade the GIL at every system call the staging makes
(about ten for one file: directories, the file, the rename), and each trade is a
futex wake and a context switch.  On a 2-core VM that was about 0.3 ms of CPU per
job, more than the unpacking itself (bench 9, see ``tests/bench/README.md``).

So an upload whose every step is small and bounded is staged on the loop: its
whole body arrived in memory (nothing written yet), its central directory lists
few entries, little data, short and shallow names, only stored or deflated data
and no ``*.chrislink`` file (their expansion walks other parts of storeBase).
The unpacker is held to those same bounds, so local headers that claim more than
the central directory make the upload corrupt instead of long.  Anything else,
and a re-run that must first remove the inputs of the failed attempt, goes to a
worker thread as before; so does every upload when storeBase is not a local
filesystem (a network mount that stops answering would stop the loop with it).

A slow storeBase (network storage having a bad minute) must not stall the loop,
which also serves status requests and every agent's link: one inline staging
that takes longer than ``SLOW_SECONDS`` sends every staging to a worker thread
for ``BACKOFF_SECONDS``.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from controller.storage.paths import StorageError
from controller.storage.unzip import LINK_SUFFIX, check_name

log = logging.getLogger("pfleet.controller.storage")

MAX_UPLOAD_BYTES = 64 << 10  # the zip as received
MAX_OUTPUT_BYTES = 256 << 10  # what its entries unpack to, by the central directory
MAX_ENTRIES = 32
MAX_NAME_BYTES = 8 << 10  # every entry's name together
MAX_DEPTH = 16  # directories in one entry's path
SLOW_SECONDS = 0.02
BACKOFF_SECONDS = 60.0

_END = struct.Struct("<4s4H2LH")  # end of central directory record
_END_SIG = b"PK\x05\x06"
_CENTRAL = struct.Struct("<4s6H3L5H2L")  # one central directory header
_CENTRAL_SIG = b"PK\x01\x02"
_MAX_COMMENT = 0xFFFF
_STREAMED_METHODS = (0, 8)  # stored, deflated: the only ones unpacked with bounded steps
_FLAG_ENCRYPTED = 0x1
_FLAG_UTF8 = 0x800


@dataclass(frozen=True)
class ZipSummary:
    entries: int
    output_bytes: int  # the sum of the entries' uncompressed sizes
    has_links: bool
    name_bytes: int
    depth: int  # the most path parts of one entry


def summarize(data: bytes) -> ZipSummary | None:
    """What ``data``'s central directory declares; None when it cannot be read
    simply (ZIP64, bytes before the first entry, damage): the worker thread's
    unpacker then decides, and gives the client the precise error."""
    end_at = data.rfind(_END_SIG, max(0, len(data) - _END.size - _MAX_COMMENT))
    if end_at < 0 or len(data) - end_at < _END.size:
        return None
    _, disk, cd_disk, _, entries, cd_size, cd_offset, comment = _END.unpack_from(data, end_at)
    if (disk or cd_disk or end_at + _END.size + comment != len(data)
            or cd_offset + cd_size != end_at or entries == 0xFFFF):
        return None
    output = name_bytes = depth = 0
    links = False
    at = cd_offset
    for _ in range(entries):
        if at + _CENTRAL.size > end_at:
            return None
        head = _CENTRAL.unpack_from(data, at)
        flags, method, usize, nlen, elen, clen = (head[3], head[4], head[9], head[10],
                                                  head[11], head[12])
        if (head[0] != _CENTRAL_SIG or usize == 0xFFFFFFFF or flags & _FLAG_ENCRYPTED
                or method not in _STREAMED_METHODS):
            return None
        raw = data[at + _CENTRAL.size:at + _CENTRAL.size + nlen]
        # decoded as zipfile decodes it, checked as the unpacker checks it
        name = raw.decode("utf-8" if flags & _FLAG_UTF8 else "cp437", errors="replace")
        try:
            checked = check_name(name)
        except StorageError:
            return None  # the worker's unpacker refuses it, with the reason
        if checked is not None:
            parts, _ = checked
            depth = max(depth, len(parts))
            links = links or parts[-1].endswith(LINK_SUFFIX)
        output += usize
        name_bytes += nlen
        at += _CENTRAL.size + nlen + elen + clen
    if at != end_at:
        return None
    return ZipSummary(entries, output, links, name_bytes, depth)


def small_enough(data: bytes, max_files: int, max_bytes: int) -> bool:
    """Whether a complete upload ``data`` may be staged on the loop by an unpacker
    allowing ``max_files`` entries and ``max_bytes`` (a zip beyond those goes to a
    worker thread, whose unpacker refuses it with the reason)."""
    if len(data) > MAX_UPLOAD_BYTES:
        return False
    summary = summarize(data)
    return (summary is not None
            and summary.entries <= min(MAX_ENTRIES, max_files)
            and summary.output_bytes <= min(MAX_OUTPUT_BYTES, max_bytes)
            and summary.name_bytes <= MAX_NAME_BYTES and summary.depth <= MAX_DEPTH
            and not summary.has_links)


# Filesystems on a local disk or in memory: one that stops answering takes the
# machine with it, not only the controller's loop.
LOCAL_FILESYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "zfs", "f2fs",
                               "bcachefs", "jfs", "tmpfs", "ramfs", "overlay"})


def filesystem_type(path: Path, mountinfo: str | None = None) -> str | None:
    """The type of the filesystem holding ``path``, by ``/proc/self/mountinfo`` (the
    longest mount point above it, the last one mounted there); None if unknown."""
    real = os.path.realpath(path)
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return None
    found, longest = None, -1
    for line in mountinfo.splitlines():
        fields = line.split()
        if "-" not in fields[6:] or len(fields) < 9:
            continue
        point = _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), fields[4])
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= longest:
            found, longest = fields[fields.index("-", 6) + 1], len(point)
    return found


_OCTAL = re.compile(r"\\([0-7]{3})")  # mountinfo writes a space as \040


class InlineGate:
    """Closed when storeBase is not on a local filesystem, and for
    ``BACKOFF_SECONDS`` after a slow inline staging."""

    def __init__(self, storebase: Path | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._closed_until = 0.0
        self.local = True
        if storebase is not None:
            fstype = filesystem_type(storebase)
            self.local = fstype in LOCAL_FILESYSTEMS
            if not self.local:
                log.info("storeBase is on %s, not a local filesystem: uploads are staged "
                         "on worker threads only", fstype or "an unknown filesystem")

    def is_open(self) -> bool:
        return self.local and self._clock() >= self._closed_until

    def record(self, seconds: float) -> None:
        """How long an inline staging took; a slow one closes the gate for a while."""
        if seconds <= SLOW_SECONDS:
            return
        if self.is_open():
            log.warning("staging a small upload took %.0f ms: storeBase is slow, staging "
                        "on worker threads for %.0f s", seconds * 1000, BACKOFF_SECONDS)
        self._closed_until = self._clock() + BACKOFF_SECONDS
