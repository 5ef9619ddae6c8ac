"""Reading SLURM's answers (no I/O): ``squeue``, ``sacct`` (also ``sacct -c``, the
jobcomp file), ``sinfo``, and the result file a batch script leaves, mapped to
``JobStatus`` with the reason in its message.

Job states: https://slurm.schedmd.com/squeue.html#SECTION_JOB-STATE-CODES and
https://slurm.schedmd.com/sacct.html#SECTION_JOB-STATE-CODES.  Times are printed
in the client's local time without a zone; they are turned into RFC 3339 UTC.

Exit codes: ``squeue -O exit_code`` is the batch script's raw wait status
(``3 << 8``, or a signal number); ``sacct`` prints ``code:signal``.  A job SLURM
ended itself (TIMEOUT, CANCELLED, NODE_FAIL, PREEMPTED ...) never reports exit 0:
it gets the signal's 128+N, else the state's default below, so the controller
never takes it for a success.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from agent.runtimes.base import JobStatus

# squeue -O fields; a ":|" suffix means "no padding, no truncation, then a |".
# Comment comes last: it is ours, but the split tolerates a "|" in it anyway.
SQUEUE_FIELDS = ("JobID", "Name", "State", "Reason", "exit_code", "StartTime", "EndTime",
                 "Comment")
SQUEUE_FORMAT = ",".join(f"{name}:|" for name in SQUEUE_FIELDS)
SACCT_FIELDS = "JobID,State,ExitCode,Start,End,Reason"
SINFO_FORMAT = "%N|%P|%c|%m|%G|%t"

# The job is waiting to run (or to run again).
PENDING_STATES = frozenset({"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD",
                            "REQUEUE_FED", "RESV_DEL_HOLD", "SPECIAL_EXIT"})
# It holds resources: running, suspended, or its processes are being cleaned up.
RUNNING_STATES = frozenset({"RUNNING", "COMPLETING", "SIGNALING", "STAGE_OUT", "RESIZING",
                            "SUSPENDED", "STOPPED"})
# It has ended: (exit code when SLURM gives none, reason in the message).
TERMINAL_STATES: dict[str, tuple[int, str]] = {
    "COMPLETED": (0, "exited"),
    "FAILED": (1, "exited"),
    "OUT_OF_MEMORY": (137, "OOMKilled (SLURM OUT_OF_MEMORY: the job exceeded its --mem)"),
    "TIMEOUT": (143, "TIMEOUT: the job reached its SLURM time limit"),
    "CANCELLED": (143, "CANCELLED: the SLURM job was cancelled"),
    "NODE_FAIL": (137, "NODE_FAIL: a node of the job failed"),
    "PREEMPTED": (143, "PREEMPTED: the job was preempted"),
    "BOOT_FAIL": (1, "BOOT_FAIL: a node of the job failed to boot"),
    "DEADLINE": (1, "DEADLINE: the job's deadline passed before it ran"),
    "REVOKED": (1, "REVOKED: the job was revoked (federation)"),
}
# FAILED reasons that only say "the script exited non-zero" (the exit code says more).
PLAIN_FAILURE_REASONS = frozenset({"", "None", "NonZeroExitCode"})
# sinfo node states that take no new work ("*" suffix: the node does not respond).
UNUSABLE_NODE_STATES = frozenset({"down", "drain", "drng", "drained", "draining", "fail",
                                  "failg", "failing", "maint", "inval", "futr", "future",
                                  "npc", "pow_dn", "powered_down", "powering_down", "planned"})

_NO_TIME = {"", "N/A", "NONE", "None", "Unknown", "(null)"}


@dataclass(frozen=True)
class SlurmJob:
    """One job as a SLURM command reports it."""

    job_id: str
    state: str  # base state name: RUNNING, CANCELLED, ...
    reason: str = ""
    exit_code: int | None = None  # the batch script's exit status
    signal: int | None = None  # the signal that ended it, if any
    started_at: str = ""  # RFC 3339 UTC, "" when not (yet) known
    finished_at: str = ""
    name: str = ""
    comment: str = ""
    by: str = ""  # "CANCELLED by 1000": who cancelled it
    source: str = "squeue"

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES


@dataclass(frozen=True)
class LauncherResult:
    """What the batch script's launcher reported (one line per worker)."""

    exit_code: int | None
    oom: bool


@dataclass(frozen=True)
class NodeInfo:
    name: str
    partition: str  # without the default marker
    default: bool  # the partition is the cluster's default
    cpus: int
    memory_mib: int
    gpus: int
    state: str

    @property
    def usable(self) -> bool:
        return not self.state.endswith("*") and _base_node_state(self.state) not in \
            UNUSABLE_NODE_STATES


