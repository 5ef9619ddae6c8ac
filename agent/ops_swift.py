"""The Swift side of the built-in copy and upload operations (pfcon-api.md §3.5, §3.6).

Pure blocking functions, run inside an operation worker (never on an event loop).
They talk to Swift with python-swiftclient (v1 auth, one container holds everything,
every call retried), stream every object to or from disk in chunks, and turn every
swiftclient or network failure into a :class:`SwiftOpError` whose message is safe to
report with the job (it never carries the key).

* :func:`copy_from_swift` is the copy operation's fetch phase: every object under
  each input prefix, and under the targets of the ChRIS links found on the way, lands
  in ``incoming/``; the link files are kept for the expansion phase that follows
  (``agent.chrislinks.expand_links``).
* :func:`upload_to_swift` pushes ``outgoing/`` to ``<job_output_path>/...``, skipping
  objects that already exist, so a re-run is idempotent.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import stat
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import swiftclient
import urllib3.exceptions
from requests.exceptions import RequestException
from swiftclient.exceptions import ClientException
from swiftclient.utils import LengthWrapper

from agent.chrislinks import LINK_SUFFIX, link_target_parts

__all__ = ["SwiftOpError", "SwiftSettings", "copy_from_swift", "upload_to_swift"]

log = logging.getLogger("pfleet.agent.ops.swift")

RETRIES = 5  # as pfcon: every call retried up to 5 times
STARTING_BACKOFF = 0.4
MAX_BACKOFF = 3.2
TIMEOUT = 60.0  # seconds without progress on one request
CHUNK_SIZE = 1 << 20  # download chunk; memory per download is about this
MAX_LINK_SIZE = 4096  # a .chrislink holds one storage path
MAX_LINK_TARGETS = 10_000  # prefixes followed through links, per input dir
FILE_MODE = 0o644  # plugins run under other uids and only need to read

T = TypeVar("T")


class SwiftOpError(Exception):
    """A copy or upload failed; the message is clear and safe to show a client."""


@dataclass(frozen=True)
class SwiftSettings:
    """Where the objects are: a v1 auth endpoint, credentials and the one container."""

    auth_url: str
    username: str
    key: str = field(repr=False)
    container: str
    retries: int = RETRIES
    starting_backoff: float = STARTING_BACKOFF
    timeout: float = TIMEOUT

    @classmethod
    def from_op(cls, data: dict[str, Any]) -> SwiftSettings:
        """From an operation's ``{"auth_url", "username", "key", "container"}``."""
        values = {}
        for name in ("auth_url", "username", "key", "container"):
            value = data.get(name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"swift settings: {name!r} is missing or empty")
            values[name] = value.strip() if name == "auth_url" else value
        url = urlsplit(values["auth_url"])
        if url.scheme not in ("http", "https") or not url.netloc:
            raise ValueError("swift settings: 'auth_url' must be an http(s) URL")
        if "/" in values["container"]:
            raise ValueError("swift settings: 'container' must not contain '/'")
        return cls(**values)


# -- the edge: swiftclient and network failures become SwiftOpError ------------------------

_NETWORK_ERRORS = (RequestException, OSError, urllib3.exceptions.HTTPError,
                   http.client.HTTPException)


@contextlib.contextmanager
def _edge(settings: SwiftSettings, doing: str, not_found: str | None = None) -> Iterator[None]:
    """Translate what swiftclient raises while ``doing`` something."""
    try:
        yield
    except ClientException as exc:
        raise SwiftOpError(_describe(settings, doing, exc, not_found)) from exc
    except _NETWORK_ERRORS as exc:
        raise SwiftOpError(f"cannot reach Swift at {settings.auth_url} while {doing} "
                           f"({type(exc).__name__})") from exc


