"""WAL checkpoints on a thread of their own.

The store's connection runs on the event loop with ``wal_autocheckpoint=0``: a
checkpoint copies the WAL into the database file and waits for the disk (fsync),
which must not stall the loop.  This thread checkpoints through a second
connection every ``interval`` seconds instead.  ``PASSIVE`` never waits for the
writer or its readers, and the sqlite3 module lets go of the GIL while SQLite
works, so the loop keeps running meanwhile.

A WAL starts over from its beginning only when a write begins after everything in
it was copied, which under steady writes never happens: the writer has always
added frames since.  So past ``RESTART_FRAMES`` this thread asks the store's
batches to hold (``GroupCommit.hold``: the open batch commits, the calls made
meanwhile wait), runs ``RESTART`` while no transaction is open, and releases
them.  The store's callers wait for that checkpoint; the loop does not.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
from pathlib import Path

from controller.group_commit import GroupCommit

log = logging.getLogger("pfleet.controller.store")

INTERVAL = 1.0  # seconds between passive checkpoints
RESTART_FRAMES = 4096  # pages in the WAL (16 MiB of 4 KiB pages) before it starts over
QUIET_WAIT = 5.0  # seconds to wait for the open batch to end


class Checkpointer:
    def __init__(self, path: Path, interval: float = INTERVAL) -> None:
        self.path = path
        self.interval = interval
        self.checkpoints = 0  # passive ones; these counts are for tests and benchmarks
        self.restarts = 0
        self.restarts_missed = 0
        self._group: GroupCommit | None = None
        self._stop = threading.Event()
        self._quiet: threading.Event | None = None
        self._thread: threading.Thread | None = None

    def start(self, group: GroupCommit) -> None:
        """Start checkpointing the database (it exists, in WAL mode) that ``group``'s
        batches write; call on the loop's thread, from one of its calls."""
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
        # timeout=0: this connection never waits for the loop's
        db = sqlite3.connect(self.path, timeout=0, check_same_thread=False,
                             isolation_level=None)
        try:
            while not self._stop.wait(self.interval):
                try:
                    self.checkpoint(db)
                except sqlite3.Error as exc:  # a full or failing disk: try again later
                    log.warning("WAL checkpoint failed: %s", exc)
        finally:
            db.close()

    def checkpoint(self, db: sqlite3.Connection) -> None:
        _, frames, _ = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        self.checkpoints += 1
        if frames > RESTART_FRAMES:
            self._restart(db)

    def _restart(self, db: sqlite3.Connection) -> None:
        group = self._group
        loop = group.loop if group is not None else None
        if group is None or loop is None:
            return
        quiet = self._quiet = threading.Event()
        try:
            loop.call_soon_threadsafe(group.hold, quiet)
        except RuntimeError:  # the loop is closed
            return
        try:
            if quiet.wait(QUIET_WAIT) and not self._stop.is_set():
                busy, _, _ = db.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
                if busy:  # another process reads the database: try again next time
                    self.restarts_missed += 1
                else:
                    self.restarts += 1
        finally:
            self._quiet = None
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(group.release)
