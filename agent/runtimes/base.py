"""The one interface every runtime (docker/podman, slurm, kubernetes, swarm, fake) offers.

A runtime turns a ``JobSpec`` into a workload on its backend and reports what
happened to it.  It keeps only caches: the durable record of which jobs exist is
the agent's (it persists a ``Handle`` before reporting ``running``), and after an
agent restart ``list_ours()`` finds every workload again by its labels.

Errors: a runtime translates its library's exceptions at its own edge.  Callers
only ever see ``JobRejected`` (permanent: the job can never start as asked, the
attempt fails with the message) and ``RuntimeUnavailable`` (transient: the backend
does not answer; try again later).
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from agent.protocol import JobSpec


class RuntimeFailure(Exception):
    """Base of the errors a runtime raises."""


class JobRejected(RuntimeFailure):
    """The job cannot run as asked (image missing, GPU unavailable, invalid request)."""


class RuntimeUnavailable(RuntimeFailure):
    """The backend is unreachable or failed transiently; the call may be retried."""


@dataclass(frozen=True)
class Capabilities:
    """Static facts about a runtime that placement reads."""

    multi_worker: bool = False  # number_of_workers > 1 can be honoured
    hard_memory_limit: bool = True  # memory_limit is enforced (OOM kill), not a hint
    gpus: bool = False  # device requests are supported at all


@dataclass(frozen=True)
class Probe:
    """Health and capacity, cheap enough to take on every heartbeat."""

    health: Literal["healthy", "unhealthy", "undetected"]
    reason: str = ""
    cpu_millicores: int = 0
    memory_mib: int = 0
    gpus: int = 0


@dataclass(frozen=True)
class Handle:
    """A small serialisable record naming one workload of one job attempt."""

    runtime: str
    native_id: str  # container id, slurm job id, k8s Job name ...
    job: str
    attempt: int
    name: str
    kind: str = "plugin"

    def to_dict(self) -> dict[str, Any]:
        return {"runtime": self.runtime, "native_id": self.native_id, "job": self.job,
                "attempt": self.attempt, "name": self.name, "kind": self.kind}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Handle:
        return cls(str(data["runtime"]), str(data["native_id"]), str(data["job"]),
                   int(data["attempt"]), str(data["name"]), str(data.get("kind", "plugin")))


WorkloadState = Literal["pending", "running", "exited", "unknown", "missing"]


@dataclass(frozen=True)
class JobStatus:
    """What the backend says about one workload.

    ``state``: pending (created, not started), running, exited (ended; see
    exit_code/oom), unknown (the backend reports something we do not map; the
    message says what), missing (the workload no longer exists).
    Times are RFC 3339 strings as the backend reports them ("" when unknown).
    ``extra["failed"]`` on an exited status: it ended without an exit status (it
    could not start); the agent reports it as failed with ``message``.
    """

    state: WorkloadState
    exit_code: int | None = None
    oom: bool = False
    started_at: str = ""
    finished_at: str = ""
    message: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class Runtime(abc.ABC):
    """Verbs on one noun: the workload of one job attempt."""

    name: str = ""

    @abc.abstractmethod
    def capabilities(self) -> Capabilities:
        """Static facts placement reads; never does I/O."""

    @abc.abstractmethod
    async def probe(self) -> Probe:
        """Health and capacity of the backend.  Never raises: an unreachable backend
        is ``Probe("unhealthy", reason)``."""

    @abc.abstractmethod
    async def start(self, spec: JobSpec) -> Handle:
        """Create and start the workload; return once it is submitted, not finished.

        Idempotent on (spec.name, spec.attempt): a workload that already exists for
        this attempt is returned, not started twice.  A workload of the same name
        but an *older* attempt is removed first.  Raises ``JobRejected`` for
        permanent problems, ``RuntimeUnavailable`` for transient ones.
        """

    @abc.abstractmethod
    async def status(self, handles: list[Handle]) -> dict[str, JobStatus]:
        """Status of many workloads in as few backend calls as possible, keyed by
        ``handle.job``.  A workload that no longer exists is ``missing``.  Raises
        ``RuntimeUnavailable`` when the backend cannot be asked."""

    @abc.abstractmethod
    async def logs(self, handle: Handle, tail: int) -> str:
        """The last ``tail`` lines of output (stdout and stderr).  Returns "" when
        the logs are gone; raises ``RuntimeUnavailable`` only when the backend is."""

    @abc.abstractmethod
    async def cancel(self, handle: Handle, grace: float = 10.0) -> None:
        """Stop the workload politely, then kill it after ``grace`` seconds.
        Not an error when it has already ended or is gone."""

    @abc.abstractmethod
    async def remove(self, handle: Handle, force: bool = True) -> None:
        """Remove the workload and its record on the backend (killing it when
        ``force``).  Succeeds when it is already gone."""

    @abc.abstractmethod
    async def list_ours(self) -> list[Handle]:
        """Every workload on the backend carrying pfleet's labels for this agent,
        used to re-attach after an agent restart."""

    async def changes(self) -> AsyncIterator[str]:
        """Job ids whose workload changed state, as soon as the backend says so.

        Optional: the default yields nothing and the agent relies on polling
        ``status``.  An implementation ends the iteration when the backend's
        stream breaks; the agent restarts it after a pause.
        """
        return
        yield  # pragma: no cover - makes this an async generator

    async def close(self) -> None:  # noqa: B027 - optional hook, nothing to close by default
        """Release clients and threads."""


# Labels every pfleet workload carries; runtimes that support labels set them all.
LABEL_JOB = "org.chrisproject.pfleet.job"
LABEL_ATTEMPT = "org.chrisproject.pfleet.attempt"
LABEL_AGENT = "org.chrisproject.pfleet.agent"
LABEL_JID = "org.chrisproject.pfleet.jid"
LABEL_JOB_TYPE = "org.chrisproject.job_type"  # pfcon's own label, kept for tools that read it
