"""WAL checkpoints, and the WAL's restarts, on a thread of their own.

The store's connection runs on the event loop with ``wal_autocheckpoint=0``.  Two
things would make it wait for the disk: a checkpoint (it copies the WAL into the
database file and syncs it), and starting the WAL over, which the first write
after a complete checkpoint does, syncing the WAL's header.  Both happen here, on
a second connection, every ``interval`` seconds when the loop wrote anything:

1. the store's batches hold (``GroupCommit.hold``: the open batch commits, the
   calls made meanwhile wait, the loop runs on);
2. ``RESTART`` copies what the WAL holds (only the newest copy of each page) and
   syncs the database file;
3. a one-row write to ``wal_marker`` starts the WAL over, here;
4. the batches are released.

The WAL then always holds a frame the last checkpoint did not copy, so the loop's
writes never find it complete and never start it over themselves.  The store's
callers wait for steps 2-3 once a second at most; the loop does not.  The WAL
holds at most about ``interval`` seconds of writes.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
from pathlib import Path

from controller.group_commit import GroupCommit

log = logging.getLogger("pfleet.controller.store")

INTERVAL = 1.0  # seconds between checkpoints, when something was written
QUIET_WAIT = 5.0  # seconds to wait for the open batch to end

MARKER_SCHEMA = """
CREATE TABLE IF NOT EXISTS wal_marker (id INTEGER PRIMARY KEY CHECK (id = 1),
                                       restarts INTEGER NOT NULL);
INSERT OR IGNORE INTO wal_marker VALUES (1, 0);
"""


class Checkpointer:
    def __init__(self, path: Path, interval: float = INTERVAL) -> None:
        self.path = path
        self.interval = interval
        # what happened, for tests, benchmarks and the curious
        self.checkpoints = 0
        self.restarts_missed = 0  # RESTART found a reader (another process)
        self.failures = 0
        self._group: GroupCommit | None = None
        self._stop = threading.Event()
        self._quiet: threading.Event | None = None
        self._thread: threading.Thread | None = None
        self._seen_version: int | None = None

    def start(self, group: GroupCommit) -> None:
        """Start checkpointing the database (it exists, in WAL mode, with
        ``MARKER_SCHEMA``) that ``group``'s batches write; call on the loop's thread,
        from one of its calls."""
        if self._thread is None:
            self._group = group
            self._stop.clear()
            self._thread = threading.Thread(target=self._work, name="pfleet-checkpoint",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop after the checkpoint under way, if any (blocking)."""
        self._stop.set()
        quiet = self._quiet
        if quiet is not None:  # the loop may be the caller: do not wait for it
            quiet.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _work(self) -> None:
        db: sqlite3.Connection | None = None
        try:
            while not self._stop.wait(self.interval):
                try:
                    if db is None:
                        # mode=rw: a database removed under us is not made again, empty;
                        # timeout=0: this connection never waits for the loop's
                        db = sqlite3.connect(f"file:{self.path}?mode=rw", uri=True, timeout=0,
                                             check_same_thread=False, isolation_level=None)
                    self.checkpoint(db)
                except Exception as exc:  # a full or failing disk: try again later
                    self.failures += 1
                    log.warning("WAL checkpoint failed (tried again in %.0f s): %s",
                                self.interval, exc)
                    if db is not None:
                        with contextlib.suppress(sqlite3.Error):
                            db.close()
                        db = None
        finally:
            if db is not None:
                db.close()

    def checkpoint(self, db: sqlite3.Connection) -> None:
        """One cycle: nothing when nothing was written since the last one."""
        version = db.execute("PRAGMA data_version").fetchone()[0]
        if version == self._seen_version:
            return
        group = self._group
        loop = group.loop if group is not None else None
        if group is None or loop is None:
            return
        quiet = self._quiet = threading.Event()
        if self._stop.is_set():  # stop() may have looked before _quiet was set
            self._quiet = None
            return
        try:
            loop.call_soon_threadsafe(group.hold, quiet)
        except RuntimeError:  # the loop is closed
            self._quiet = None
            return
        try:
            if quiet.wait(QUIET_WAIT) and not self._stop.is_set():
                self._restart(db)
        finally:
            self._quiet = None
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(group.release)

    def _restart(self, db: sqlite3.Connection) -> None:
        busy, _, _ = db.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
        self.checkpoints += 1
        if busy:
            self.restarts_missed += 1
        db.execute("UPDATE wal_marker SET restarts = restarts + 1 WHERE id = 1")
        self._seen_version = db.execute("PRAGMA data_version").fetchone()[0]