# ------------------------------------------------------------------- parsing


def slurm_time(text: str) -> str:
    """A SLURM timestamp (local time, no zone) as RFC 3339 UTC; "" when there is none."""
    text = text.strip()
    if text in _NO_TIME:
        return ""
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        return ""
    if value.tzinfo is None:
        value = value.astimezone()  # the local zone, as SLURM printed it
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _state_and_by(text: str) -> tuple[str, str]:
    # sacct: "CANCELLED by 1000"; truncated names end in "+".
    state, _, rest = text.strip().partition(" ")
    by = rest.removeprefix("by ").strip() if rest.startswith("by ") else ""
    return state.rstrip("+"), by


def parse_squeue(text: str) -> list[SlurmJob]:
    """Lines of ``squeue -h -O SQUEUE_FORMAT``."""
    jobs = []
    count = len(SQUEUE_FIELDS)
    for line in text.splitlines():
        if not line.strip():
            continue
        values = line.removesuffix("|").split("|", count - 1)
        if len(values) != count or not values[0].strip():
            continue
        job_id, name, state, reason, raw_exit, start, end, comment = (v.strip() for v in values)
        exit_code = signal = None
        if raw_exit.lstrip("-").isdigit():
            status = int(raw_exit)
            exit_code, signal = (status >> 8) & 0xFF, status & 0x7F
        jobs.append(SlurmJob(job_id, state, "" if reason == "None" else reason, exit_code,
                             signal or None, slurm_time(start), slurm_time(end), name,
                             "" if comment == "(null)" else comment))
    return jobs


def parse_sacct(text: str, source: str = "sacct") -> list[SlurmJob]:
    """Lines of ``sacct -X -n -P -o SACCT_FIELDS`` (or ``sacct -c``)."""
    jobs = []
    for line in text.splitlines():
        values = line.split("|")
        if len(values) < 5 or not values[0].strip():
            continue
        job_id, state_text, exit_text, start, end = (v.strip() for v in values[:5])
        reason = values[5].strip() if len(values) > 5 else ""
        state, by = _state_and_by(state_text)
        code, _, sig = exit_text.partition(":")
        jobs.append(SlurmJob(job_id, state, "" if reason == "None" else reason,
                             int(code) if code.isdigit() else None,
                             int(sig) if sig.isdigit() and int(sig) else None,
                             slurm_time(start), slurm_time(end), by=by, source=source))
    return jobs


def parse_sinfo(text: str) -> list[NodeInfo]:
    """Lines of ``sinfo -h -N -o SINFO_FORMAT`` (one per node and partition)."""
    nodes = []
    for line in text.splitlines():
        values = [v.strip() for v in line.split("|")]
        if len(values) != 6 or not values[0]:
            continue
        name, partition, cpus, memory, gres, state = values
        nodes.append(NodeInfo(name, partition.rstrip("*"), partition.endswith("*"),
                              _int(cpus), _int(memory), gres_gpus(gres), state))
    return nodes


def gres_gpus(gres: str) -> int:
    """GPUs in a GRES string: ``gpu:2``, ``gpu:a100:4(S:0-1)``, ``gpu:a:1,gpu:b:2``."""
    total = 0
    for item in re.sub(r"\([^)]*\)", "", gres).split(","):
        parts = item.strip().split(":")
        if parts[0] == "gpu" and len(parts) >= 2 and parts[-1].isdigit():
            total += int(parts[-1])
    return total


def parse_result(text: str) -> LauncherResult | None:
    """The result file: ``task=N exit=N oom=true|false|unknown`` lines; the highest exit
    code wins (as srun's does), any OOM counts."""
    codes: list[int] = []
    oom = False
    for line in text.splitlines():
        fields = dict(part.partition("=")[::2] for part in line.split())
        if fields.get("exit", "").isdigit():
            codes.append(int(fields["exit"]))
        oom = oom or fields.get("oom") == "true"
    if not codes:
        return None
    return LauncherResult(max(codes), oom)


def _int(text: str) -> int:
    digits = re.match(r"\d+", text)
    return int(digits.group()) if digits else 0


def _base_node_state(state: str) -> str:
    return state.rstrip("*~#!%$@^-+").lower()


# ------------------------------------------------------------------- mapping


def capacity(nodes: list[NodeInfo], partitions: list[str]) -> tuple[int, int, int, int]:
    """(CPU millicores, memory MiB, GPUs, usable nodes) of the usable nodes in
    ``partitions`` (the cluster's default partition when empty); a node in several
    of them counts once."""
    wanted = set(partitions)
    seen: dict[str, NodeInfo] = {}
    for node in nodes:
        chosen = node.partition in wanted if wanted else node.default
        if chosen and node.usable:
            seen.setdefault(node.name, node)
    return (sum(n.cpus for n in seen.values()) * 1000, sum(n.memory_mib for n in seen.values()),
            sum(n.gpus for n in seen.values()), len(seen))


