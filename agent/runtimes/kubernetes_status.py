"""Reading Kubernetes API objects (no I/O): a Job and its pods -> ``JobStatus``, nodes
-> capacity.

pfcon's mapping (pfcon-api.md §2.2) looks at the Job's counters alone and so
reports a brand-new Job as started, turns a briefly all-empty status into
``undefined`` (pman#225) and hides why a pod failed.  Here:

* a Job is **pending** until one of its pods has a running (or ended) container,
  and an empty status is pending, never unknown;
* it ends only on its ``Complete`` or ``Failed`` condition (``backoffLimit: 0``
  makes the first failed pod fail the Job); the exit code and the ``OOMKilled``
  reason come from the pods' terminated containers;
* a pod that can never start (``InvalidImageName``, ``ImagePullBackOff``,
  ``ErrImageNeverPull``) ends the attempt as a start failure with the reason; one
  ``ErrImagePull`` is still retried by the kubelet and stays pending;
* a Job failed without any container result (deadline exceeded while pulling, pods
  deleted) is a start failure with the condition's reason rather than an invented
  exit code.

A start failure is ``JobStatus("exited", extra={"failed": True})``: the supervisor
reports it as ``failed`` (SYSTEM_ERROR, message as given) instead of an exit.
"""

from __future__ import annotations

from collections.abc import Iterable
from decimal import Decimal, InvalidOperation
from typing import Any

from agent.runtimes.base import JobStatus

# Container waiting reasons after which the pod will never run (the kubelet gives
# up or keeps backing off on something that cannot change by itself).
START_FAILURES = {
    "InvalidImageName": "invalid image name",
    "ImagePullBackOff": "image pull failed",
    "ErrImageNeverPull": "image not present and pull policy Never",
}
IMAGE_PULL_RETRYING = "ErrImagePull"
OOM_REASON = "OOMKilled"

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "k": 10**3,
            "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}


def parse_quantity(text: Any) -> Decimal:
    """A Kubernetes resource quantity ("3900m", "16Gi", "1e9", "2") as a number.
    ``ValueError`` for anything else."""
    value = str(text).strip()
    try:
        for suffix, factor in _BINARY.items():
            if value.endswith(suffix):
                return Decimal(value[: -len(suffix)]) * factor
        if value and value[-1] in _DECIMAL:
            return Decimal(value[:-1]) * _DECIMAL[value[-1]]
        return Decimal(value)
    except InvalidOperation as exc:
        raise ValueError(f"not a Kubernetes quantity: {text!r}") from exc