def _describe(settings: SwiftSettings, doing: str, exc: ClientException,
              not_found: str | None) -> str:
    status = exc.http_status
    if status == 401:
        return (f"Swift authentication failed for user {settings.username!r} "
                f"at {settings.auth_url}")
    if status == 403:
        return (f"Swift refused user {settings.username!r} access to container "
                f"{settings.container!r}")
    if status == 404:
        return not_found or f"Swift container {settings.container!r} does not exist"
    if status is not None:
        reason = f" {exc.http_reason}" if exc.http_reason else ""
        return f"Swift failed while {doing}: HTTP {status}{reason}"
    return f"Swift failed while {doing}: {str(exc.msg)[:200]}"


class _Connections:
    """One authenticated connection for the calling thread, one more per worker thread
    (a swiftclient Connection is not thread-safe); workers reuse the first token."""

    def __init__(self, settings: SwiftSettings) -> None:
        self.settings = settings
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: list[swiftclient.Connection] = []
        self.main = self._new()

    def _new(self, **preauth: Any) -> swiftclient.Connection:
        s = self.settings
        conn = swiftclient.Connection(
            authurl=s.auth_url, user=s.username, key=s.key, auth_version="1",
            retries=s.retries, starting_backoff=s.starting_backoff,
            max_backoff=max(MAX_BACKOFF, s.starting_backoff), timeout=s.timeout, **preauth)
        with self._lock:
            self._all.append(conn)
        return conn

    def check_container(self) -> None:
        """Log in and make sure the container is there (clear errors for both)."""
        with _edge(self.settings, f"checking container {self.settings.container!r}"):
            self.main.head_container(self.settings.container)

    def get(self) -> swiftclient.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._new(preauthurl=self.main.url, preauthtoken=self.main.token)
            self._local.conn = conn
        return conn

    def listing(self, prefix: str) -> list[dict[str, Any]]:
        """Every object whose name starts with ``prefix`` (paginated by swiftclient)."""
        with _edge(self.settings, f"listing {prefix!r}"):
            _, objects = self.main.get_container(self.settings.container, prefix=prefix,
                                                 full_listing=True)
        return list(objects)

    def close(self) -> None:
        with self._lock:
            conns, self._all = self._all, []
        for conn in conns:
            with contextlib.suppress(Exception):
                conn.close()


def _parallel(fn: Callable[[T], None], items: Iterable[T], workers: int) -> None:
    """Run ``fn`` over ``items`` on ``workers`` threads, at most 2*workers queued; the
    first exception cancels what has not started and is raised."""
    pending: set[Future[None]] = set()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="swift-op") as pool:
        try:
            for item in items:
                if len(pending) >= 2 * workers:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        future.result()
                pending.add(pool.submit(fn, item))
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    future.result()
        except BaseException:
            for future in pending:
                future.cancel()
            raise


def _check_workers(workers: int) -> None:
    if not isinstance(workers, int) or workers < 1:
        raise ValueError("workers must be an integer >= 1")


# -- copy (fetch phase) ------------------------------------------------------------------


@dataclass
class _Fetch:
    """What one copy writes: link files (already written) and files to download."""

    files: dict[tuple[str, ...], tuple[str, int]] = field(default_factory=dict)  # -> name, size
    links: set[tuple[str, ...]] = field(default_factory=set)
    dirs: set[tuple[str, ...]] = field(default_factory=set)