def exit_code_of(job: SlurmJob, result: LauncherResult | None) -> int:
    """The exit code to report for a job that ended."""
    default, _ = TERMINAL_STATES.get(job.state, (1, ""))
    if job.exit_code:
        return job.exit_code
    if job.signal:
        return 128 + job.signal
    if result is not None and result.exit_code is not None and (
            result.exit_code or job.state == "COMPLETED"):
        return result.exit_code
    return default


def to_status(job: SlurmJob, result: LauncherResult | None = None, *,
              launcher: str = "none", limited: bool = True) -> JobStatus:
    """Map a SLURM job (plus its launcher's result, when the script left one) to a
    ``JobStatus``.  ``limited``: the container engine was given a memory limit (only
    then does Podman's bare exit 137 mean OOM)."""
    info = {"slurm_state": job.state, "slurm_job_id": job.job_id, "source": job.source}
    if job.state in PENDING_STATES:
        reason = f" ({job.reason})" if job.reason else ""
        return JobStatus("pending", message=f"{job.state}{reason}", extra=info)
    if job.state in RUNNING_STATES:
        return JobStatus("running", started_at=job.started_at, message=job.state, extra=info)
    if job.state not in TERMINAL_STATES:
        return JobStatus("unknown", message=f"SLURM state {job.state}", extra=info)
    code = exit_code_of(job, result)
    times = {"started_at": job.started_at, "finished_at": job.finished_at}
    if job.state == "COMPLETED" and code == 0:
        return JobStatus("exited", exit_code=0, message="exited", extra=info, **times)
    if job.state == "OUT_OF_MEMORY":
        return JobStatus("exited", exit_code=137, oom=True, message=TERMINAL_STATES[
            "OUT_OF_MEMORY"][1], extra=info, **times)
    if job.state in ("COMPLETED", "FAILED"):
        if result is not None and result.oom:
            return JobStatus("exited", exit_code=137, oom=True,
                             message=f"OOMKilled ({launcher} reports the container "
                                     "OOM-killed)", extra=info, **times)
        if launcher == "podman" and code == 137 and limited:
            return JobStatus("exited", exit_code=137, oom=True,
                             message="OOMKilled (inferred: podman reports exit 137 under a "
                                     "memory limit, not OOMKilled)",
                             extra={**info, "oom_inferred": True}, **times)
        message = ("exited" if job.reason in PLAIN_FAILURE_REASONS
                   else f"{job.state} ({job.reason})")
        return JobStatus("exited", exit_code=code, message=message, extra=info, **times)
    message = TERMINAL_STATES[job.state][1]
    if job.state == "CANCELLED" and job.by:
        message = f"CANCELLED by uid {job.by}: the SLURM job was cancelled"
    return JobStatus("exited", exit_code=code, message=message, extra=info, **times)


def result_status(result: LauncherResult) -> JobStatus:
    """The status of a job SLURM no longer knows, from its result file alone."""
    info = {"source": "result-file"}
    if result.oom:
        return JobStatus("exited", exit_code=137, oom=True, message="OOMKilled", extra=info)
    return JobStatus("exited", exit_code=result.exit_code,
                     message="exited (SLURM no longer knows the job; exit code from the "
                             "batch script's result file)" if result.exit_code else "exited",
                     extra=info)


# Launcher messages that mean the plugin never started (the launcher itself failed).
_CH_RUN_ERROR = re.compile(r"ch-run\[\d+\]: error: (?P<reason>.*)")
_ENGINE_ERROR_HINTS = ("error", "unable to find image", "no such image", "denied", "manifest")


def launch_failure(launcher: str, exit_code: int | None, output_tail: str,
                   image: str = "") -> str | None:
    """Why the launcher could not start the plugin, read off the end of the job's
    output, or None when the plugin ran (its own exit code stands)."""
    lines = [line.strip() for line in output_tail.splitlines() if line.strip()]
    if launcher == "charliecloud":
        # ch-run prints these only before it execs the plugin.
        for line in reversed(lines):
            match = _CH_RUN_ERROR.search(line)
            if match:
                return f"ch-run: {match.group('reason')}"
        return None
    if launcher in ("docker", "podman") and exit_code == 125:
        hints = [line for line in lines if any(h in line.lower() for h in _ENGINE_ERROR_HINTS)]
        detail = (hints or lines or ["no output"])[-1]
        if any("unable to find image" in line.lower() for line in lines):
            return f"image not found: {image or '?'}: {detail}"
        return f"{launcher} could not start the container: {detail}"
    return None
