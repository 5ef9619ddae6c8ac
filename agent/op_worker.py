"""The child process that runs one built-in operation: ``python -m agent.op_worker
REQUEST RESULT``.

``REQUEST`` is a JSON file written by ``agent.op_runner``::

    {"op": {...}, "storebase": "/var/local/storeBase", "jid": "...", "lock": "<path>",
     "limits": {"cgroup_procs": ["<leaf>/cgroup.procs", ...], "memory": <bytes>|null}}

The worker first puts itself under its limits (joins the cgroups, sets
``RLIMIT_DATA`` to ``memory``: the runner does the same from outside right after
starting it, this closes the gap) and takes the attempt's lock (held until it
exits), then runs the operation and writes ``RESULT`` atomically (temp file,
fsync, rename)::

    {"exit_code": 0|1|137, "log": "...", "message": "...", "oom": false}

and exits with ``exit_code``.  An operation that needs more memory than its limit
(a ``MemoryError``, or a worker that is already larger when it starts) ends with
137, ``OOMKilled``.  A worker killed before it wrote a result leaves no file: the
runner then reports from the exit status.  Only the standard library is imported
before the limits are in place.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Any

THREAD_STACK_BYTES = 2 * 1024 * 1024
# what an operation allocates beyond the interpreter it starts with: its buffers and
# the copy pool's threads (a limit below interpreter + this is refused at once)
START_HEADROOM_BYTES = 16 * 1024 * 1024


def apply_limits(limits: dict[str, Any]) -> str | None:
    """Join the cgroups and set the memory limit (the runner has already done both
    from outside when it could); return why the operation cannot run within its
    memory limit, or None."""
    for procs in limits.get("cgroup_procs") or []:
        with contextlib.suppress(OSError), open(procs, "w") as fh:
            fh.write(str(os.getpid()))
    memory = limits.get("memory")
    if not memory:
        return None
    import resource
    import threading

    # thread stacks are private writable mappings, which RLIMIT_DATA counts: keep the
    # copy pool's small
    threading.stack_size(THREAD_STACK_BYTES)
    needed = data_size()
    if needed is not None and needed + START_HEADROOM_BYTES > int(memory):
        return (f"the operation needs about {-(-(needed + START_HEADROOM_BYTES) >> 20)} MiB "
                f"to start, more than its memory limit of {int(memory) >> 20} MiB")
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_DATA, (int(memory), int(memory)))
    return None


def memory_limit_text() -> str:
    """The memory limit this process runs under, as the kernel reports it."""
    import resource

    soft = resource.getrlimit(resource.RLIMIT_DATA)[0]
    return "none" if soft == resource.RLIM_INFINITY else f"{soft >> 20} MiB (RLIMIT_DATA)"


def data_size() -> int | None:
    """This process's private writable memory (``VmData``), what RLIMIT_DATA limits."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmData:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


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
        return out_of_memory(request, "needed more memory than its memory limit")
    except OSError as exc:
        where = ""
        if exc.filename:
            where = f" ({os.path.relpath(str(exc.filename), storebase)})"
        message = f"{type(exc).__name__}: {exc.strerror or exc}{where}"
        return {"exit_code": 1, "log": message + "\n", "message": message, "oom": False}
    return {"exit_code": 0, "log": text, "message": "", "oom": False}


def out_of_memory(request: dict[str, Any], why: str) -> dict[str, Any]:
    limit = int((request.get("limits") or {}).get("memory") or 0) >> 20
    text = f"the operation {why}" + (f" of {limit} MiB" if limit else "")
    return {"exit_code": 137, "log": text + "\n", "message": "OOMKilled", "oom": True}


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m agent.op_worker REQUEST RESULT", file=sys.stderr)
        return 2
    request_path, result_path = argv[1], argv[2]
    with open(request_path) as fh:
        request = json.load(fh)
    refused = apply_limits(request.get("limits") or {})
    hold_lock(request.get("lock"))
    if refused is not None:
        result = {"exit_code": 137, "log": refused + "\n", "message": "OOMKilled",
                  "oom": True}
        write_result(result_path, result)
        return 137

    import logging

    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s jid=" + str(request.get("jid"))
                        + " %(message)s")
    logging.getLogger("pfleet.agent.op_worker").info("memory limit %s", memory_limit_text())
    try:
        result = run(request)
    except MemoryError:
        result = out_of_memory(request, "needed more memory than its memory limit")
    except Exception as exc:  # a bug: say what it was, the traceback goes to stderr
        logging.getLogger("pfleet.agent.op_worker").exception("operation crashed")
        message = f"internal error: {type(exc).__name__}: {exc}"
        result = {"exit_code": 1, "log": message + "\n", "message": message, "oom": False}
    write_result(result_path, result)
    return int(result["exit_code"])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