def _get(obj: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def _true_conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {str(c.get("type")): c for c in (_get(obj, "status", "conditions") or [])
            if isinstance(c, dict) and str(c.get("status")) == "True"}


def _container_states(pods: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The current state of every (non-init) container of ``pods``, oldest pod first."""
    states = []
    ordered = sorted(pods, key=lambda p: (str(_get(p, "metadata", "creationTimestamp") or ""),
                                          str(_get(p, "metadata", "name") or "")))
    for pod in ordered:
        for status in _get(pod, "status", "containerStatuses") or []:
            if isinstance(status, dict) and isinstance(status.get("state"), dict):
                states.append(status["state"])
    return states


def _pod_ran(pods: Iterable[dict[str, Any]], states: list[dict[str, Any]]) -> bool:
    return (any("running" in s or "terminated" in s for s in states)
            or any(_get(p, "status", "phase") in ("Running", "Succeeded", "Failed")
                   for p in pods))


def _started_at(job: dict[str, Any], states: list[dict[str, Any]]) -> str:
    times = sorted(str(t) for s in states
                   for t in (_get(s, "running", "startedAt"), _get(s, "terminated", "startedAt"))
                   if t)
    return times[0] if times else str(_get(job, "status", "startTime") or "")


def _waiting(states: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(str(_get(s, "waiting", "reason") or ""), str(_get(s, "waiting", "message") or ""))
            for s in states if isinstance(s.get("waiting"), dict)]


def _reason_text(reason: str, message: str) -> str:
    return f"{reason}: {message}" if message else reason


def _start_failure(states: list[dict[str, Any]]) -> str | None:
    for reason, message in _waiting(states):
        if reason in START_FAILURES:
            return f"{START_FAILURES[reason]}: {_reason_text(reason, message)}"
    return None


def _unschedulable(pods: Iterable[dict[str, Any]]) -> str:
    for pod in pods:
        for cond in _get(pod, "status", "conditions") or []:
            if (isinstance(cond, dict) and cond.get("type") == "PodScheduled"
                    and str(cond.get("status")) == "False"):
                return _reason_text(str(cond.get("reason") or "Unschedulable"),
                                    str(cond.get("message") or ""))
    return ""


def job_status(job: dict[str, Any], pods: list[dict[str, Any]]) -> JobStatus:
    """The status of one attempt from its Job object and the pods it made (API JSON)."""
    states = _container_states(pods)
    conditions = _true_conditions(job)
    started = _started_at(job, states)
    status = job.get("status") or {}
    if "Complete" in conditions:
        finished = str(status.get("completionTime")
                       or conditions["Complete"].get("lastTransitionTime") or "")
        return JobStatus("exited", exit_code=0, started_at=started, finished_at=finished,
                         message="completed")
    if "Failed" in conditions:
        return _failed(conditions["Failed"], states, started)
    if conditions.get("Suspended"):
        return JobStatus("pending", message="suspended")
    failure = _start_failure(states)
    if failure is not None:
        return JobStatus("exited", message=failure, extra={"failed": True})
    if _pod_ran(pods, states):
        # A pod that ended before its Job's condition is set still counts as running:
        # only the Job decides when the attempt is over (all its workers, no retries).
        return JobStatus("running", started_at=started, message="running")
    waiting = [_reason_text(r, m) for r, m in _waiting(states) if r]
    if waiting:
        return JobStatus("pending", message=waiting[0])
    reason = _unschedulable(pods)
    if reason:
        return JobStatus("pending", message=reason)
    return JobStatus("pending", message="pod starting" if pods else "no pod yet")


def _failed(condition: dict[str, Any], states: list[dict[str, Any]], started: str) -> JobStatus:
    ended = [s["terminated"] for s in states if isinstance(s.get("terminated"), dict)]
    oom = [t for t in ended if t.get("reason") == OOM_REASON]
    bad = oom or [t for t in ended if t.get("exitCode") not in (0, None)]
    finished = str(condition.get("lastTransitionTime")
                   or max((str(t.get("finishedAt") or "") for t in ended), default=""))
    if bad:
        first = bad[0]
        code = first.get("exitCode")
        # The container's termination message, when the plugin wrote one, says why.
        message = OOM_REASON if oom else (str(first.get("message") or "").strip() or "exited")
        return JobStatus("exited", exit_code=int(code) if code is not None else 137,
                         oom=bool(oom), started_at=started, finished_at=finished,
                         message=message)
    reason = _start_failure(states) or _reason_text(str(condition.get("reason") or "Failed"),
                                                    str(condition.get("message") or ""))
    return JobStatus("exited", started_at=started, finished_at=finished, message=reason,
                     extra={"failed": True})


def node_capacity(nodes: list[dict[str, Any]],
                  selector: dict[str, str]) -> tuple[int, int, int, int]:
    """(cpu millicores, memory MiB, GPUs, nodes counted): the allocatable resources of
    the ready, schedulable nodes whose labels match ``selector``."""
    cpu = Decimal(0)
    memory = Decimal(0)
    gpus = Decimal(0)
    counted = 0
    for node in nodes:
        labels = _get(node, "metadata", "labels") or {}
        if any(labels.get(k) != v for k, v in selector.items()):
            continue
        if _get(node, "spec", "unschedulable"):
            continue
        ready = {c.get("type"): str(c.get("status"))
                 for c in _get(node, "status", "conditions") or [] if isinstance(c, dict)}
        if ready.get("Ready", "True") != "True":
            continue
        allocatable = _get(node, "status", "allocatable") or {}
        try:
            cpu += parse_quantity(allocatable.get("cpu", 0))
            memory += parse_quantity(allocatable.get("memory", 0))
            gpus += parse_quantity(allocatable.get("nvidia.com/gpu", 0))
        except ValueError:
            continue
        counted += 1
    return int(cpu * 1000), int(memory / 2**20), int(gpus), counted
