"""The fetch phase of an ``fslink`` copy job (pfcon-api.md §3.4, §3.6).

The storeBase *is* CUBE's storage root.  For each input dir this collects every
regular file under ``storeBase/<input dir>`` (a real directory walk, as pfcon's
fslink copy does, so ``a/b`` never matches ``a/bc``; a missing input dir
contributes nothing), follows ChRIS link files (``*.chrislink``, content = a
storage path) into their targets, and writes each file into ``incoming/`` at its
storage path with the input dir removed once; files reached through a link that
lies outside the input dir therefore land at their full storage path.  Link files
are copied as they are: the expansion phase (``agent.chrislinks``) turns them into
directories afterwards.

Safety (link files and the tree are client data):

* a link whose target is absolute, contains ``..``, or names the job's output dir
  or one of its ancestors fails the copy with a message naming the link;
* symbolic links are never followed.  One that points outside the storage root
  fails the copy (a tree that tries to leave the storage is refused loudly rather
  than copied partially without a word); one that stays inside is skipped and
  counted in the log, since following it could copy data outside the input dir
  the client asked for;
* the job's own key dir is never read, so an input dir of ``/`` cannot copy the
  copy into itself;
* a visited set of targets stops link loops.

Small files are copied by the walking thread through one buffer.  One whose data is
already in the page cache (a read that must not wait, ``RWF_NOWAIT``, says so) is
copied at once: a few system calls per file and no hand-off.  One that is not is
kept open and the kernel is asked to start reading it (``POSIX_FADV_WILLNEED``);
the walker copies such files a batch at a time (``DEFER_FILES``, ``DEFER_BYTES``, at
the latest when it leaves their directory), so the disk sees many reads in flight
while the walker finds the data arriving.  A copy job runs under a CPU quota: this
spends about half the CPU that handing the files to threads by path did (a second
open, GIL hand-offs), which bounded a cold copy under one core.  Large files go to a
small thread pool in batches of one destination directory and are copied in the
kernel (``copy_file_range``, then ``sendfile``); so does everything on a filesystem
that refuses ``RWF_NOWAIT``.  ``incoming`` is new and
private to the job, so each file is written at its final name and removed if its
copy fails; nothing is synced (as ``cp``: durability is the storage's business and
the plugin reads the page cache).  Modes are 0644 for files and 0755 for dirs.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import operator
import os
import stat
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from agent.chrislinks import LINK_SUFFIX, link_target_parts

__all__ = ["DEFAULT_WORKERS", "CopyError", "CopyStats", "fetch_inputs"]

DEFAULT_WORKERS = 4  # uncached copies wait on the disk: a few threads keep it busy
MAX_IN_FLIGHT = 8  # batches queued ahead of the copiers (bounds the walker's lead)
BATCH_FILES = 128  # files handed to a copier at once (per-file hand-offs cost more than a copy)
INLINE_MAX = 256 << 10  # larger files always go to the pool (copy_file_range, no user copy)
DEFER_FILES = 64  # uncached small files read ahead before the walker copies them
DEFER_BYTES = 4 << 20  # ... and their bytes (bounds the page cache filled ahead)
MAX_LINK_SIZE = 4096
_CHUNK = 1 << 30
_OPEN_SRC = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_OPEN_DST = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
_WILLNEED = getattr(os, "POSIX_FADV_WILLNEED", None)
_NOWAIT_UNSUPPORTED = (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS)
_BY_NAME = operator.attrgetter("name")

Parts = tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _DirRef:
    """A directory by path, and by an open descriptor while the walk is in it (files
    are then opened by name relative to it)."""

    path: str
    fd: int | None = None

    def name(self, name: str) -> str:
        """What to open for ``name``: itself with the descriptor, else its path."""
        return name if self.fd is not None else os.path.join(self.path, name)


class CopyError(Exception):
    """The copy was refused or failed; the message names storage paths only."""


@dataclass
class CopyStats:
    files: int = 0  # regular files copied, link files excluded (pfcon's nfiles)
    bytes: int = 0
    links: int = 0  # ChRIS link files met (and copied)
    skipped: int = 0  # symlinks inside the storage and special files, not copied


def fetch_inputs(storebase: Path, input_dirs: list[Parts], output_dir: Parts, incoming: Path,
                 *, exclude: Parts = (), workers: int = DEFAULT_WORKERS) -> CopyStats:
    """Copy the files of ``input_dirs`` (and what their links reach) into ``incoming``.

    ``input_dirs``, ``output_dir`` and ``exclude`` are storage paths already split
    into checked components (no ``..``, not absolute).  ``incoming`` must exist and
    be empty.  Raises :class:`CopyError`.  Blocking.
    """
    fetch = _Fetch(storebase, output_dir, incoming, exclude)
    # threads start on the first batch only: a warm copy never starts one
    with ThreadPoolExecutor(max_workers=max(1, workers),
                            thread_name_prefix="pfleet-copy") as pool:
        fetch.pool = pool
        try:
            for prefix in input_dirs:
                fetch.collect(prefix)
                fetch.drain()  # so a later input dir's copy of a path wins, as in pfcon
        except BaseException:
            fetch.stopping = True  # queued batches need not be copied any more
            raise
        finally:
            fetch.drain()
            fetch.close_deferred()  # none left, unless the copy failed
    fetch.raise_failure()
    fetch.stats.files += fetch.pooled[0]
    fetch.stats.bytes += fetch.pooled[1]
    return fetch.stats


def _current_umask() -> int:
    """The process umask, read without changing it (os.umask would race other threads)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o777  # unknown: always set modes explicitly


