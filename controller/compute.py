"""pfcon's compute vocabulary: plugin command lines and the ``compute`` object.

Both are runtime independent here: the command line is built once at submit time
(pfcon-api.md §4.1) and every runtime runs the same list; the ``compute`` object is
rendered from the store, never from a runtime.
"""

from __future__ import annotations

import shlex
from typing import Any

from controller.states import State, pfcon_status
from controller.store import JobRow

INCOMING = "/share/incoming"
OUTGOING = "/share/outgoing"
ZERO_TIME = "0001-01-01T00:00:00Z"  # what Docker reports for a container not yet started

SUFFIXES = {"plugin": "", "copy": "-copy", "upload": "-upload", "delete": "-delete"}


def runtime_name(kind: str, jid: str) -> str:
    """The workload name of a job: <jid>, <jid>-copy, <jid>-upload, <jid>-delete."""
    return jid + SUFFIXES[kind]


def localize_args(args: list[str], path_flags: list[str]) -> list[str]:
    """Replace the value following each path flag with the input mount point."""
    flags = set(path_flags)
    out: list[str] = []
    replace_next = False
    for arg in args:
        if replace_next:
            out.append(INCOMING)
            replace_next = False
            continue
        out.append(arg)
        replace_next = arg in flags
    return out


def plugin_command(entrypoint: list[str], args: list[str], path_flags: list[str],
                   plugin_type: str) -> list[str]:
    command = [*entrypoint, *localize_args(args, path_flags)]
    if plugin_type == "ds":
        command.append(INCOMING)
    command.append(OUTGOING)
    return command


def command_string(command: list[str]) -> str:
    """pfcon/Docker's rendering of a command: a shell-quoted join."""
    return shlex.join(command)


def compute_object(job: JobRow, logs: str | None = None) -> dict[str, Any]:
    """The seven keys of pfcon's ``compute`` object, in pfcon's order."""
    if job.state in (State.QUEUED, State.ASSIGNED):
        timestamp = ZERO_TIME
    else:
        timestamp = job.finished_at or job.started_at or ZERO_TIME
    return {
        "jid": job.jid,
        "image": job.image,
        "cmd": job.cmd,
        "status": pfcon_status(job.state),
        "message": job.message,
        "timestamp": timestamp,
        "logs": job.logs if logs is None else logs,
    }


def skipped_object(jid: str, message: str) -> dict[str, Any]:
    return {"jid": jid, "image": "", "cmd": "", "status": "finishedSuccessfully",
            "message": message, "timestamp": "", "logs": ""}
