"""Files of the SLURM runtime's work directory, read and written in worker threads
(``asyncio.to_thread``): every function here blocks on the filesystem, which may be a
slow shared one on a login node."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from agent.runtimes.slurm_script import IMAGE_LINE, JobFiles


def make_dir(path: str) -> None:
    """Create ``path``; ``PermissionError`` when this user cannot write there."""
    Path(path).mkdir(parents=True, exist_ok=True)
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(13, "not writable")


def prepare_files(work_dir: str, files: JobFiles, script: str) -> None:
    """Write an attempt's batch script (and forget a stale result of it)."""
    make_dir(work_dir)
    # A result left by an earlier try of this very attempt must not be read as ours.
    Path(files.result).unlink(missing_ok=True)
    write_text(files.script, script)


def write_text(path: str, text: str) -> None:
    """Atomically (temporary file, fsync, rename)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_text(path: str) -> str:
    """The file's text, "" when it cannot be read."""
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def tail_bytes(path: str, limit: int) -> str:
    """The last ``limit`` bytes as text, "" when the file cannot be read."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def tail_lines(path: str, lines: int, limit: int) -> str:
    """The last ``lines`` lines among the last ``limit`` bytes; raises ``OSError``."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - limit))
        data = f.read()
    if size > limit:
        data = data.split(b"\n", 1)[-1]  # drop the partial first line
    text = data.decode(errors="replace")
    kept = text.splitlines(keepends=True)[-lines:]
    return "".join(kept)


def script_image(script: str) -> str:
    """The image a batch script runs (its ``# image:`` line)."""
    for line in script.splitlines():
        if line.startswith(IMAGE_LINE):
            return line[len(IMAGE_LINE):].strip()
    return ""


def unlink_all(paths: list[str]) -> None:
    """Remove what exists of ``paths``."""
    for path in paths:
        with contextlib.suppress(OSError):
            os.unlink(path)