def copy_from_swift(settings: SwiftSettings, input_dirs: list[str], output_dir: str,
                    incoming: Path, *, workers: int = 4) -> int:
    """Fetch every object under each of ``input_dirs`` into ``incoming`` (§3.5, §3.6).

    An input prefix (``/`` stripped at both ends) matches object names as a string
    prefix, as in pfcon (``a/b`` also matches ``a/bc/x``); each object lands at
    ``incoming/<name with the prefix removed once>`` (an object named exactly like the
    prefix lands at its last component). ``*.chrislink`` objects are written like any
    file and their targets are fetched too, recursively (a target matches itself and
    the names under ``<target>/``); files reached through a link outside the prefix
    land at their full name. A link is refused when its target is absolute, contains
    ``..``, or is the job's ``output_dir`` or one of its ancestors. Downloads are
    streamed in chunks on ``workers`` threads, each file written under a temporary
    name and renamed; a name that would land outside ``incoming`` is refused.

    Returns the number of files written, link files excluded.
    """
    _check_workers(workers)
    out_parts = link_target_parts(output_dir.strip("/")) if output_dir.strip("/") else ()
    if output_dir.strip("/") and not out_parts:
        raise SwiftOpError(f"output dir {output_dir!r} is not a valid storage path")
    prefixes = []
    for input_dir in input_dirs:
        prefix = input_dir.strip("/")
        if not prefix:
            raise SwiftOpError("an input dir is empty: refusing to copy the whole container")
        if _dot_segments(prefix):
            raise SwiftOpError(f"input dir {input_dir!r} has '.' or '..' in it")
        prefixes.append(prefix)
    if incoming.is_symlink():
        raise SwiftOpError("incoming/ is a symbolic link")
    incoming.mkdir(parents=True, exist_ok=True)
    conns = _Connections(settings)
    try:
        conns.check_container()
        fetch = _Fetch()
        for prefix in prefixes:
            _collect(conns, prefix, out_parts, incoming, fetch)
        _check_conflicts(fetch)
        for parts in sorted(fetch.dirs):
            _makedirs(incoming, parts)

        def download(item: tuple[tuple[str, ...], tuple[str, int]]) -> None:
            parts, (name, _size) = item
            _download(conns, incoming, parts, name)

        _parallel(download, sorted(fetch.files.items()), workers)
    finally:
        conns.close()
    log.info("copied from swift container=%s files=%d links=%d", settings.container,
             len(fetch.files), len(fetch.links))
    return len(fetch.files)


def _collect(conns: _Connections, prefix: str, out_parts: tuple[str, ...], incoming: Path,
             fetch: _Fetch) -> None:
    """List ``prefix`` and, through links, their targets; write the links themselves."""
    visited: set[str] = set()
    queue: deque[tuple[str, bool]] = deque([(prefix, False)])
    while queue:
        base, through_link = queue.popleft()
        if base in visited:
            continue
        visited.add(base)
        if len(visited) > MAX_LINK_TARGETS:
            raise SwiftOpError(f"more than {MAX_LINK_TARGETS} ChRIS link targets under "
                               f"{prefix!r}")
        for obj in conns.listing(base):
            name = str(obj.get("name", ""))
            if through_link and not (name == base or name.startswith(base + "/")):
                continue
            rel = name[len(prefix):] if name.startswith(prefix) else name
            if name.endswith("/"):  # a pseudo-directory marker
                fetch.dirs.add(_local_parts(name, rel, directory=True))
                continue
            parts = _local_parts(name, rel)
            if name.endswith(LINK_SUFFIX):
                if parts in fetch.links:
                    continue
                target, raw = _read_link(conns, name, int(obj.get("bytes", 0)), out_parts)
                _write_file(incoming, parts, [raw], name)
                fetch.links.add(parts)
                queue.append((target, True))
            else:
                fetch.files.setdefault(parts, (name, int(obj.get("bytes", 0))))


def _dot_segments(path: str) -> bool:
    """Whether ``path`` has a ``.`` or ``..`` segment: the HTTP layer would resolve them
    and reach another object (or container) than the one named."""
    return any(p in (".", "..") for p in path.split("/"))


def _local_parts(name: str, rel: str, *, directory: bool = False) -> tuple[str, ...]:
    """Where object ``name`` lands under incoming/ (``rel``: its name minus the prefix)."""
    if _dot_segments(name) or "\x00" in name:
        raise SwiftOpError(f"object {name!r} has '.' or '..' in its name: refusing it")
    raw = rel.split("/")  # a string prefix can cut a segment: 'a/b' + '../x' from 'a/b../x'
    if ".." in raw:
        raise SwiftOpError(f"object {name!r} would be written outside incoming/")
    parts = tuple(p for p in raw if p not in ("", "."))
    if not parts and not directory:  # the prefix names this very object
        parts = tuple(p for p in name.split("/") if p)[-1:]
        if not parts:
            raise SwiftOpError(f"object {name!r} has no file name")
    return parts


