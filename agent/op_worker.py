"""The child process that runs one built-in operation: ``python -m agent.op_worker
REQUEST RESULT``.

``REQUEST`` is a JSON file written by ``agent.op_runner``::

    {"op": {...}, "storebase": "/var/local/storeBase", "jid": "...", "lock": "<path>",
     "limits": {"cgroup_procs": ["<leaf>/cgroup.procs", ...], "rlimit_as": <bytes>|null}}

The worker first puts itself under its limits (joins the cgroups, sets
``RLIMIT_AS``: the runner does the same from outside right after starting it, this
closes the gap) and takes the attempt's lock (held until it exits), then runs the
operation and writes ``RESULT`` atomically (temp file, fsync, rename)::

    {"exit_code": 0|1|137, "log": "...", "message": "...", "oom": false}

and exits with ``exit_code``.  A worker killed before it wrote a result (e.g. by
the cgroup's OOM killer) leaves no file: the runner then reports from the exit
status.  Only the standard library is imported before the limits are in place.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Any

THREAD_STACK_BYTES = 2 * 1024 * 1024


def apply_limits(limits: dict[str, Any]) -> None:
    """Join the cgroups and set the address-space limit (both best effort: the
    runner has already applied them from outside when it could)."""
    for procs in limits.get("cgroup_procs") or []:
        with contextlib.suppress(OSError), open(procs, "w") as fh:
            fh.write(str(os.getpid()))
    rlimit_as = limits.get("rlimit_as")
    if rlimit_as:
        import resource
        import threading

        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_AS, (int(rlimit_as), int(rlimit_as)))
        # thread stacks count against the address space: keep the copy pool's small
        threading.stack_size(THREAD_STACK_BYTES)


_LOCK_FD: int | None = None


def hold_lock(path: str | None) -> None:
    """Hold the attempt's lock until the process ends: the runner sees that a worker
    is alive even when it never learnt its pid."""
    global _LOCK_FD
    if path:
        import fcntl

        _LOCK_FD = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(_LOCK_FD, fcntl.LOCK_EX)


def write_result(path: str, result: dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, json.dumps(result).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def run(request: dict[str, Any]) -> dict[str, Any]:
    from pathlib import Path

    from agent.ops import OpError, run_op

    storebase = Path(str(request["storebase"]))
    try:
        text = run_op(request["op"], storebase)
    except OpError as exc:
        return {"exit_code": 1, "log": f"{exc}\n", "message": str(exc), "oom": False}
    except MemoryError:
        limit = request.get("limits", {}).get("rlimit_as") or 0
        text = f"the operation ran out of memory (limit {int(limit) >> 20} MiB)"
        return {"exit_code": 137, "log": text + "\n", "message": "OOMKilled", "oom": True}
    except OSError as exc:
        where = ""
        if exc.filename:
            where = f" ({os.path.relpath(str(exc.filename), storebase)})"
        message = f"{type(exc).__name__}: {exc.strerror or exc}{where}"
        return {"exit_code": 1, "log": message + "\n", "message": message, "oom": False}
    return {"exit_code": 0, "log": text, "message": "", "oom": False}


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m agent.op_worker REQUEST RESULT", file=sys.stderr)
        return 2
    request_path, result_path = argv[1], argv[2]
    with open(request_path) as fh:
        request = json.load(fh)
    apply_limits(request.get("limits") or {})
    hold_lock(request.get("lock"))

    import logging

    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s jid=" + str(request.get("jid"))
                        + " %(message)s")
    try:
        result = run(request)
    except MemoryError:
        result = {"exit_code": 137, "log": "the operation ran out of memory\n",
                  "message": "OOMKilled", "oom": True}
    except Exception as exc:  # a bug: say what it was, the traceback goes to stderr
        logging.getLogger("pfleet.agent.op_worker").exception("operation crashed")
        message = f"internal error: {type(exc).__name__}: {exc}"
        result = {"exit_code": 1, "log": message + "\n", "message": message, "oom": False}
    write_result(result_path, result)
    return int(result["exit_code"])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
