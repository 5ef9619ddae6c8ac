"""Storage paths and the error type shared by the storage modules.

Every path that comes from a client (zip entry names, ChRIS link targets,
``job_output_path``) goes through :func:`safe_join`, so nothing is ever read or
written outside the directory it was meant for.
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path

__all__ = ["StorageError", "key_dir", "safe_join"]


class StorageError(Exception):
    """A storage operation refused or failed because of client input.

    ``field`` names the form field the error is about (``""`` when none), and
    ``status`` is the HTTP status the API answers with; the message itself is
    safe to show to the client (it never contains server paths).
    """

    def __init__(self, message: str, *, field: str = "", status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.status = status


def safe_join(root: Path, rel: str, *, field: str = "") -> Path:
    """Return ``root / rel`` if ``rel`` is a relative path that stays inside ``root``.

    Absolute paths (POSIX, ``\\``-rooted or with a drive letter), ``..`` components
    and NUL bytes are refused with :class:`StorageError`. The check is lexical
    (symlinks are not followed) so it cannot be fooled by the state of the disk;
    callers that must not follow symlinks check with ``lstat`` themselves.
    """
    prefix = f"{field}: " if field else ""
    if "\x00" in rel:
        raise StorageError(f"{prefix}invalid path (NUL byte)", field=field)
    if rel.startswith(("/", "\\")) or (len(rel) >= 2 and rel[1] == ":" and rel[0].isalpha()):
        raise StorageError(f"{prefix}path {rel!r} must be relative", field=field)
    parts = rel.split("/")
    if ".." in parts:
        raise StorageError(f"{prefix}path {rel!r} must not contain '..'", field=field)
    norm = posixpath.normpath(rel) if rel else "."
    base = os.path.normpath(os.fspath(root))
    joined = os.path.normpath(os.path.join(base, norm))
    if joined != base and not joined.startswith(base.rstrip("/") + "/"):
        raise StorageError(f"{prefix}path {rel!r} leaves the storage root", field=field)
    return Path(joined)


def key_dir(storebase: Path, jid: str) -> Path:
    """Return the per-job directory ``storebase/key-<jid>`` (pfcon's layout)."""
    if not jid or "/" in jid or "\x00" in jid or jid in (".", ".."):
        raise StorageError(f"jid: invalid job id {jid!r}", field="jid")
    return storebase / f"key-{jid}"
