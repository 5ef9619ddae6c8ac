"""Built-in data operations (DESIGN §3): the work pfcon ran in op containers.

They run on the agent, next to the storeBase, with no image to pull (the agent
starts each one in a child process with the job's limits, see
``agent.op_runner``).  The controller describes an operation with a small dict,
the ``op`` of the job spec:

``{"op": "copy", "storage": "fslink"|"swift", "key_dir": "key-<jid>", "input_dirs": [...],
"output_dir": "...", "swift": {...}}``
    stage the inputs into ``key-<jid>/incoming`` (pfcon-api.md §1.6, §3.4-§3.6):
    the fetch phase (``agent.ops_fslink`` or ``agent.ops_swift``), then the
    expansion of ChRIS links (``agent.chrislinks``), then ``outgoing/`` is created.
``{"op": "upload", "storage": "swift", "key_dir", "job_output_path", "swift": {...}}``
    push ``key-<jid>/outgoing`` to object storage under ``job_output_path`` (§1.7).
``{"op": "delete", "key_dir"}``
    remove ``key-<jid>`` entirely (§1.8).

Every operation is idempotent (a copy clears and rebuilds ``incoming``; an upload
skips objects already there; a delete of nothing succeeds), so the agent simply
runs it again after a restart.  Every path taken from the dict is checked before
anything is touched: nothing outside the storeBase is ever read or written, and a
bad dict fails with a clear message.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import stat
from pathlib import Path
from typing import Any

from agent.chrislinks import LinkError, expand_links
from agent.fstree import remove_tree
from agent.ops_fslink import CopyError, fetch_inputs

__all__ = ["KEY_DIR", "OpError", "copy_inputs", "delete_key_dir", "run_op", "small_delete",
           "storage_parts", "upload_outputs"]

log = logging.getLogger("pfleet.agent.ops")

KEY_DIR = re.compile(r"key-[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
COPY_STORAGES = ("fslink", "swift")
UPLOAD_STORAGES = ("swift",)
MIB = 1024 * 1024


class OpError(Exception):
    """The operation failed; the message is reported with the job."""


def run_op(op: dict[str, Any], storebase: Path) -> str:
    """Run one operation (blocking); return its log text, raise :class:`OpError`."""
    if not isinstance(op, dict):
        raise OpError("operation: expected an object")
    kind = op.get("op")
    if kind == "delete":
        return delete_key_dir(storebase, _key_name(op))
    if kind == "copy":
        return copy_inputs(op, storebase)
    if kind == "upload":
        return upload_outputs(op, storebase)
    raise OpError(f"unknown operation {kind!r}")


# ------------------------------------------------------------------ validation


def storage_parts(value: Any, field: str) -> tuple[str, ...]:
    """A storage path from an op dict, as checked components.

    ``/`` is stripped at both ends (as pfcon does) and empty and ``.`` components
    are dropped; a value that is not a string, holds a NUL byte or a ``..``
    component is refused.  ``()`` is the storage root.
    """
    if not isinstance(value, str):
        raise OpError(f"{field}: expected a string")
    if "\x00" in value:
        raise OpError(f"{field}: invalid path (NUL byte)")
    parts = tuple(p for p in value.split("/") if p not in ("", "."))
    if ".." in parts:
        raise OpError(f"{field}: path {value!r} must not contain '..'")
    return parts


def _key_name(op: dict[str, Any]) -> str:
    key = op.get("key_dir")
    if not isinstance(key, str) or not KEY_DIR.fullmatch(key):
        raise OpError(f"key_dir: {key!r} is not a job key directory")
    return key


def _storage(op: dict[str, Any], allowed: tuple[str, ...]) -> str:
    storage = op.get("storage")
    if storage not in allowed:
        raise OpError(f"storage: {op.get('op')} does not support storage {storage!r} "
                      f"(supported: {', '.join(allowed)})")
    return str(storage)


def _key_path(storebase: Path, key: str, *, create: bool) -> Path:
    path = storebase / key
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        if not create:
            raise OpError(f"{key} does not exist") from None
        os.mkdir(path, 0o755)
        return path
    if not stat.S_ISDIR(mode):
        raise OpError(f"{key} is not a directory")
    return path


def _fresh_dir(path: Path) -> None:
    """Make ``path`` an empty directory (0755), whatever was there."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISDIR(os.lstat(path).st_mode):
            remove_tree(path)
        else:
            os.unlink(path)
    os.mkdir(path, 0o755)
    os.chmod(path, 0o755)


def _ensure_outgoing(key: Path) -> None:
    """``outgoing/`` as pfcon's copy leaves it: world-writable, since the plugin may
    run as any uid.  An existing one is left alone (it may hold outputs)."""
    outgoing = key / "outgoing"
    try:
        os.mkdir(outgoing, 0o777)
    except FileExistsError:
        return
    os.chmod(outgoing, 0o777)


def _swift() -> Any:
    try:
        from agent import ops_swift
    except ImportError as exc:
        raise OpError(f"swift storage is not available on this agent: {exc}") from None
    return ops_swift


def _swift_settings(ops_swift: Any, op: dict[str, Any]) -> Any:
    creds = op.get("swift")
    if not isinstance(creds, dict):
        raise OpError("swift: expected an object with the Swift credentials")
    try:
        return ops_swift.SwiftSettings.from_op(creds)
    except (ops_swift.SwiftOpError, ValueError, KeyError, TypeError) as exc:
        raise OpError(f"swift: {exc}") from None