def _read_link(conns: _Connections, name: str, size: int,
               out_parts: tuple[str, ...]) -> tuple[str, bytes]:
    """The validated target of link object ``name`` (a normalised storage path) and the
    object's content."""
    settings = conns.settings
    if size > MAX_LINK_SIZE:
        raise SwiftOpError(f"ChRIS link {name!r} is too large ({size} bytes)")
    data = bytearray()
    with _edge(settings, f"reading ChRIS link {name!r}",
               not_found=f"ChRIS link {name!r} vanished during the copy"):
        _, body = conns.main.get_object(settings.container, name,
                                        resp_chunk_size=MAX_LINK_SIZE + 1)
        try:
            for chunk in body:
                data += chunk
                if len(data) > MAX_LINK_SIZE:
                    raise SwiftOpError(f"ChRIS link {name!r} is too large")
        finally:
            body.close()
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise SwiftOpError(f"ChRIS link {name!r} is not UTF-8 text") from None
    parts = link_target_parts(text)
    if not text or not parts:
        raise SwiftOpError(f"ChRIS link {name!r} has an invalid target {text[:200]!r} "
                           "(empty, absolute or with '..')")
    if out_parts and out_parts[:len(parts)] == parts:
        raise SwiftOpError(f"ChRIS link {name!r} points to {text!r}: the job's output dir "
                           "or one of its ancestors")
    return "/".join(parts), bytes(data)


def _check_conflicts(fetch: _Fetch) -> None:
    """No path may be both a file and a directory."""
    files = set(fetch.files) | fetch.links
    for parts in sorted(files | fetch.dirs):
        for i in range(1, len(parts)):
            if parts[:i] in files:
                raise SwiftOpError(f"object names conflict: {'/'.join(parts[:i])!r} is "
                                   "both a file and a directory")


def _makedirs(incoming: Path, parts: tuple[str, ...]) -> Path:
    """``incoming/<parts>`` as real directories (never through a symbolic link)."""
    path = incoming
    for part in parts:
        path = path / part
        try:
            path.mkdir()
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                raise SwiftOpError(f"cannot write under {str(path.relative_to(incoming))!r}:"
                                   " it exists and is not a directory") from None
        except OSError as exc:
            raise SwiftOpError(f"cannot create {str(path.relative_to(incoming))!r}: "
                               f"{exc.strerror}") from None
    return path


