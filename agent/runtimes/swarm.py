"""The Swarm runtime: one replicated service (one replica, never restarted) per job
attempt on a Docker swarm manager, through the ``docker`` SDK.

It is the Docker runtime's sibling and reuses its plumbing (the bounded thread pool,
the client, error translation, the container event stream) and its pure helpers
(``docker_config``: labels, environment, storeBase paths, ``CONTAINER_USER``); only
what differs lives here:

* a service (``restart-condition none``, CPU and memory **limits**, pfleet's labels on
  the service and its containers, bind mounts of ``STOREBASE`` paths, which must be
  the same on every node: a shared filesystem) instead of a container;
* ``SHM_SIZE`` as a tmpfs mount on ``/dev/shm`` (pfcon ignores it on swarm);
* status from the service's first task (pfcon-api.md §2.2).  A task that could not
  start (``rejected``, or ``failed`` without an exit code: a missing image) is a start
  failure with the task's error.  Out of memory: the task's container says
  ``OOMKilled`` when it ran on this node; on another node exit 137 under a memory
  limit (and not stopped by pfleet) is taken as OOM, marked as inferred;
* logs through the service logs endpoint; cancel scales the service to 0; remove
  removes the service (and so its task).

No GPUs (swarm's generic resources are not wired up) and one worker per job.
Container events come from the manager's own engine, so on a multi-node swarm the
jobs on other nodes are noticed by polling only.
"""

from __future__ import annotations

import hashlib
import logging
import random
from typing import Any

import docker
import docker.errors
from docker.types import ContainerSpec, Mount, Resources, RestartPolicy, ServiceMode, TaskTemplate

from agent.protocol import JobSpec
from agent.runtimes.base import (
    LABEL_ATTEMPT,
    LABEL_JOB,
    LABEL_JOB_TYPE,
    Capabilities,
    Handle,
    JobRejected,
    JobStatus,
    Probe,
    RuntimeFailure,
    RuntimeUnavailable,
)
from agent.runtimes.docker import ENGINE_ERRORS, DockerRuntime
from agent.runtimes.docker_config import (
    MIB,
    ContainerUser,
    DockerSettings,
    container_labels,
    job_environment,
    short_error,
    storebase_source,
)

__all__ = ["SwarmRuntime", "build_service", "service_name", "task_status"]

log = logging.getLogger("pfleet.agent.swarm")

LABEL_NAME = "org.chrisproject.pfleet.name"  # the workload's pfleet name (service names are cut)
MAX_NAME = 63  # swarm service names are DNS labels
OOM_EXIT_CODE = 137

PENDING_STATES = frozenset({"new", "allocated", "pending", "assigned", "accepted", "preparing",
                            "ready", "starting"})


def service_name(name: str) -> str:
    """``name`` when swarm takes it; longer ones are cut and end in a hash of the original."""
    if len(name) <= MAX_NAME:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:10]
    return f"{name[: MAX_NAME - len(digest) - 1].rstrip('-_.')}-{digest}"


def build_service(spec: JobSpec, settings: DockerSettings, storebase: str, *,
                  user: ContainerUser | None = None,
                  rng: random.Random | None = None) -> dict[str, Any]:
    """Keyword arguments of ``APIClient.create_service`` running ``spec``.  Raises
    ``ValueError`` for a mount source outside the storeBase."""
    labels = container_labels(spec, settings)
    labels[LABEL_NAME] = spec.name
    mounts = [Mount(target=m.target, source=storebase_source(storebase, m.source), type="bind",
                    read_only=m.read_only) for m in spec.mounts]
    if settings.shm_size_mib:
        mounts.append(Mount(target="/dev/shm", source=None, type="tmpfs",
                            tmpfs_size=settings.shm_size_mib * MIB))
    user_arg: str | None = None
    groups: list[str] | None = None
    if user is not None:
        uid, gid = user.pick(rng or random.SystemRandom())
        if uid is not None:
            user_arg = f"{uid}:{gid}" if gid is not None else uid
        elif gid is not None:
            groups = [gid]
    container = ContainerSpec(image=spec.image, command=list(spec.command),
                              env=job_environment(spec, settings), labels=labels, mounts=mounts,
                              user=user_arg, groups=groups)
    resources = None
    if not settings.ignore_limits:
        resources = Resources(cpu_limit=spec.cpu_limit * 1_000_000,
                              mem_limit=spec.memory_limit * MIB)
    template = TaskTemplate(container_spec=container, resources=resources,
                            restart_policy=RestartPolicy(condition="none"))
    return {"task_template": template, "name": service_name(spec.name), "labels": labels,
            "mode": ServiceMode("replicated", replicas=1)}


