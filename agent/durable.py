"""Small files replaced atomically at once and made durable in the background.

The agent's records (outbox events, job records) must survive the agent being
killed: a temp file and ``os.replace`` give that at once, since the kernel keeps
the data whatever happens to the process.  ``fsync`` only adds survival of a
machine crash, and costs milliseconds to tens of milliseconds on a busy disk, which
must not be spent on the event loop; one background thread does it, coalescing
the files written meanwhile (a file deleted before its turn needs nothing).

The thread waits ``delay`` seconds after the first write of a batch before it
syncs: an outbox event is usually acked and deleted within that time, and a job
record rewritten several times is synced once.  Each fsync of a new file forces a
journal commit, which also slows every other writer of the filesystem (the
container engine's metadata, on a shared disk).  Bench 4 counted about 20 fsyncs
per job without the wait and 3 with it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from pathlib import Path

__all__ = ["BATCH_DELAY", "DurableWriter", "sync_files"]

log = logging.getLogger("pfleet.agent.durable")

BATCH_DELAY = 0.25  # seconds a batch gathers before it is synced


class DurableWriter:
    def __init__(self, name: str, *, delay: float = BATCH_DELAY) -> None:
        self._name = name
        self._delay = delay
        self._dirty: set[str] = set()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._closed = False
        self._thread: threading.Thread | None = None

    def replace(self, path: Path, data: bytes, mode: int = 0o600) -> None:
        """Write ``data`` to ``path`` atomically (temp file + rename); fsync later.
        Raises ``OSError`` when the write itself fails."""
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
        try:
            try:
                view = memoryview(data)
                while view:  # a nearly full disk takes part of a write without an error
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
        except BaseException:
            tmp.unlink(missing_ok=True)  # never rename a torn file over the good one
            raise
        os.replace(tmp, path)
        with self._lock:
            self._dirty.add(os.fspath(path))
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name=f"pfleet-fsync-{self._name}")
                self._thread.start()
            self._wake.notify()

    def flush(self) -> None:
        """fsync everything written so far, in the caller's thread (blocking)."""
        with self._lock:
            batch, self._dirty = self._dirty, set()
        sync_files(batch)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._wake.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout=10)
        self.flush()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._dirty and not self._closed:
                    self._wake.wait()
                self._wake.wait_for(lambda: self._closed, timeout=self._delay)
                if self._closed and not self._dirty:
                    return
                batch, self._dirty = self._dirty, set()
            sync_files(batch)


def sync_files(paths: set[str]) -> None:
    """fsync each file that still exists, then each of their directories."""
    directories: set[str] = set()
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue  # replaced or deleted since: nothing to keep
        except OSError as exc:
            log.warning("cannot open for fsync path=%s error=%s", path, exc)
            continue
        try:
            os.fsync(fd)
        except OSError as exc:
            log.warning("fsync failed path=%s error=%s", path, exc)
        finally:
            os.close(fd)
        directories.add(os.path.dirname(path))
    for directory in directories:
        with contextlib.suppress(OSError):
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
