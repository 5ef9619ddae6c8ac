"""Directory trees that untrusted code wrote: removing one without recursion, and
finding a symbolic link on a path before a bind mount would follow it.

``shutil.rmtree`` (Python 3.11) recurses once per directory level, so a tree a few
hundred levels deep, which any plugin can write, raises ``RecursionError`` and the
tree can never be deleted.  :func:`remove_tree` walks with an explicit stack and
holds one directory descriptor at a time, so a tree deeper than ``PATH_MAX`` or
than the descriptor limit goes too; it never follows a symbolic link.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable

__all__ = ["first_link", "ignore", "remove_tree"]

_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

OnError = Callable[[str, OSError], None]


class _Frame:
    """One directory on the way down: its name in its parent, identity, subdirs left."""

    __slots__ = ("ident", "kept", "name", "subdirs")

    def __init__(self, name: str, ident: tuple[int, int]) -> None:
        self.name = name
        self.ident = ident
        self.subdirs: list[str] = []
        self.kept = False  # something in it could not be removed: it stays


def _raise(_path: str, exc: OSError) -> None:
    raise exc


def ignore(_path: str, _exc: OSError) -> None:
    """``on_error`` for a best-effort removal: what cannot be removed stays."""


def remove_tree(path: str | os.PathLike[str], on_error: OnError | None = None) -> None:
    """Remove the directory ``path`` and everything under it.

    ``path`` itself must be a real directory (a symbolic link fails with ``ELOOP``
    or ``ENOTDIR``); links inside are removed, never followed.  Each failure calls
    ``on_error(path, exc)`` (default: raise it) and keeps that entry and the
    directories above it; the rest is removed.
    """
    report = on_error or _raise
    top = os.fspath(path)
    try:
        fd = os.open(top, _OPEN_DIR)
    except OSError as exc:
        report(top, exc)
        return
    frames: list[_Frame] = []

    def where(name: str = "") -> str:  # only built for a message: O(depth)
        return os.path.join(top, *(f.name for f in frames[1:]), name)

    try:
        name = ""
        while True:
            st = os.fstat(fd)
            frame = _Frame(name, (st.st_dev, st.st_ino))
            frames.append(frame)
            _empty_files(fd, frame, where, report)
            # descend into the next subdir left, or climb while there is none
            while True:
                if frames[-1].subdirs:
                    name = frames[-1].subdirs.pop()
                    try:
                        child = os.open(name, _OPEN_DIR, dir_fd=fd)
                    except FileNotFoundError:
                        continue
                    except OSError as exc:
                        frames[-1].kept = True
                        report(where(name), exc)
                        continue
                    os.close(fd)
                    fd = child
                    break
                done = frames.pop()
                if not frames:
                    os.close(fd)
                    fd = -1
                    if not done.kept:
                        try:
                            os.rmdir(top)
                        except OSError as exc:
                            report(top, exc)
                    return
                parent = os.open("..", _OPEN_DIR, dir_fd=fd)
                os.close(fd)
                fd = parent
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) != frames[-1].ident:
                    report(where(done.name), OSError(
                        errno.EBUSY, "moved while it was being removed", where(done.name)))
                    return
                if done.kept:
                    frames[-1].kept = True
                    continue
                try:
                    os.rmdir(done.name, dir_fd=fd)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    frames[-1].kept = True
                    report(where(done.name), exc)
    finally:
        if fd >= 0:
            os.close(fd)


def _empty_files(fd: int, frame: _Frame, where: Callable[[str], str], report: OnError) -> None:
    """Unlink every non-directory in the open directory ``fd``; note its subdirs."""
    try:
        with os.scandir(fd) as it:
            entries = list(it)
    except OSError as exc:
        frame.kept = True
        report(where(""), exc)
        return
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                frame.subdirs.append(entry.name)
            else:
                os.unlink(entry.name, dir_fd=fd)
        except FileNotFoundError:
            continue
        except OSError as exc:
            frame.kept = True
            report(where(entry.name), exc)


def first_link(root: str | os.PathLike[str], rel: str) -> str | None:
    """The leading part of ``rel`` (relative to ``root``) that is a symbolic link, or
    None.  The check stops at the first component that does not exist.

    A bind mount (and any path walk) follows such a link wherever it points, so a
    link that a plugin or user planted on the way to a storage path would otherwise
    hand the container a directory outside the storage.
    """
    path = os.fspath(root)
    walked: list[str] = []
    for part in rel.split("/"):
        if part in ("", "."):
            continue
        walked.append(part)
        path = os.path.join(path, part)
        try:
            mode = os.lstat(path).st_mode
        except OSError:
            return None
        if stat.S_ISLNK(mode):
            return "/".join(walked)
    return None