def _write_file(incoming: Path, parts: tuple[str, ...], chunks: Iterable[bytes],
                name: str) -> tuple[int, str]:
    """Write ``chunks`` to ``incoming/<parts>`` atomically; return (size, md5 hex)."""
    rel = "/".join(parts)
    parent = _makedirs(incoming, parts[:-1])
    try:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=".pfleet-", suffix=".part")
    except OSError as exc:
        raise SwiftOpError(f"cannot write {rel!r}: {exc.strerror}") from None
    md5 = hashlib.md5(usedforsecurity=False)
    size = 0
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                try:
                    f.write(chunk)
                except OSError as exc:
                    raise SwiftOpError(f"cannot write {rel!r}: {exc.strerror}") from None
                md5.update(chunk)
                size += len(chunk)
            os.fchmod(f.fileno(), FILE_MODE)
        try:
            os.replace(tmp, parent / parts[-1])
        except OSError as exc:
            raise SwiftOpError(f"cannot write {rel!r}: {exc.strerror}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return size, md5.hexdigest()


def _download(conns: _Connections, incoming: Path, parts: tuple[str, ...], name: str) -> None:
    settings = conns.settings
    doing = f"downloading {name!r}"
    gone = f"object {name!r} vanished during the copy"
    with _edge(settings, doing, not_found=gone):
        headers, body = conns.get().get_object(settings.container, name,
                                               resp_chunk_size=CHUNK_SIZE)

    def chunks() -> Iterator[bytes]:
        it = iter(body)
        while True:
            with _edge(settings, doing, not_found=gone):
                chunk = next(it, None)
            if chunk is None:
                return
            yield chunk

    try:
        size, md5 = _write_file(incoming, parts, chunks(), name)
    finally:
        body.close()
    expected = headers.get("content-length")
    if expected is not None and int(expected) != size:
        raise SwiftOpError(f"download of {name!r} was incomplete ({size} of {expected} bytes)")
    etag = headers.get("etag", "").strip('"')
    large = "x-object-manifest" in headers or "x-static-large-object" in headers
    if etag and not large and etag != md5:
        raise SwiftOpError(f"download of {name!r} was corrupted (checksum mismatch)")


# -- upload ------------------------------------------------------------------------------


def upload_to_swift(settings: SwiftSettings, outgoing: Path, job_output_path: str,
                    *, workers: int = 4) -> tuple[int, int]:
    """Upload every regular file under ``outgoing`` to ``<job_output_path>/<rel path>``.

    Symbolic links (files or directories, never followed) and ``*.chrislink`` files are
    skipped, as are files whose object already exists (so a re-run uploads nothing
    twice). Each file is streamed with its length and checked against the ETag Swift
    answers. Returns ``(uploaded, skipped)`` (skipped: objects that already existed).
    """
    _check_workers(workers)
    base = job_output_path.strip("/")
    if not base:
        raise SwiftOpError("job_output_path is empty")
    if _dot_segments(base):
        raise SwiftOpError(f"job_output_path {job_output_path!r} has '.' or '..' in it")
    if outgoing.is_symlink():
        raise SwiftOpError("outgoing/ is a symbolic link")
    conns = _Connections(settings)
    uploaded = skipped = 0
    try:
        conns.check_container()
        existing = {str(o.get("name", "")) for o in conns.listing(base + "/")}
        todo: list[tuple[str, Path]] = []
        for rel, path in _outgoing_files(outgoing):
            name = f"{base}/{rel}"
            if name in existing:
                skipped += 1
            else:
                todo.append((name, path))

        def upload(item: tuple[str, Path]) -> None:
            _upload(conns, *item)

        _parallel(upload, todo, workers)
        uploaded = len(todo)
    finally:
        conns.close()
    log.info("uploaded to swift container=%s prefix=%s uploaded=%d skipped=%d",
             settings.container, base, uploaded, skipped)
    return uploaded, skipped


def _outgoing_files(outgoing: Path) -> Iterator[tuple[str, Path]]:
    """(relative POSIX path, path) of every regular, non-link file, in a stable order."""
    if not outgoing.is_dir():
        log.warning("nothing to upload: %s is not a directory", outgoing)
        return

    # an explicit stack, not os.walk: Python 3.11's recurses once per level, and a
    # plugin can write a tree deep enough to raise RecursionError
    stack = [os.fspath(outgoing)]
    while stack:
        top = stack.pop()
        try:
            with os.scandir(top) as it:
                entries = sorted(it, key=lambda e: e.name)
            subdirs = [e.path for e in entries if e.is_dir(follow_symlinks=False)]
            files = [e for e in entries if not e.name.endswith(LINK_SUFFIX)
                     and e.is_file(follow_symlinks=False)]  # no symlink, fifo, device
        except OSError as exc:
            raise SwiftOpError(f"cannot read the outputs: {exc.strerror}") from None
        stack.extend(reversed(subdirs))
        for entry in files:
            path = Path(entry.path)
            rel = path.relative_to(outgoing).as_posix()
            try:
                rel.encode("utf-8")
            except UnicodeEncodeError:
                raise SwiftOpError(f"output file name {rel!r} is not valid UTF-8") from None
            yield rel, path


def _upload(conns: _Connections, name: str, path: Path) -> None:
    settings = conns.settings
    try:
        # O_NONBLOCK: a file swapped for a fifo since the listing must not block the open
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise SwiftOpError(f"cannot read output {name!r}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SwiftOpError(f"output {name!r} is not a regular file")
        body = LengthWrapper(f, st.st_size, md5=True)
        with _edge(settings, f"uploading {name!r}"):
            etag = conns.get().put_object(settings.container, name, body,
                                          content_length=st.st_size)
    if etag and etag.strip('"') != body.get_md5sum():
        raise SwiftOpError(f"upload of {name!r} was corrupted (checksum mismatch)")
