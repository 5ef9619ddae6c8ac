"""Out-of-network (zipfile) storage: inputs arrive as a zip, outputs leave as one.

Staging is all-or-nothing: the upload is unpacked while it arrives into a private
directory under ``<storeBase>/.pfleet-staging`` (the form may name the jid only
after the file, so it cannot go inside ``key-<jid>`` yet) and renamed to
``key-<jid>/incoming`` only when every check passed; a refused request leaves
nothing behind.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from agent.chrislinks import LinkError, count_files, expand_links
from agent.fstree import ignore, remove_tree
from agent.protocol import Mount
from controller.ids import new_id
from controller.storage import inline, unzip
from controller.storage.paths import StorageError, key_dir
from controller.storage.zipstream import ZipStreamUnpacker

log = logging.getLogger("pfleet.controller.storage")

STAGING_DIR = ".pfleet-staging"
SPOOL_PREFIX = "upload-"


class ZipUpload:
    """One ``data_file`` being unpacked as it arrives (construction does no I/O;
    the other methods block: call them off the event loop).

    A refusal found mid-stream stops the writing but is raised only by
    :meth:`finish`, once the whole body was read: the client gets its answer
    instead of a reset connection, and errors in other fields keep precedence.
    """

    def __init__(self, storebase: Path, spool_dir: Path, *, max_files: int,
                 max_bytes: int) -> None:
        name = new_id()
        self.staging = storebase / STAGING_DIR / name
        self.spool = spool_dir / f"{SPOOL_PREFIX}{name}"
        self.max_files = max_files
        self.error: StorageError | None = None
        self.nfiles = 0  # pfcon's nfiles, once finish() returned
        self._made = False  # the staging dir exists (made on the first bytes)
        self._held: list[bytes] = []
        self._finished = False
        self._unpacker = ZipStreamUnpacker(self.staging, self.spool, max_files=max_files,
                                           max_bytes=max_bytes)

    @property
    def has_links(self) -> bool:
        return self._unpacker.has_links

    @property
    def leaves_files(self) -> bool:
        """Whether :meth:`discard` has anything to remove."""
        return self._made or self._unpacker.spool_file_made

    def feed(self, chunks: Iterable[bytes]) -> None:
        if self.error is not None:
            return
        try:
            if not self._made:
                self._make_staging()
            self._unpacker.feed(chunks)
        except StorageError as exc:
            self.error = exc
            self._unpacker.close()

    def hold(self, chunks: list[bytes]) -> None:
        """Keep the upload's last piece (about a megabyte at most) for :meth:`finish`."""
        self._held = chunks

    def _make_staging(self) -> None:
        try:
            os.mkdir(self.staging)
        except FileNotFoundError:  # the staging root was removed under a running controller
            self.staging.mkdir(parents=True)
        self._made = True
        self.staging.chmod(0o755)  # becomes incoming/: the plugin user must read it

    def can_stage_inline(self) -> bool:
        """Whether the whole upload is still in memory and small enough, by
        :func:`controller.storage.inline.small_enough`, to be staged on the loop.
        When it is, the unpacker is held to what its central directory declared."""
        unpacker = self._unpacker
        if self._made or unpacker.spool_file_made or self.error is not None:
            return False
        if not inline.small_enough(b"".join(self._held), unpacker.max_files,
                                   unpacker.max_bytes):
            return False
        unpacker.max_files = min(unpacker.max_files, inline.MAX_ENTRIES)
        unpacker.max_bytes = min(unpacker.max_bytes, inline.MAX_OUTPUT_BYTES)
        return True

    def finish(self) -> None:
        """Raise the refusal met while streaming, or check and complete the unpack
        (once: a second call after success does nothing)."""
        if self._finished:
            return
        if self._held:
            self.feed(self._held)
            self._held = []
        if self.error is not None:
            raise self.error
        self.nfiles = self._unpacker.finish()  # an empty part is refused before any write
        self._finished = True

    def moved(self) -> None:
        """The staging dir became ``incoming``: nothing is left to discard."""
        self._made = False

    def discard(self) -> None:
        """Remove what is left of the upload (nothing after a successful stage)."""
        self._unpacker.close()
        if self._made:
            remove_tree(self.staging, ignore)
            self._made = False
        if self._unpacker.spool_file_made:
            self.spool.unlink(missing_ok=True)


