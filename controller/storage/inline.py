"""Which uploads are staged on the event loop instead of a worker thread.

Handing a staging to a worker thread costs more than the staging of a small zip:
the thread and the loop trade the GIL at every system call the staging makes
(about ten for one file: directories, the file, the rename), and each trade is a
futex wake and a context switch.  On a 2-core VM that was about 0.3 ms of CPU per
job, more than the unpacking itself (bench 9, see ``tests/bench/README.md``).

So an upload whose every step is small and bounded is staged on the loop: its
whole body arrived in memory (nothing written yet), its central directory lists
few entries, little data and no ``*.chrislink`` file (their expansion walks other
parts of storeBase).  Anything else, and a re-run that must first remove the
inputs of the failed attempt, goes to a worker thread as before.

A slow storeBase (network storage having a bad minute) must not stall the loop,
which also serves status requests and every agent's link: one inline staging
that takes longer than ``SLOW_SECONDS`` sends every staging to a worker thread
for ``BACKOFF_SECONDS``.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from controller.storage.unzip import LINK_SUFFIX

log = logging.getLogger("pfleet.controller.storage")

MAX_UPLOAD_BYTES = 64 << 10  # the zip as received
MAX_OUTPUT_BYTES = 256 << 10  # what its entries unpack to, by the central directory
MAX_ENTRIES = 32
SLOW_SECONDS = 0.02
BACKOFF_SECONDS = 60.0

_END = struct.Struct("<4s4H2LH")  # end of central directory record
_END_SIG = b"PK\x05\x06"
_CENTRAL = struct.Struct("<4s6H3L5H2L")  # one central directory header
_CENTRAL_SIG = b"PK\x01\x02"
_MAX_COMMENT = 0xFFFF


@dataclass(frozen=True)
class ZipSummary:
    entries: int
    output_bytes: int  # the sum of the entries' uncompressed sizes
    has_links: bool


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
    output = 0
    links = False
    at = cd_offset
    for _ in range(entries):
        if at + _CENTRAL.size > end_at:
            return None
        head = _CENTRAL.unpack_from(data, at)
        if head[0] != _CENTRAL_SIG:
            return None
        usize, nlen, elen, clen = head[9], head[10], head[11], head[12]
        if usize == 0xFFFFFFFF:
            return None
        name = data[at + _CENTRAL.size:at + _CENTRAL.size + nlen]
        links = links or name.endswith(LINK_SUFFIX.encode())
        output += usize
        at += _CENTRAL.size + nlen + elen + clen
    if at != end_at:
        return None
    return ZipSummary(entries, output, links)


def small_enough(data: bytes) -> bool:
    """Whether a complete upload ``data`` may be staged on the loop."""
    if len(data) > MAX_UPLOAD_BYTES:
        return False
    summary = summarize(data)
    return (summary is not None and summary.entries <= MAX_ENTRIES
            and summary.output_bytes <= MAX_OUTPUT_BYTES and not summary.has_links)


class InlineGate:
    """Open unless an inline staging was slow within the last ``BACKOFF_SECONDS``."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._closed_until = 0.0

    def is_open(self) -> bool:
        return self._clock() >= self._closed_until

    def record(self, seconds: float) -> None:
        """How long an inline staging took; a slow one closes the gate for a while."""
        if seconds <= SLOW_SECONDS:
            return
        if self.is_open():
            log.warning("staging a small upload took %.0f ms: storeBase is slow, staging "
                        "on worker threads for %.0f s", seconds * 1000, BACKOFF_SECONDS)
        self._closed_until = self._clock() + BACKOFF_SECONDS