def task_status(task: dict[str, Any] | None, *, oom_killed: bool | None = None,
                memory_limited: bool = False, stopped_by_us: bool = False) -> JobStatus:
    """Map a service's first task to a ``JobStatus`` (pfcon-api.md §2.2, plus reasons).

    ``oom_killed``: the container's own ``State.OOMKilled`` when it could be inspected
    (None when it ran on another node or is gone)."""
    if task is None:
        return JobStatus("pending", message="task not available yet")
    status = task.get("Status") or {}
    state = str(status.get("State") or "")
    when = str(status.get("Timestamp") or "")
    error = short_error(str(status.get("Err") or status.get("Message") or ""))
    code = (status.get("ContainerStatus") or {}).get("ExitCode")
    if state in PENDING_STATES:
        return JobStatus("pending", message=error or state)
    if state == "running":
        return JobStatus("running", started_at=when, message="running")
    if state == "complete":
        return JobStatus("exited", exit_code=0, finished_at=when, message="exited")
    if state == "rejected" or (state == "failed" and code is None):
        return JobStatus("exited", finished_at=when, message=f"could not start: {error or state}",
                         extra={"failed": True})
    if state in ("failed", "shutdown"):
        exit_code = int(code) if code is not None else None
        if oom_killed:
            return JobStatus("exited", exit_code=exit_code, oom=True, finished_at=when,
                             message="OOMKilled")
        if (oom_killed is None and exit_code == OOM_EXIT_CODE and memory_limited
                and not stopped_by_us):
            return JobStatus("exited", exit_code=exit_code, oom=True, finished_at=when,
                             message="OOMKilled (inferred: exit 137 under a memory limit)",
                             extra={"oom_inferred": True})
        if exit_code is None:
            return JobStatus("exited", finished_at=when, message=f"{state}: {error}".strip(": "),
                             extra={"failed": True})
        return JobStatus("exited", exit_code=exit_code, finished_at=when, message="exited")
    return JobStatus("unknown", message=f"task state {state or '(none)'}: {error}".strip(": "))