def stage_zip_inputs(storebase: Path, jid: str, upload: ZipUpload) -> dict[str, Any]:
    """Complete ``upload`` and move it to ``key-<jid>/incoming`` (blocking).

    Returns pfcon's ``data`` object.  Raises ``StorageError`` for a bad or
    oversized zip; the caller then discards the upload, and nothing is left.
    """
    upload.finish()
    nfiles = _expanded(upload)
    key = key_dir(storebase, jid)
    try:
        os.mkdir(key)
        created_key = True
    except FileExistsError:
        created_key = False
    return _move_in(jid, key, created_key, upload, nfiles)


def stage_small_upload(storebase: Path, jid: str, upload: ZipUpload) -> dict[str, Any] | None:
    """:func:`stage_zip_inputs` for an upload that passed
    :meth:`ZipUpload.can_stage_inline`, on the event loop.

    Returns None, with the upload complete but not moved, when what is left can
    take long: ``key-<jid>`` exists (a re-run's old inputs are removed first), or
    the upload holds ``*.chrislink`` files to expand.  The caller then finishes with
    :func:`stage_zip_inputs` on a worker thread.
    """
    try:
        upload.finish()
    except StorageError as exc:
        if exc.status == 413:
            # within the limits by its central directory (can_stage_inline held the
            # unpacker to them), beyond them as streamed
            raise unzip.bad_zip(" (its entries do not match its central directory)") from None
        raise
    if upload.has_links:  # named so that only the unpacker saw it: expanded on a thread
        return None
    key = key_dir(storebase, jid)
    try:
        os.mkdir(key)
    except FileExistsError:
        return None
    return _move_in(jid, key, True, upload, upload.nfiles)


def _expanded(upload: ZipUpload) -> int:
    """Expand the upload's ``*.chrislink`` files; returns its number of files."""
    if not upload.has_links:
        return upload.nfiles
    try:
        expand_links(upload.staging, max_entries=upload.max_files)
    except LinkError as exc:
        raise StorageError(str(exc), field="data_file", status=exc.status) from None
    return count_files(upload.staging)


def _move_in(jid: str, key: Path, created_key: bool, upload: ZipUpload,
             nfiles: int) -> dict[str, Any]:
    try:
        incoming = key / "incoming"
        if not created_key and incoming.is_dir() and not incoming.is_symlink():
            remove_tree(incoming)  # a re-run replaces the inputs of the failed attempt
        os.replace(upload.staging, incoming)
        upload.moved()
        outgoing = key / "outgoing"
        outgoing.mkdir(exist_ok=True)
        # world-writable as pfcon makes it for swift: a plugin run as another uid
        # (CONTAINER_USER, a SLURM job's user) must be able to write its outputs
        outgoing.chmod(0o777)
    except BaseException:
        if created_key:
            remove_tree(key, ignore)
        raise
    return {"jid": jid, "nfiles": nfiles, "timestamp": str(dt.datetime.now()),
            "path": str(key / "incoming")}


def plugin_mounts(jid: str) -> list[Mount]:
    return [Mount(f"key-{jid}/incoming", "/share/incoming", True),
            Mount(f"key-{jid}/outgoing", "/share/outgoing", False)]


def prepare_upload_dirs(storebase: Path, spool_dir: Path) -> int:
    """Make the staging and spool dirs, removing what a killed controller left
    in them; returns how many stale uploads were removed."""
    stale = [*_children(storebase / STAGING_DIR), *_children(spool_dir, SPOOL_PREFIX)]
    for path in stale:
        if path.is_dir() and not path.is_symlink():
            remove_tree(path, ignore)
        else:
            path.unlink(missing_ok=True)
        log.warning("removed stale upload path=%s", path)
    (storebase / STAGING_DIR).mkdir(parents=True, exist_ok=True)
    spool_dir.mkdir(parents=True, exist_ok=True)
    return len(stale)


def _children(parent: Path, prefix: str = "") -> list[Path]:
    try:
        return [p for p in parent.iterdir() if p.name.startswith(prefix)]
    except (FileNotFoundError, NotADirectoryError):
        return []