# -------------------------------------------------------------------- copy


def copy_inputs(op: dict[str, Any], storebase: Path) -> str:
    """Stage a job's inputs into ``key-<jid>/incoming`` (fetch, expand, outgoing)."""
    storage = _storage(op, COPY_STORAGES)
    key_name = _key_name(op)
    raw_dirs = op.get("input_dirs", [])
    if not isinstance(raw_dirs, list):
        raise OpError("input_dirs: expected a list of paths")
    input_dirs = [storage_parts(d, "input_dirs") for d in raw_dirs]
    if any(not d for d in input_dirs):
        raise OpError("input_dirs: an input dir names the storage root: refusing to copy "
                      "the whole storage")
    output_dir = storage_parts(op.get("output_dir"), "output_dir")
    if not output_dir:
        raise OpError("output_dir: must name a directory below the storage root")
    swift = _swift() if storage == "swift" else None
    settings = _swift_settings(swift, op) if swift is not None else None

    key = _key_path(storebase, key_name, create=True)
    incoming = key / "incoming"
    _fresh_dir(incoming)
    if swift is not None:
        try:
            count = swift.copy_from_swift(settings, list(raw_dirs), "/".join(output_dir),
                                          incoming)
        except swift.SwiftOpError as exc:
            raise OpError(str(exc)) from None
        text = f"copied {count} files from {len(input_dirs)} input dirs\n"
        may_hold_links = True  # swift's fetch does not say: its tree is always walked
    else:
        try:
            stats = fetch_inputs(storebase, input_dirs, output_dir, incoming,
                                 exclude=(key_name,))
        except CopyError as exc:
            raise OpError(str(exc)) from None
        text = (f"copied {stats.files} files ({stats.bytes / MIB:.1f} MiB) "
                f"from {len(input_dirs)} input dirs\n")
        if stats.links:
            text += f"followed {stats.links} ChRIS links\n"
        if stats.skipped:
            text += f"skipped {stats.skipped} symbolic links and special files\n"
        # a fetch that met no link file copied none: no walk of the whole tree for nothing
        may_hold_links = stats.links > 0
    if may_hold_links:
        try:
            expand_links(incoming, field="")
        except LinkError as exc:
            raise OpError(str(exc)) from None
    _ensure_outgoing(key)
    log.info("copy done key=%s storage=%s %s", key_name, storage, text.strip().replace("\n", "; "))
    return text


# ------------------------------------------------------------------ upload


def upload_outputs(op: dict[str, Any], storebase: Path) -> str:
    """Upload ``key-<jid>/outgoing`` to object storage under ``job_output_path``."""
    _storage(op, UPLOAD_STORAGES)
    key_name = _key_name(op)
    job_output_path = storage_parts(op.get("job_output_path"), "job_output_path")
    if not job_output_path:
        raise OpError("job_output_path: must not be empty")
    swift = _swift()
    settings = _swift_settings(swift, op)
    key = _key_path(storebase, key_name, create=False)
    outgoing = key / "outgoing"
    try:
        mode = os.lstat(outgoing).st_mode
    except FileNotFoundError:
        return "uploaded 0, skipped 0 (no outgoing directory)\n"
    if not stat.S_ISDIR(mode):
        raise OpError(f"{key_name}/outgoing is not a directory")
    try:
        uploaded, skipped = swift.upload_to_swift(settings, outgoing, "/".join(job_output_path))
    except swift.SwiftOpError as exc:
        raise OpError(str(exc)) from None
    log.info("upload done key=%s uploaded=%s skipped=%s", key_name, uploaded, skipped)
    return f"uploaded {uploaded}, skipped {skipped}\n"


# ------------------------------------------------------------------ delete


def delete_key_dir(storebase: Path, key_dir: str) -> str:
    """Remove ``storeBase/key-<jid>`` and everything in it."""
    if not KEY_DIR.fullmatch(key_dir):
        raise OpError(f"refusing to delete {key_dir!r}: not a job key directory")
    target = storebase / key_dir
    if target.is_symlink():
        raise OpError(f"refusing to delete {key_dir!r}: it is a symbolic link")
    if not target.exists():
        return f"{key_dir} already absent\n"
    errors: list[str] = []
    remove_tree(target, lambda path, exc: errors.append(
        f"{os.path.relpath(path, storebase)}: {exc.strerror or exc}"))
    if errors:
        raise OpError("could not delete everything: " + "; ".join(errors[:5]))
    log.info("deleted key dir path=%s", target)
    return f"deleted {key_dir}\n"


def small_delete(op: Any, storebase: Path, max_entries: int) -> bool:
    """Whether ``op`` is a delete of a key dir holding at most ``max_entries``
    entries (or of none): a few syscalls, cheap enough to run without a worker.
    Counting stops at the bound and follows no link."""
    if not isinstance(op, dict) or op.get("op") != "delete":
        return False
    key = op.get("key_dir")
    if not isinstance(key, str) or not KEY_DIR.fullmatch(key):
        return False  # the worker reports what is wrong with it
    pending = [os.fspath(storebase / key)]
    seen = 0
    while pending:
        try:
            with os.scandir(pending.pop()) as entries:
                for entry in entries:
                    seen += 1
                    if seen > max_entries:
                        return False
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(entry.path)
        except (FileNotFoundError, NotADirectoryError):
            continue  # nothing there to count: the delete says what it found
        except OSError:
            return False
    return True