class SwarmRuntime(DockerRuntime):
    """Runs each job attempt as one swarm service.  Settings are ``DockerSettings``
    (``base_url`` is the manager; volume type ``host`` only)."""

    def __init__(self, settings: DockerSettings, *, rng: random.Random | None = None) -> None:
        if settings.volume_type != "host":
            raise ValueError("swarm runtime settings: the storeBase must be a host path "
                             "(COMPUTE_VOLUME_TYPE=host) present on every node")
        super().__init__(settings, rng=rng)
        self.name = "swarm"
        self._stopped_services: set[str] = set()

    def capabilities(self) -> Capabilities:
        return Capabilities(multi_worker=False, hard_memory_limit=True, gpus=False)

    async def probe(self) -> Probe:
        try:
            client = await self._client()
            nodes = await self._run(client.api.nodes)
        # A probe never raises: any failure, expected or not, is an unhealthy report.
        except Exception as exc:
            if isinstance(exc, docker.errors.APIError) and exc.status_code == 503:
                return Probe("unhealthy", reason=f"{self._url} is not a swarm manager: "
                             f"{short_error(str(exc.explanation or exc))}")
            reason = str(exc) if isinstance(exc, RuntimeFailure) else str(self._failure(exc))
            return Probe("unhealthy", reason=reason)
        cpu = memory = 0
        for node in nodes:
            if ((node.get("Status") or {}).get("State") != "ready"
                    or (node.get("Spec") or {}).get("Availability") != "active"):
                continue
            resources = (node.get("Description") or {}).get("Resources") or {}
            cpu += int(resources.get("NanoCPUs") or 0) // 1_000_000
            memory += int(resources.get("MemoryBytes") or 0) // MIB
        if not cpu:
            return Probe("unhealthy", reason="no ready, active swarm node")
        return Probe("healthy", cpu_millicores=cpu, memory_mib=memory)

    async def start(self, spec: JobSpec) -> Handle:
        if spec.number_of_workers != 1:
            raise JobRejected(f"number_of_workers must be 1 on swarm, not "
                              f"{spec.number_of_workers}")
        if spec.gpu_limit > 0:
            raise JobRejected(f"GPU unavailable: {spec.gpu_limit} GPU(s) requested, but the "
                              "swarm runtime does not give GPUs to services")
        if not spec.image:
            raise JobRejected("no image given")
        client = await self._client()
        try:
            kwargs = build_service(spec, self.settings, await self._storebase_path(),
                                   user=self._user, rng=self._rng)
        except ValueError as exc:
            raise JobRejected(str(exc)) from exc
        async with self._locks.hold(f"name:{kwargs['name']}"):
            for _ in range(4):
                try:
                    created = await self._run(client.api.create_service, **kwargs)
                except docker.errors.APIError as exc:
                    text = short_error(str(exc.explanation or exc))
                    if exc.status_code == 409 or "already exists" in text.lower():
                        adopted = await self._adopt_or_clear_service(client, spec,
                                                                     kwargs["name"])
                        if adopted is not None:
                            return adopted
                        continue
                    raise self._failure(exc, creating=True) from exc
                except ENGINE_ERRORS as exc:
                    raise self._failure(exc) from exc
                sid = str(created["ID"])
                log.info("started jid=%s job=%s attempt=%d service=%s image=%s", spec.jid,
                         spec.job, spec.attempt, sid[:12], spec.image)
                return self._handle(spec, sid)
        raise RuntimeUnavailable(f"service name {kwargs['name']} keeps being taken")

    async def _adopt_or_clear_service(self, client: docker.DockerClient, spec: JobSpec,
                                      name: str) -> Handle | None:
        existing = await self._inspect_service(client, name)
        if existing is None:
            return None
        sid = str(existing["ID"])
        labels = (existing.get("Spec") or {}).get("Labels") or {}
        try:
            attempt = int(labels.get(LABEL_ATTEMPT, ""))
        except ValueError:
            attempt = -1
        if labels.get(LABEL_JOB) == spec.job and attempt == spec.attempt:
            log.info("start.adopted jid=%s job=%s attempt=%d service=%s", spec.jid, spec.job,
                     spec.attempt, sid[:12])
            return self._handle(spec, sid)
        if labels.get(LABEL_JOB) == spec.job and attempt > spec.attempt:
            raise JobRejected(f"service {name} already runs attempt {attempt}, newer than "
                              f"{spec.attempt}")
        log.info("start.replacing jid=%s job=%s attempt=%d service=%s old_job=%s "
                 "old_attempt=%s", spec.jid, spec.job, spec.attempt, sid[:12],
                 labels.get(LABEL_JOB, ""), labels.get(LABEL_ATTEMPT, ""))
        await self._remove_service(client, sid)
        return None

    async def status(self, handles: list[Handle]) -> dict[str, JobStatus]:
        if not handles:
            return {}
        client = await self._client()
        services = {str(s["ID"]): s for s in
                    await self._call(client.api.services, filters=self._filters)}
        wanted = [h.native_id for h in handles if h.native_id in services]
        tasks = (await self._call(client.api.tasks, filters={"service": wanted})
                 if wanted else [])
        first: dict[str, dict[str, Any]] = {}
        for task in sorted(tasks, key=lambda t: (int(t.get("Slot") or 0),
                                                 str(t.get("CreatedAt") or ""))):
            first.setdefault(str(task.get("ServiceID")), task)
        result: dict[str, JobStatus] = {}
        for handle in handles:
            service = services.get(handle.native_id)
            if service is None:
                result[handle.job] = JobStatus("missing", message="service not found")
                continue
            task = first.get(handle.native_id)
            result[handle.job] = task_status(
                task, oom_killed=await self._container_oom(task),
                memory_limited=not self.settings.ignore_limits,
                stopped_by_us=handle.native_id in self._stopped_services)
        self._stopped_services.intersection_update(services)
        return result

    async def _container_oom(self, task: dict[str, Any] | None) -> bool | None:
        """``State.OOMKilled`` of an ended task's container, when it is on this node."""
        status = (task or {}).get("Status") or {}
        cid = (status.get("ContainerStatus") or {}).get("ContainerID")
        if not cid or status.get("State") not in ("failed", "shutdown"):
            return None
        attrs = await self._inspect(str(cid))
        return None if attrs is None else bool((attrs.get("State") or {}).get("OOMKilled"))

    async def logs(self, handle: Handle, tail: int) -> str:
        if tail <= 0:
            return ""
        client = await self._client()
        try:
            data = await self._run(client.api.service_logs, handle.native_id, stdout=True,
                                   stderr=True, tail=tail)
        except docker.errors.NotFound:
            return ""
        except ENGINE_ERRORS as exc:
            raise self._failure(exc) from exc
        if not isinstance(data, bytes):  # a generator of chunks
            data = b"".join(data)
        return data.decode("utf-8", errors="replace")

    async def cancel(self, handle: Handle, grace: float = 10.0) -> None:
        # A service cannot be stopped in place: scaled to 0, its task is shut down
        # (SIGTERM, then SIGKILL after the service's stop grace period).
        client = await self._client()
        self._stopped_services.add(handle.native_id)
        log.info("cancel job=%s attempt=%d service=%s", handle.job, handle.attempt,
                 handle.native_id[:12])
        service = await self._inspect_service(client, handle.native_id)
        if service is None:
            return
        version = int((service.get("Version") or {}).get("Index") or 0)
        try:
            await self._run(client.api.update_service, handle.native_id, version,
                            mode=ServiceMode("replicated", replicas=0), fetch_current_spec=True)
        except docker.errors.NotFound:
            return
        except ENGINE_ERRORS as exc:
            raise self._failure(exc) from exc

    async def remove(self, handle: Handle, force: bool = True) -> None:
        client = await self._client()
        await self._remove_service(client, handle.native_id)
        log.info("removed job=%s attempt=%d service=%s", handle.job, handle.attempt,
                 handle.native_id[:12])
        self._stopped_services.discard(handle.native_id)

    async def list_ours(self) -> list[Handle]:
        client = await self._client()
        handles = []
        for service in await self._call(client.api.services, filters=self._filters):
            spec = service.get("Spec") or {}
            labels = spec.get("Labels") or {}
            try:
                attempt = int(labels.get(LABEL_ATTEMPT, ""))
            except ValueError:
                log.warning("list.skipped service=%s reason=bad-attempt-label",
                            str(service.get("ID"))[:12])
                continue
            if not labels.get(LABEL_JOB):
                continue
            handles.append(Handle(self.name, str(service["ID"]), str(labels[LABEL_JOB]),
                                  attempt, str(labels.get(LABEL_NAME) or spec.get("Name", "")),
                                  str(labels.get(LABEL_JOB_TYPE, "plugin"))))
        return handles

    async def _inspect_service(self, client: docker.DockerClient,
                               ref: str) -> dict[str, Any] | None:
        try:
            return await self._run(client.api.inspect_service, ref)
        except docker.errors.NotFound:
            return None
        except ENGINE_ERRORS as exc:
            raise self._failure(exc) from exc

    async def _remove_service(self, client: docker.DockerClient, ref: str) -> None:
        try:
            await self._run(client.api.remove_service, ref)
        except docker.errors.NotFound:
            pass
        except ENGINE_ERRORS as exc:
            raise self._failure(exc) from exc
