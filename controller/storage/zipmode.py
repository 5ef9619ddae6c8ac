"""Out-of-network (zipfile) storage: inputs arrive as a zip, outputs leave as one.

Staging is all-or-nothing: the upload is unpacked into a hidden directory inside
``key-<jid>`` and renamed to ``incoming`` only when every check passed, so a
refused request leaves nothing behind (and removes ``key-<jid>`` if it made it).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from agent.chrislinks import LinkError, count_files, expand_links
from agent.protocol import Mount
from controller.storage.paths import StorageError, key_dir
from controller.storage.unzip import unpack_zip

log = logging.getLogger("pfleet.controller.storage")

STAGING_PREFIX = ".incoming-staging-"


def stage_zip_inputs(storebase: Path, jid: str, upload: Path, *, max_files: int,
                     max_bytes: int) -> dict[str, Any]:
    """Unpack ``upload`` into ``key-<jid>/incoming`` (blocking; run in an executor).

    Returns pfcon's ``data`` object.  Raises ``StorageError`` (nothing left behind)
    for a bad or oversized zip.
    """
    key = key_dir(storebase, jid)
    created_key = not key.exists()
    key.mkdir(parents=True, exist_ok=True)
    staging = key / f"{STAGING_PREFIX}{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        unpack_zip(upload, staging, max_files=max_files, max_bytes=max_bytes)
        try:
            expand_links(staging, max_entries=max_files)
        except LinkError as exc:
            raise StorageError(str(exc), field="data_file", status=exc.status) from None
        nfiles = count_files(staging)
        incoming = key / "incoming"
        if incoming.is_dir() and not incoming.is_symlink():
            shutil.rmtree(incoming)  # a re-run replaces the inputs of the failed attempt
        os.replace(staging, incoming)
        outgoing = key / "outgoing"
        outgoing.mkdir(exist_ok=True)
        # world-writable as pfcon makes it for swift: a plugin run as another uid
        # (CONTAINER_USER, a SLURM job's user) must be able to write its outputs
        outgoing.chmod(0o777)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created_key:
            shutil.rmtree(key, ignore_errors=True)
        raise
    return {"jid": jid, "nfiles": nfiles, "timestamp": str(dt.datetime.now()),
            "path": str(key / "incoming")}


def plugin_mounts(jid: str) -> list[Mount]:
    return [Mount(f"key-{jid}/incoming", "/share/incoming", True),
            Mount(f"key-{jid}/outgoing", "/share/outgoing", False)]


def remove_stale_staging(storebase: Path) -> int:
    """Remove staging directories a killed controller left behind; returns how many."""
    removed = 0
    try:
        keys = [p for p in storebase.iterdir() if p.name.startswith("key-")]
    except FileNotFoundError:
        return 0
    for key in keys:
        try:
            stale = [p for p in key.iterdir() if p.name.startswith(STAGING_PREFIX)]
        except (NotADirectoryError, FileNotFoundError, PermissionError):
            continue
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
            log.warning("removed stale staging dir path=%s", path)
    return removed