def _show(parts: Parts) -> str:
    return "/".join(parts)


class _Fetch:
    def __init__(self, storebase: Path, output_dir: Parts, incoming: Path,
                 exclude: Parts) -> None:
        self.root = os.path.realpath(storebase)
        self.output_dir = output_dir
        self.incoming = os.fspath(incoming)
        self.exclude = exclude
        self.stats = CopyStats()  # the walking thread's; the pool counts in ``pooled``
        self.pooled = [0, 0]  # files, bytes copied by the pool (under _lock)
        self.stopping = False
        self.pool: ThreadPoolExecutor | None = None
        self._dirs: set[Parts] = {()}
        self._slots = threading.BoundedSemaphore(MAX_IN_FLIGHT)
        self._lock = threading.Lock()
        self._failures: list[str] = []
        self._pending: set[Future[None]] = set()
        self._batch: list[tuple[str, str, Parts]] = []  # (source path, name, storage path)
        self._batch_dir = ""
        self._deferred: list[_Deferred] = []  # uncached small files being read ahead
        self._deferred_bytes = 0
        self._umask = _current_umask()
        self._inline = bool(_RWF_NOWAIT)  # off when the filesystem refuses RWF_NOWAIT
        self._buf = bytearray(INLINE_MAX) if self._inline else bytearray()
        self._view = memoryview(self._buf)

    # ----------------------------------------------------------- collecting

    def collect(self, prefix: Parts) -> None:
        """One input dir: walk it, then every link target reached from it (BFS)."""
        # a set, each target's prefixes looked up: a list scanned per link made many
        # links quadratic (10,000 took half a minute)
        visited: set[Parts] = set()
        queue: collections.deque[tuple[Parts, Parts | None]] = collections.deque(
            [(prefix, None)])
        while queue:
            target, via = queue.popleft()
            if any(target[:i] in visited for i in range(1, len(target) + 1)):
                continue  # already collected (a loop, or inside a walked tree)
            visited.add(target)
            self._collect_target(target, prefix, via, queue, visited)

    def _collect_target(self, target: Parts, prefix: Parts, via: Parts | None,
                        queue: collections.deque[tuple[Parts, Parts | None]],
                        visited: set[Parts]) -> None:
        if self.exclude and target[:len(self.exclude)] == self.exclude:
            return
        kind = self._lookup(target)
        if kind == "file" and via is not None:
            self._take(target, prefix, queue)  # a link to one file brings that file
        if kind != "dir":
            return
        stack = [target]
        while stack:
            current = stack.pop()
            if self.exclude and current == self.exclude:
                continue
            if current != target and current in visited:
                continue  # an earlier target's walk copied it (to the same place)
            stack.extend(reversed(self._walk_dir(current, prefix, queue)))

    def _walk_dir(self, current: Parts, prefix: Parts,
                  queue: collections.deque[tuple[Parts, Parts | None]]) -> list[Parts]:
        """Copy the files of one directory; return its subdirectories.

        Files are opened relative to descriptors of their source and destination
        directories: a path walked again for every file cost a fifth of a warm copy.
        """
        src_dir = os.path.join(self.root, *current)
        try:
            src_fd = os.open(src_dir, _OPEN_DIR)
        except OSError as exc:
            raise CopyError(f"cannot read input directory {_show(current)!r}: "
                            f"{exc.strerror or exc}") from None
        # a file lands at its storage path less the input dir, when it is inside it
        dest = current[len(prefix):] if current[:len(prefix)] == prefix else current
        dst: _DirRef | None = None  # created with the first file (no empty dirs)
        subdirs: list[Parts] = []
        try:
            try:
                with os.scandir(src_fd) as it:
                    entries = sorted(it, key=_BY_NAME)
            except OSError as exc:
                raise CopyError(f"cannot read input directory {_show(current)!r}: "
                                f"{exc.strerror or exc}") from None
            source = _DirRef(src_dir, src_fd)
            for entry in entries:
                name = entry.name
                try:
                    if entry.is_file(follow_symlinks=False):
                        if name.endswith(LINK_SUFFIX):
                            self._link((*current, name), queue)
                        if dst is None:
                            dst = self._open_dest(dest)
                        self._file(source, name, dst, current)
                    elif entry.is_dir(follow_symlinks=False):
                        subdirs.append((*current, name))
                    elif entry.is_symlink():
                        self._symlink((*current, name))
                    else:
                        self.stats.skipped += 1  # fifo, socket, device
                except FileNotFoundError:
                    continue  # vanished while we looked
            self.copy_deferred()  # before their directories' descriptors close
        finally:
            self.close_deferred()  # none left, unless the walk failed
            os.close(src_fd)
            if dst is not None and dst.fd is not None:
                os.close(dst.fd)
        return subdirs

    def _open_dest(self, parts: Parts) -> _DirRef:
        path = self._ensure_dir(parts)
        try:
            return _DirRef(path, os.open(path, _OPEN_DIR))
        except OSError as exc:
            raise CopyError(f"cannot open {_show(parts)!r} in incoming: "
                            f"{exc.strerror or exc}") from None

    def _lookup(self, parts: Parts) -> str | None:
        """"dir", "file" or None (missing, or behind a symlink that stays inside)."""
        path = self.root
        for i, part in enumerate(parts):
            path = os.path.join(path, part)
            try:
                mode = os.lstat(path).st_mode
            except (FileNotFoundError, NotADirectoryError):
                return None
            except OSError as exc:
                raise CopyError(f"cannot read {_show(parts[:i + 1])!r}: "
                                f"{exc.strerror or exc}") from None
            if stat.S_ISLNK(mode):
                self._symlink(parts[:i + 1])
                return None
            if stat.S_ISDIR(mode):
                continue
            if stat.S_ISREG(mode) and i == len(parts) - 1:
                return "file"
            return None
        return "dir"

    def _symlink(self, rel: Parts) -> None:
        """A symlink is never followed: refuse one that leaves the storage, skip the rest."""
        resolved = os.path.realpath(os.path.join(self.root, *rel))
        if resolved != self.root and not resolved.startswith(self.root.rstrip("/") + "/"):
            raise CopyError(f"symbolic link {_show(rel)!r} points outside the storage root")
        self.stats.skipped += 1

    def _take(self, rel: Parts, prefix: Parts,
              queue: collections.deque[tuple[Parts, Parts | None]]) -> None:
        """One file reached by a link to it (files met in a walk go to :meth:`_file`)."""
        dest = rel[len(prefix):] if prefix and rel[:len(prefix)] == prefix else rel
        if not dest:
            return
        if rel[-1].endswith(LINK_SUFFIX):
            self._link(rel, queue)
        self._file(_DirRef(os.path.join(self.root, *rel[:-1])), rel[-1],
                   _DirRef(self._ensure_dir(dest[:-1])), rel[:-1])
        self.copy_deferred()

    def _link(self, rel: Parts, queue: collections.deque[tuple[Parts, Parts | None]]) -> None:
        """A ChRIS link file: check its target and queue it (the file is copied too)."""
        target = self._read_link(rel)
        if self.output_dir[:len(target)] == target:
            raise CopyError(
                f"ChRIS link {_show(rel)!r} points to {_show(target)!r}, which is the "
                f"job's output dir or one of its ancestors ({_show(self.output_dir)!r})")
        self.stats.links += 1
        queue.append((target, rel))

    def _read_link(self, rel: Parts) -> Parts:
        try:
            fd = os.open(os.path.join(self.root, *rel), _OPEN_SRC)
        except OSError as exc:
            raise CopyError(f"cannot read ChRIS link {_show(rel)!r}: "
                            f"{exc.strerror or exc}") from None
        with os.fdopen(fd, "rb") as fh:
            # swapped for a fifo or a device since the listing: a read could give
            # None or never end
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise CopyError(f"ChRIS link {_show(rel)!r} is not a regular file")
            raw = fh.read(MAX_LINK_SIZE + 1)
        if len(raw) > MAX_LINK_SIZE:
            raise CopyError(f"ChRIS link {_show(rel)!r} is larger than {MAX_LINK_SIZE} bytes")
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise CopyError(f"ChRIS link {_show(rel)!r} is not UTF-8 text") from None
        if not text:
            raise CopyError(f"ChRIS link {_show(rel)!r} is empty")
        target = link_target_parts(text)
        if not target:
            raise CopyError(f"ChRIS link {_show(rel)!r} has a target outside the storage "
                            f"root: {text[:200]!r}")
        return target

    # -------------------------------------------------------------- copying

    def _file(self, src: _DirRef, name: str, dst: _DirRef, parent: Parts) -> None:
        """Copy one small file here (now when its data is cached, else once it was read
        ahead); queue a large one for the pool."""
        if self._inline:
            try:
                size = self._copy_cached(src, name, dst, parent)
            except OSError as exc:
                raise CopyError(f"cannot copy {_show((*parent, name))!r}: "
                                f"{exc.strerror or exc}") from None
            if size is not None:
                self._count(name, size)
                return
        # the pool works by path: a batch outlives the walker's descriptors
        if self._batch and (self._batch_dir != dst.path or len(self._batch) >= BATCH_FILES):
            self.flush()
        if not self._batch:
            self.raise_failure()
            self._batch_dir = dst.path
        self._batch.append((os.path.join(src.path, name), name, (*parent, name)))

    def _count(self, name: str, size: int) -> None:
        if size >= 0 and not name.endswith(LINK_SUFFIX):
            self.stats.files += 1
            self.stats.bytes += size

    def _copy_cached(self, src: _DirRef, name: str, dst: _DirRef, parent: Parts) -> int | None:
        """Copy a small file whose data is all in the page cache through one buffer.

        Returns its size, -1 if it vanished or is not a regular file (or was kept
        open to be copied once read ahead), None when it is large (the pool copies
        it).
        """
        opened = _open_regular(src.name(name), src.fd)
        if opened is None:
            return -1
        sfd, size = opened
        deferred = False
        try:
            if size > INLINE_MAX:
                return None
            try:
                got = os.preadv(sfd, [self._buf], 0, _RWF_NOWAIT)
            except BlockingIOError:
                got = -1
            except OSError as exc:
                if exc.errno not in _NOWAIT_UNSUPPORTED:
                    raise
                self._inline = False  # this filesystem cannot say: the pool copies all
                return None
            if got > 0 and size == 0:
                return None  # a pseudo-file: the pool reads it to its end
            if got < size:  # not (all) cached
                if _WILLNEED is not None:
                    with contextlib.suppress(OSError):
                        os.posix_fadvise(sfd, 0, size, _WILLNEED)
                self._deferred.append(_Deferred(sfd, dst, name, parent, size))
                self._deferred_bytes += size
                deferred = True
                if (len(self._deferred) >= DEFER_FILES
                        or self._deferred_bytes >= DEFER_BYTES):
                    self.copy_deferred()
                return -1
            return self._store(dst, name, self._view[:size], -1, size)
        finally:
            if not deferred:
                os.close(sfd)

    def copy_deferred(self) -> None:
        """Copy the small files read ahead so far, in the order they were met."""
        while self._deferred:
            item = self._deferred.pop(0)
            try:
                size = self._store(item.dst, item.name, self._read_whole(item), -1, -1)
            except OSError as exc:
                raise CopyError(f"cannot copy {_show((*item.parent, item.name))!r}: "
                                f"{exc.strerror or exc}") from None
            finally:
                os.close(item.fd)
            self._count(item.name, size)
        self._deferred_bytes = 0

    def _read_whole(self, item: _Deferred) -> memoryview:
        """What a file held at its fstat (less if it shrank since)."""
        got = 0
        while got < item.size:
            n = os.preadv(item.fd, [self._view[got:item.size]], got)
            if n == 0:
                break
            got += n
        return self._view[:got]

    def close_deferred(self) -> None:
        for item in self._deferred:
            with contextlib.suppress(OSError):
                os.close(item.fd)
        self._deferred.clear()
        self._deferred_bytes = 0

    def flush(self) -> None:
        """Hand the current batch to the pool (blocks while MAX_IN_FLIGHT are queued)."""
        if not self._batch:
            return
        assert self.pool is not None
        batch, self._batch = self._batch, []
        self._slots.acquire()
        future = self.pool.submit(self._copy_batch, self._batch_dir, batch)
        with self._lock:
            self._pending.add(future)
        future.add_done_callback(self._done)

    def _done(self, future: Future[None]) -> None:
        self._slots.release()
        with self._lock:
            self._pending.discard(future)

    def drain(self) -> None:
        self.flush()
        with self._lock:
            pending = list(self._pending)
        for future in pending:
            future.exception()  # waits; failures are recorded by _copy_batch

    def raise_failure(self) -> None:
        with self._lock:
            if self._failures:
                raise CopyError(self._failures[0])

    def _ensure_dir(self, parts: Parts) -> str:
        """Create ``incoming/<parts>`` (and its parents) once; return its path."""
        for i in range(1, len(parts) + 1):
            sub = parts[:i]
            if sub in self._dirs:
                continue
            path = os.path.join(self.incoming, *sub)
            try:
                os.mkdir(path, 0o755)
                if self._umask & 0o755:
                    os.chmod(path, 0o755)
            except FileExistsError:
                if not stat.S_ISDIR(os.lstat(path).st_mode):
                    raise CopyError(f"input paths conflict at {_show(sub)!r}: both a file "
                                    "and a directory") from None
            self._dirs.add(sub)
        return os.path.join(self.incoming, *parts)

    def _copy_batch(self, dst_dir: str, batch: list[tuple[str, str, Parts]]) -> None:
        """Copy the files of one batch; stop at the first failure and record it."""
        files = size = 0
        for src, name, rel in batch:
            if self._failures or self.stopping:
                break  # the job fails anyway
            try:
                copied = self._copy(src, dst_dir, name)
            except OSError as exc:
                with self._lock:
                    self._failures.append(f"cannot copy {_show(rel)!r}: {exc.strerror or exc}")
                break
            if copied >= 0 and not name.endswith(LINK_SUFFIX):
                files += 1
                size += copied
        with self._lock:
            self.pooled[0] += files
            self.pooled[1] += size

    def _copy(self, src: str, dst_dir: str, name: str) -> int:
        """Copy one file in the kernel; return its size, -1 if it vanished or is no
        longer regular."""
        opened = _open_regular(src)
        if opened is None:
            return -1
        sfd, size = opened
        try:
            return self._store(_DirRef(dst_dir), name, None, sfd, size)
        finally:
            os.close(sfd)

    def _store(self, dst: _DirRef, name: str, data: memoryview | None, sfd: int,
               size: int) -> int:
        """Write ``data`` (or copy ``size`` bytes of ``sfd``) to ``name`` in ``dst``.

        ``incoming`` is fresh and private to this job, so the file is written at its
        final name and removed again if the copy fails.  Two inputs that map to one
        name (two input dirs holding the same path) replace each other whole, as
        pfcon's copies do: the second goes through a temporary name and a rename.
        """
        if data is not None:
            size = len(data)
        final = dst.name(name)
        try:
            target = final
            dfd = os.open(target, _OPEN_DST, 0o644, dir_fd=dst.fd)
        except FileExistsError:
            target = dst.name(f".pfleet-{threading.get_ident()}.part")
            dfd = os.open(target, (_OPEN_DST & ~os.O_EXCL) | os.O_TRUNC, 0o644, dir_fd=dst.fd)
        try:
            try:
                if data is None:
                    size = _copy_fd(sfd, dfd, size)
                else:
                    while data:
                        data = data[os.write(dfd, data):]
                if self._umask & 0o644:
                    os.fchmod(dfd, 0o644)
            finally:
                os.close(dfd)
            if target != final:
                os.rename(target, final, src_dir_fd=dst.fd, dst_dir_fd=dst.fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(target, dir_fd=dst.fd)
            raise
        return size


@dataclass(frozen=True, slots=True)
class _Deferred:
    """A small uncached file, open and being read ahead, to be copied by the walker."""

    fd: int
    dst: _DirRef
    name: str
    parent: Parts
    size: int  # at its fstat


def _open_regular(src: str, dir_fd: int | None = None) -> tuple[int, int] | None:
    """An open descriptor of ``src`` (relative to ``dir_fd`` if given) and its size, or
    None when it vanished or is not (any more) a regular file; the caller closes the
    descriptor."""
    try:
        fd = os.open(src, _OPEN_SRC, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        return None
    return fd, st.st_size


def _copy_fd(src: int, dst: int, size: int) -> int:
    """Copy ``size`` bytes (what fstat said) from src to dst, in the kernel when it can;
    return the bytes copied.  A file that reports size 0 (empty, or a pseudo-file)
    is read to its end instead."""
    total = 0
    try:
        while total < size:
            n = os.copy_file_range(src, dst, min(size - total, _CHUNK))
            if n == 0:
                return total  # shrank while we copied
            total += n
        if size:
            return total
    except OSError:
        if total:
            raise
    try:
        while True:
            n = os.sendfile(dst, src, None, _CHUNK)
            if n == 0:
                return total
            total += n
    except OSError:
        if total:
            raise
    while True:
        chunk = memoryview(os.read(src, 1 << 20))
        if not chunk:
            return total
        total += len(chunk)
        while chunk:
            chunk = chunk[os.write(dst, chunk):]
