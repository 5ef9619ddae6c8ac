"""What each storage mode means for a job: mounts, the plugin's data step, the
built-in operations of copy/upload/delete jobs, and output listings.

``zipfile`` (out of network): inputs arrive as a zip (``zipmode``), outputs leave as
one.  In-network modes share CUBE's storage: ``filesystem`` mounts CUBE's dirs
directly (only ``input_dirs[0]``, read-only, and ``output_dir``), ``fslink`` copies
inputs into ``key-<jid>/incoming`` (following ChRIS links) and writes outputs straight
into ``output_dir``, ``swift`` copies inputs from object storage and uploads outputs
back from ``key-<jid>/outgoing``.  All functions here are blocking (run them in an
executor) and every client path goes through ``safe_join``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

from agent.fstree import first_link
from agent.protocol import Mount
from controller.config import Config
from controller.storage.outputs import list_outputs
from controller.storage.paths import StorageError, key_dir, safe_join


def strip_path(path: str) -> str:
    """pfcon strips '/' on both ends of storage paths."""
    return path.strip("/")


def checked(storebase: Path, path: str, field: str) -> str:
    """The stripped relative path after checking it stays inside the storeBase."""
    rel = strip_path(path)
    safe_join(storebase, rel, field=field)
    return rel


def plugin_mounts(storage: str, jid: str, input_dir: str | None,
                  output_dir: str | None) -> list[Mount]:
    """pfcon-api.md §4.2: sources relative to the storeBase root."""
    key = f"key-{jid}"
    if storage == "filesystem":
        return [Mount(input_dir or "", "/share/incoming", True),
                Mount(output_dir or "", "/share/outgoing", False)]
    if storage == "fslink":
        return [Mount(f"{key}/incoming", "/share/incoming", True),
                Mount(output_dir or "", "/share/outgoing", False)]
    return [Mount(f"{key}/incoming", "/share/incoming", True),
            Mount(f"{key}/outgoing", "/share/outgoing", False)]


def count_input_files(storebase: Path, input_dir: str) -> int:
    """``filesystem`` mode's ``nfiles``: what ``os.walk`` counts as files under the
    input dir (0 if absent), walked without recursion (a plugin's tree may be deep)."""
    root = safe_join(storebase, input_dir, field="input_dirs")
    total = 0
    pending = [os.fspath(root)]
    while pending:
        try:
            with os.scandir(pending.pop()) as entries:
                for entry in entries:
                    if not entry.is_dir():
                        total += 1
                    elif not entry.is_symlink():
                        pending.append(entry.path)
        except FileNotFoundError:
            continue
        except OSError:
            raise StorageError("input_dirs: Error accessing files from shared filesystem",
                               field="input_dirs") from None
    return total


def prepare_swift_outputs(storebase: Path, jid: str) -> None:
    """``swift`` mode: the plugin writes into ``key-<jid>/outgoing`` (world-writable, as
    pfcon makes it, since the plugin may run as any uid)."""
    outgoing = key_dir(storebase, jid) / "outgoing"
    outgoing.mkdir(parents=True, exist_ok=True)
    outgoing.chmod(0o777)


def write_params(storebase: Path, jid: str, filename: str, params: dict[str, Any],
                 *, create: bool) -> None:
    """Write ``key-<jid>/<filename>`` (pfcon's job_params.json etc.) atomically."""
    key = key_dir(storebase, jid)
    if create:
        (key / "incoming").mkdir(parents=True, exist_ok=True)
    elif not key.is_dir():
        raise StorageError(f"no data for job {jid}: key-{jid} does not exist (was it deleted?)",
                           status=409)
    tmp = key / f".{filename}.tmp"
    tmp.write_text(json.dumps(params))
    os.replace(tmp, key / filename)


def swift_credentials(config: Config) -> dict[str, str]:
    return {"auth_url": config.swift_auth_url, "username": config.swift_username,
            "key": config.swift_key, "container": config.swift_container}


def copy_op(config: Config, jid: str, input_dirs: list[str], output_dir: str) -> dict[str, Any]:
    op: dict[str, Any] = {"op": "copy", "storage": config.storage_env, "key_dir": f"key-{jid}",
                          "input_dirs": input_dirs, "output_dir": output_dir}
    if config.storage_env == "swift":
        op["swift"] = swift_credentials(config)
    return op


def upload_op(config: Config, jid: str, job_output_path: str) -> dict[str, Any]:
    return {"op": "upload", "storage": config.storage_env, "key_dir": f"key-{jid}",
            "job_output_path": job_output_path, "swift": swift_credentials(config)}


def delete_op(jid: str) -> dict[str, Any]:
    return {"op": "delete", "key_dir": f"key-{jid}"}


def output_listing(config: Config, jid: str, job_output_path: str) -> dict[str, Any] | None:
    """pfcon-api.md §1.11 JSON listing, or None when the directory does not exist."""
    if config.storage_env == "swift":
        key = key_dir(config.storebase_mount, jid)
        if not key.is_dir():
            return None
        outgoing = key / "outgoing"
        outgoing.mkdir(exist_ok=True)
        return {"job_output_path": job_output_path.lstrip("/"),
                "rel_file_paths": list_outputs(outgoing, delete_chrislinks=False)}
    rel = strip_path(job_output_path)
    root = safe_join(config.storebase_mount, rel, field="job_output_path")
    if not _real_dir_below(config.storebase_mount, rel):
        return None
    if config.storage_env == "fslink":
        files = list_outputs(root, delete_chrislinks=True)
    else:  # filesystem does not filter link files (pfcon's behaviour)
        files = list_outputs(root, delete_chrislinks=False, skip_chrislinks=False)
    return {"job_output_path": rel, "rel_file_paths": files}


def _real_dir_below(storebase: Path, rel: str) -> bool:
    """Whether ``storebase/rel`` is a directory reached through no symbolic link: a
    plugin-written link on the way would list (and, for fslink, delete link files in)
    a directory outside the storage."""
    return first_link(storebase, rel) is None and (storebase / rel).is_dir()


def data_object(jid: str, nfiles: int, path: Path) -> dict[str, Any]:
    return {"jid": jid, "nfiles": nfiles, "timestamp": str(dt.datetime.now()), "path": str(path)}


def ensure_swift_container(config: Config) -> None:
    """Create the Swift container (dev mode only, as pfcon does); raises on failure."""
    from swiftclient import client as swift

    conn = swift.Connection(authurl=config.swift_auth_url, user=config.swift_username,
                            key=config.swift_key, retries=5, starting_backoff=0.4,
                            timeout=30)
    try:
        conn.put_container(config.swift_container)
    finally:
        conn.close()
