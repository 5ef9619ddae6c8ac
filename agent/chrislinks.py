"""Expansion of ChRIS links (``*.chrislink`` files) in a job's ``incoming/`` tree.

CUBE sends a link as a small file whose content is a storage path (e.g.
``home/bob``) and puts the files reached through it at their full storage path in
the same tree. The plugin must instead see the linked data next to the link, in a
directory named after the target with ``/`` replaced by ``_`` (pfcon-api.md §3.6).
Link files are client input: targets are confined to ``incoming/``, symlinks are
never followed, loops terminate, and the total work is capped.

Used by the controller's zipfile staging and by the agent's copy operation, so it
lives in the agent package and needs nothing but the standard library.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

from agent.fstree import remove_tree

__all__ = ["DEFAULT_MAX_ENTRIES", "LINK_SUFFIX", "MAX_LINK_DEPTH", "LinkError", "count_files",
           "expand_links", "link_target_parts"]

LINK_SUFFIX = ".chrislink"
FIELD = "data_file"
MAX_LINK_SIZE = 4096
MAX_LINK_DEPTH = 64
DEFAULT_MAX_ENTRIES = 1_000_000

Parts = tuple[str, ...]


class LinkError(ValueError):
    """A ChRIS link that cannot be expanded.

    The message is safe to show to a client (it names paths relative to
    ``incoming`` only); ``status`` is the HTTP status an API answers with: 400 for
    a bad link, 413 when the expansion would create too many files.
    """

    def __init__(self, message: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def count_files(root: Path) -> int:
    """Count regular files under root, excluding ``*.chrislink`` (pfcon's ``nfiles``)."""
    return sum(1 for _ in iter_files(root, skip_links=True))


def link_target_parts(text: str) -> Parts:
    """The components of a link target (a storage path relative to the storage root).

    Returns ``()`` for a target that is absolute (POSIX, ``\\``-rooted or with a
    drive letter), contains ``..`` or a NUL byte, or names the root itself. The
    check is lexical: it never looks at the disk.
    """
    if "\x00" in text or text.startswith(("/", "\\")):
        return ()
    if len(text) >= 2 and text[1] == ":" and text[0].isalpha():
        return ()
    if ".." in text.split("/"):
        return ()
    norm = posixpath.normpath(text)
    if norm in (".", "") or norm.startswith("/"):
        return ()
    return tuple(norm.split("/"))


def expand_links(incoming: Path, *, max_entries: int = DEFAULT_MAX_ENTRIES,
                 field: str = FIELD) -> None:
    """Expand every ChRIS link under ``incoming`` in place (pfcon's expansion phase).

    Each link not inside an already-expanded source gets a copy (hard links when
    possible) of ``incoming/<target>`` (its parent dir if the target is a file) in
    a sibling dir ``<target with / -> _>``, links inside the copy are expanded too,
    and the link file is removed. Then every top-level folder that is the first
    component of an expanded target is removed, unless it is a target itself. A
    link to a missing target, or that would re-enter a target it came through, is
    just removed. Raises :class:`LinkError` (400) for a target that is absolute,
    contains ``..`` or is unreadable, for links nested over :data:`MAX_LINK_DEPTH`
    deep, and 413 when copies would create more than ``max_entries`` files and dirs.
    Error messages start with ``"<field>: "`` (nothing when ``field`` is empty).
    May leave partial content on error: the caller removes ``incoming``.
    """
    _Expansion(incoming, max_entries, field).run()


class _Expansion:
    def __init__(self, incoming: Path, max_entries: int, field: str) -> None:
        self.root = incoming
        self.max_entries = max_entries
        self.prefix = f"{field}: " if field else ""
        self.created = 0
        self.sources: set[Parts] = set()

    def run(self) -> None:
        self._walk(self.root, (), top_level=True)
        tops = {t[0] for t in self.sources} - {t[0] for t in self.sources if len(t) == 1}
        for top in sorted(tops):
            path = self.root / top
            if _is_real_dir(path):
                remove_tree(path)
        # links skipped inside a source that is kept (its top folder is itself a
        # target) would otherwise reach the plugin; no link ever survives expansion.
        # Without a source, the walk met every link and removed it: no second walk.
        if not self.sources:
            return
        for rel, path in iter_files(self.root, skip_links=False):
            if rel.endswith(LINK_SUFFIX):
                path.unlink()

    def _rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def _inside_source(self, parts: Parts) -> bool:
        return any(parts[:i] in self.sources for i in range(1, len(parts) + 1))

    def _walk(self, start: Path, chain: Parts, *, top_level: bool) -> None:
        """Expand the links under ``start``; ``chain`` = targets this copy came through.

        Only the top-level walk skips sources: a copy's links must always be
        handled, even when the copy lies inside its own source.
        """
        stack = [start]
        while stack:
            current = stack.pop()
            with os.scandir(current) as it:
                entries = sorted(it, key=lambda e: e.name)
            rel_parts = Path(current).relative_to(self.root).parts
            for entry in entries:
                if entry.name.endswith(LINK_SUFFIX) and entry.is_file(follow_symlinks=False):
                    if top_level and self._inside_source(rel_parts):
                        break
                    self._expand(Path(entry.path), chain)
            subdirs = [
                Path(e.path)
                for e in entries
                if e.is_dir(follow_symlinks=False)
                and not (top_level and self._inside_source((*rel_parts, e.name)))
            ]
            stack.extend(reversed(subdirs))

    def _read_target(self, link: Path) -> Parts:
        name = self._rel(link)

        def bad(why: str) -> LinkError:
            return LinkError(f"{self.prefix}ChRIS link {name!r} {why}")

        fd = os.open(link, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as fh:
            raw = fh.read(MAX_LINK_SIZE + 1)
        if len(raw) > MAX_LINK_SIZE:
            raise bad(f"is larger than {MAX_LINK_SIZE} bytes")
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise bad("is not UTF-8 text") from None
        if not text:
            raise bad("is empty")
        parts = link_target_parts(text)
        if not parts:
            raise bad(f"has a target outside the job's input: {text[:200]!r}")
        return parts

    def _resolve(self, parts: Parts) -> Parts | None:
        """Return the directory to copy for a target, or None when there is none.

        Walks with lstat so that no symlink is ever followed.
        """
        path = self.root
        for i, part in enumerate(parts):
            path = path / part
            try:
                mode = os.lstat(path).st_mode
            except (FileNotFoundError, NotADirectoryError):
                return None
            if stat.S_ISDIR(mode):
                continue
            if stat.S_ISREG(mode) and i == len(parts) - 1 and len(parts) > 1:
                return parts[:-1]
            return None
        return parts

    def _expand(self, link: Path, chain: Parts) -> None:
        target = self._resolve(self._read_target(link))
        link.unlink()
        if target is None:
            return  # missing or empty target (pfcon#154): nothing to materialise
        self.sources.add(target)
        key = "/".join(target)
        if key in chain:
            return  # loop: this copy already came through the same target
        if len(chain) >= MAX_LINK_DEPTH:
            raise LinkError(
                f"{self.prefix}ChRIS links nested more than {MAX_LINK_DEPTH} levels deep")
        dst = link.parent / key.replace("/", "_")
        try:
            if not os.path.lexists(dst):
                self._copy_tree(self.root.joinpath(*target), dst)
            elif not _is_real_dir(dst):
                return
        except OSError as exc:
            if exc.errno in (errno.ENAMETOOLONG, errno.EILSEQ, errno.EINVAL):
                raise LinkError(
                    f"{self.prefix}ChRIS link {self._rel(link)!r} cannot be expanded here"
                ) from None
            raise
        self._walk(dst, (*chain, key), top_level=False)

    def _count(self) -> None:
        self.created += 1
        if self.created > self.max_entries:
            raise LinkError(
                f"{self.prefix}ChRIS links expand to more than {self.max_entries} files",
                status=413,
            )

    def _copy_tree(self, src: Path, dst: Path) -> None:
        """Copy src to dst with hard links (copies as fallback), skipping dst itself.

        dst may lie inside src (a link whose target contains it); each directory is
        listed before its copy is filled, so the copy never copies itself.
        """
        _mkdir(dst)
        self._count()
        stack = [(src, dst)]
        while stack:
            s, d = stack.pop()
            with os.scandir(s) as it:
                entries = list(it)
            for entry in entries:
                sp, dp = Path(entry.path), d / entry.name
                if sp == dst:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    _mkdir(dp)
                    self._count()
                    stack.append((sp, dp))
                elif entry.is_file(follow_symlinks=False):
                    self._count()
                    _link_or_copy(sp, dp)


def iter_files(root: Path, *, skip_links: bool,
               delete_links: bool = False) -> Iterator[tuple[str, Path]]:
    """Yield ``(relative posix path, path)`` of the regular files under root, in
    ``os.walk`` top-down order (unsorted, like pfcon).

    Symlinks are neither yielded nor descended into; unreadable directories are
    skipped, and a missing root yields nothing.  With ``skip_links``, entries named
    ``*.chrislink`` are not yielded; ``delete_links`` also unlinks them (symlinks
    too) as they are met — pfcon's fix for plugin-written links (#175).
    """
    skip = skip_links or delete_links
    stack: list[tuple[str, str]] = [(os.fspath(root), "")]
    while stack:
        path, rel = stack.pop()
        try:
            with os.scandir(path) as it:
                entries = list(it)
        except OSError:
            continue
        subdirs: list[tuple[str, str]] = []
        for entry in entries:
            entry_rel = f"{rel}{entry.name}"
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
                is_file = entry.is_file(follow_symlinks=False)
            except OSError:
                continue
            if is_dir:
                subdirs.append((entry.path, entry_rel + "/"))
            elif skip and entry.name.endswith(LINK_SUFFIX):
                if delete_links:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
            elif is_file:
                yield entry_rel, Path(entry.path)
        stack.extend(reversed(subdirs))


def _is_real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _mkdir(path: Path) -> None:
    os.mkdir(path, 0o755)
    os.chmod(path, 0o755)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copyfile(src, dst, follow_symlinks=False)
        shutil.copymode(src, dst, follow_symlinks=False)
