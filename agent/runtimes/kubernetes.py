"""The Kubernetes runtime: one batch/v1 Job per job attempt, through the official
``kubernetes`` client.

The API calls, their thread pool and the client configuration are in
``kubernetes_client``; the Job is rendered by ``kubernetes_manifest`` and read back by
``kubernetes_status``; this module decides what to ask.

What this module promises (see ``base.Runtime`` for the contract):

* ``start`` is idempotent on (name, attempt): a Job of this attempt is adopted, one
  of an older attempt (or another pfleet job of the same name) is deleted first, a
  Job of that name that pfleet did not create is never touched (``JobRejected``).
* ``status`` costs two list calls (Jobs and pods carrying this agent's label),
  whatever the number of handles.  Label selectors are sent, and the answers are
  filtered on the labels again (an API server or emulator may ignore them).
* ``changes`` follows a watch on this agent's Jobs, so an ending job is reported at
  once rather than at the next poll.
* The client's exceptions stop here: callers see ``JobRejected`` (the API refused the
  Job: invalid, forbidden, unknown namespace) and ``RuntimeUnavailable``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from agent.protocol import JobSpec
from agent.runtimes.base import (
    LABEL_AGENT,
    LABEL_ATTEMPT,
    LABEL_JOB,
    LABEL_JOB_TYPE,
    Capabilities,
    Handle,
    JobRejected,
    JobStatus,
    Probe,
    Runtime,
    RuntimeFailure,
    RuntimeUnavailable,
)
from agent.runtimes.docker_config import parse_container_user
from agent.runtimes.keyed_locks import KeyedLocks
from agent.runtimes.kubernetes_client import (
    THREAD_JOIN_TIMEOUT,
    WATCH_SECONDS,
    KubernetesApi,
    NameTaken,
    end_watch,
    load_client_configuration,
    status_is,
    watch_events,
)
from agent.runtimes.kubernetes_manifest import (
    ANNOTATION_AGENT,
    ANNOTATION_JOB,
    ANNOTATION_NAME,
    KubernetesSettings,
    build_job,
    label_value,
    selector,
)
from agent.runtimes.kubernetes_status import job_status, node_capacity

__all__ = ["KubernetesRuntime", "KubernetesSettings", "load_client_configuration"]

log = logging.getLogger("pfleet.agent.kubernetes")

NODES_TTL = 30.0  # seconds a healthy node capacity sum is reused (listing nodes is not free)
REPLACE_WAIT = 10.0  # seconds start() waits for a deleted older Job to disappear

_END = object()  # end-of-stream marker passed from the watch thread to the loop


class KubernetesRuntime(Runtime):
    """Runs each job attempt as one Kubernetes Job in ``settings.namespace``.

    Construction does no I/O; it raises ``ValueError`` naming every bad setting.
    """

    name = "kubernetes"

    def __init__(self, settings: KubernetesSettings, *,
                 rng: random.Random | None = None) -> None:
        problems = settings.validate()
        if problems:
            raise ValueError("kubernetes runtime settings: " + "; ".join(problems))
        self.settings = settings
        self._user = parse_container_user(settings.container_user)
        self._rng = rng or random.SystemRandom()
        self._agent_label = label_value(settings.agent_name)
        self._selector = selector({LABEL_AGENT: self._agent_label})
        self._api = KubernetesApi(settings)
        self._nodes: tuple[float, Probe] | None = None
        self._locks = KeyedLocks()
        self._watches: set[Any] = set()
        self._threads: set[threading.Thread] = set()
        self._closed = False

    # ------------------------------------------------------------------ interface

    def capabilities(self) -> Capabilities:
        return Capabilities(multi_worker=True, hard_memory_limit=True, gpus=True)

    async def probe(self) -> Probe:
        try:
            # Cheap liveness and permission check on every probe: one Job, this agent's.
            await self._api.json("batch", "list_namespaced_job", self.settings.namespace,
                                 label_selector=self._selector, limit=1)
            now = time.monotonic()
            if self._nodes is not None and now - self._nodes[0] <= NODES_TTL:
                return self._nodes[1]
            probe = await self._node_probe()
            # Only a healthy answer is reused: a cluster without nodes is asked again.
            self._nodes = (now, probe) if probe.health == "healthy" else None
            return probe
        # A probe never raises: any failure, expected or not, is an unhealthy report.
        except Exception as exc:
            return Probe("unhealthy", reason=str(self._api.failure(exc)))

    async def _node_probe(self) -> Probe:
        try:
            body = await self._api.json("core", "list_node",
                                        label_selector=selector(self.settings.node_selector))
        except RuntimeFailure as exc:
            if status_is(exc, 403):
                # No RBAC on nodes: healthy, but capacity must come from the settings.
                log.warning("probe.nodes-forbidden namespace=%s: set PFLEET_AGENT_CPU_"
                            "MILLICORES and PFLEET_AGENT_MEMORY_MIB", self.settings.namespace)
                return Probe("healthy", gpus=self.settings.gpus)
            raise
        cpu, memory, gpus, counted = node_capacity(body.get("items") or [],
                                                   self.settings.node_selector)
        if not counted:
            return Probe("unhealthy", reason="no ready, schedulable node matches "
                         f"NODE_SELECTOR {selector(self.settings.node_selector) or '(any)'}")
        return Probe("healthy", cpu_millicores=cpu, memory_mib=memory,
                     gpus=gpus or self.settings.gpus)

    async def start(self, spec: JobSpec) -> Handle:
        if spec.number_of_workers < 1:
            raise JobRejected(f"number_of_workers must be at least 1, not "
                              f"{spec.number_of_workers}")
        if not spec.image:
            raise JobRejected("no image given")
        try:
            manifest = build_job(spec, self.settings, user=self._user, rng=self._rng)
        except ValueError as exc:
            raise JobRejected(str(exc)) from exc
        name = manifest["metadata"]["name"]
        async with self._locks.hold(name):
            for _ in range(4):
                try:
                    await self._api.json("batch", "create_namespaced_job",
                                         self.settings.namespace, manifest, creating=True)
                except NameTaken:
                    if await self._adopt_or_clear(spec, name):
                        return self._handle(spec, name)
                    continue
                log.info("started jid=%s job=%s attempt=%d k8s_job=%s image=%s", spec.jid,
                         spec.job, spec.attempt, name, spec.image)
                return self._handle(spec, name)
        raise RuntimeUnavailable(f"Job name {name} keeps being taken")

    async def status(self, handles: list[Handle]) -> dict[str, JobStatus]:
        if not handles:
            return {}
        jobs = {_name(j): j for j in await self._ours("jobs", self._selector)}
        pods = await self._ours("pods", self._selector)
        result: dict[str, JobStatus] = {}
        for handle in handles:
            job = jobs.get(handle.native_id)
            if job is None or not _is_attempt(job, handle):
                result[handle.job] = JobStatus("missing", message="Job not found")
                continue
            result[handle.job] = job_status(job, [p for p in pods if _is_attempt(p, handle)])
        return result

    async def logs(self, handle: Handle, tail: int) -> str:
        if tail <= 0:
            return ""
        pods = [p for p in await self._ours("pods", self._attempt_selector(handle))
                if _is_attempt(p, handle)]
        pods.sort(key=lambda p: (str(_meta(p).get("creationTimestamp") or ""), _name(p)))
        texts = []
        for pod in pods:
            try:
                data = await self._api.raw("core", "read_namespaced_pod_log", _name(pod),
                                           self.settings.namespace, tail_lines=tail)
            except RuntimeFailure as exc:
                # 400: the container is waiting to start (ContainerCreating, pulling):
                # no output yet.  404: the pod went away meanwhile.
                if status_is(exc, 400, 404):
                    continue
                raise
            texts.append(data.decode("utf-8", errors="replace"))
        lines = "".join(t if t.endswith("\n") or not t else t + "\n" for t in texts)
        return "".join(lines.splitlines(keepends=True)[-tail:])

    async def cancel(self, handle: Handle, grace: float = 10.0) -> None:
        # A Job cannot be stopped in place; a deadline already passed makes the Job
        # controller stop its pods (with their termination grace period) and mark the
        # Job Failed/DeadlineExceeded, keeping it and its logs until removed.
        job = await self._read(handle.native_id)
        if job is None or not _is_attempt(job, handle):
            return
        log.info("cancel job=%s attempt=%d k8s_job=%s", handle.job, handle.attempt,
                 handle.native_id)
        patch = {"spec": {"activeDeadlineSeconds": max(1, math.ceil(grace))}}
        try:
            await self._api.json("batch", "patch_namespaced_job", handle.native_id,
                                 self.settings.namespace, patch)
        except RuntimeFailure as exc:
            if not status_is(exc, 404):
                raise

    async def remove(self, handle: Handle, force: bool = True) -> None:
        job = await self._read(handle.native_id)
        if job is None or not _is_attempt(job, handle):
            return  # gone, or the name now belongs to another attempt
        if not force and job_status(job, []).state != "exited":
            raise RuntimeUnavailable(f"Job {handle.native_id} has not finished; remove it "
                                     "with force")
        options: dict[str, Any] = {"propagationPolicy": "Background"}
        uid = _meta(job).get("uid")
        if uid:  # never delete a newer Job that took the name meanwhile
            options["preconditions"] = {"uid": uid}
        try:
            await self._api.json("batch", "delete_namespaced_job", handle.native_id,
                                 self.settings.namespace, body=options)
        except RuntimeFailure as exc:
            if not status_is(exc, 404, 409):
                raise
        log.info("removed job=%s attempt=%d k8s_job=%s", handle.job, handle.attempt,
                 handle.native_id)

    async def list_ours(self) -> list[Handle]:
        handles = []
        for job in await self._ours("jobs", self._selector):
            labels, notes = _meta(job).get("labels") or {}, _meta(job).get("annotations") or {}
            try:
                attempt = int(labels.get(LABEL_ATTEMPT, ""))
            except ValueError:
                log.warning("list.skipped k8s_job=%s reason=bad-attempt-label", _name(job))
                continue
            if not labels.get(LABEL_JOB):
                continue
            handles.append(Handle(self.name, _name(job),
                                  str(notes.get(ANNOTATION_JOB) or labels[LABEL_JOB]), attempt,
                                  str(notes.get(ANNOTATION_NAME) or _name(job)),
                                  str(labels.get(LABEL_JOB_TYPE, "plugin"))))
        return handles

    async def changes(self) -> AsyncIterator[str]:
        """Job ids whose Job changed, from a watch on this agent's Jobs.

        Pods are not watched: a Job changes when a pod becomes ready or ends, and a pod
        stuck before it runs (an image pull) is seen by the next poll.  The watch starts
        from a list's resourceVersion, so existing Jobs are not replayed; the stream is
        read in a thread of its own and the iteration ends when it breaks (the agent
        polls meanwhile and restarts this later) or on ``close()``.
        """
        if self._closed:
            return
        try:
            listed = await self._api.json("batch", "list_namespaced_job",
                                          self.settings.namespace,
                                          label_selector=self._selector, limit=1)
            version = str(_meta(listed).get("resourceVersion") or "")
            response = await self._api.watch(
                "batch", "list_namespaced_job", self.settings.namespace,
                label_selector=self._selector, timeout_seconds=WATCH_SECONDS,
                **({"resource_version": version} if version else {}))
        except RuntimeFailure as exc:
            log.warning("watch.unavailable reason=%s", exc)
            return
        if self._closed:  # close() ran while the watch was being opened
            end_watch(response)
            return
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        thread = threading.Thread(target=self._pump, args=(response, loop, queue),
                                  name="pfleet-kubernetes-watch", daemon=True)
        self._watches.add(response)
        self._threads = {t for t in self._threads if t.is_alive()} | {thread}
        thread.start()
        try:
            while True:
                item = await queue.get()
                if item is _END:
                    log.info("watch.ended namespace=%s", self.settings.namespace)
                    return
                yield str(item)
        finally:
            self._watches.discard(response)
            end_watch(response)

    def _pump(self, response: Any, loop: asyncio.AbstractEventLoop,
              queue: asyncio.Queue[object]) -> None:
        """Watch thread: hand the job id of each changed Job to the loop."""
        try:
            for event in watch_events(response):
                meta = _meta(event.get("object") or {})
                labels = meta.get("labels") or {}
                job = (meta.get("annotations") or {}).get(ANNOTATION_JOB) or labels.get(LABEL_JOB)
                if job and labels.get(LABEL_AGENT) == self._agent_label:
                    loop.call_soon_threadsafe(queue.put_nowait, str(job))
        # The stream ends by being shut under us, a timeout or the server going away;
        # each way the iteration ends and the agent falls back on polling.
        except Exception as exc:
            log.debug("watch.stream-closed reason=%s", exc)
        finally:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                loop.call_soon_threadsafe(queue.put_nowait, _END)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for response in list(self._watches):
            end_watch(response)
        self._watches.clear()
        threads = [t for t in self._threads if t.is_alive()]
        self._threads.clear()
        await self._api.close()
        await asyncio.to_thread(_join_all, threads, THREAD_JOIN_TIMEOUT)

    # -------------------------------------------------------------------- start

    async def _adopt_or_clear(self, spec: JobSpec, name: str) -> bool:
        """True when the Job ``name`` is this attempt's; otherwise remove it (if pfleet
        made it) and wait, bounded, until it is gone, then return False."""
        job = await self._read(name)
        if job is None:
            return False
        labels = _meta(job).get("labels") or {}
        if not labels.get(LABEL_JOB):
            raise JobRejected(f"a Job named {name} that pfleet did not create exists in "
                              f"namespace {self.settings.namespace}")
        try:
            attempt = int(labels.get(LABEL_ATTEMPT, ""))
        except ValueError:
            attempt = -1
        same_job = labels.get(LABEL_JOB) == label_value(spec.job)
        if same_job and attempt == spec.attempt:
            log.info("start.adopted jid=%s job=%s attempt=%d k8s_job=%s", spec.jid, spec.job,
                     spec.attempt, name)
            return True
        if same_job and attempt > spec.attempt:
            raise JobRejected(f"Job {name} already runs attempt {attempt}, newer than "
                              f"{spec.attempt}")
        log.info("start.replacing jid=%s job=%s attempt=%d k8s_job=%s old_job=%s "
                 "old_attempt=%s", spec.jid, spec.job, spec.attempt, name,
                 labels.get(LABEL_JOB, ""), labels.get(LABEL_ATTEMPT, ""))
        old = Handle(self.name, name, str(labels.get(LABEL_JOB)), attempt, name)
        await self.remove(old, force=True)
        deadline = time.monotonic() + REPLACE_WAIT
        for _ in range(int(REPLACE_WAIT / 0.2) + 1):
            if await self._read(name) is None or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        return False

    # ------------------------------------------------------------------- helpers

    async def _read(self, name: str) -> dict[str, Any] | None:
        try:
            return await self._api.json("batch", "read_namespaced_job", name,
                                        self.settings.namespace)
        except RuntimeFailure as exc:
            if status_is(exc, 404):
                return None
            raise

    async def _ours(self, kind: str, label_selector: str) -> list[dict[str, Any]]:
        """Jobs or pods of the namespace matching ``label_selector``, re-checked here."""
        api, method = (("batch", "list_namespaced_job") if kind == "jobs"
                       else ("core", "list_namespaced_pod"))
        body = await self._api.json(api, method, self.settings.namespace,
                                    label_selector=label_selector)
        wanted = dict(part.split("=", 1) for part in label_selector.split(",") if part)
        items = [i for i in body.get("items") or [] if isinstance(i, dict)]
        out = []
        for item in items:
            labels = _meta(item).get("labels") or {}
            notes = _meta(item).get("annotations") or {}
            if any(labels.get(k) != v for k, v in wanted.items()):
                continue
            if kind == "jobs" and notes.get(ANNOTATION_AGENT, self.settings.agent_name) != \
                    self.settings.agent_name:
                continue  # a label stand-in shared by two agent names
            out.append(item)
        return out

    def _attempt_selector(self, handle: Handle) -> str:
        return selector({LABEL_AGENT: self._agent_label, LABEL_JOB: label_value(handle.job),
                         LABEL_ATTEMPT: str(handle.attempt)})


    def _handle(self, spec: JobSpec, name: str) -> Handle:
        return Handle(self.name, name, spec.job, spec.attempt, spec.name, spec.kind)


def _join_all(threads: list[threading.Thread], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))


def _meta(obj: dict[str, Any]) -> dict[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, dict) else {}


def _name(obj: dict[str, Any]) -> str:
    return str(_meta(obj).get("name") or "")


def _is_attempt(obj: dict[str, Any], handle: Handle) -> bool:
    labels = _meta(obj).get("labels") or {}
    return (labels.get(LABEL_JOB) == label_value(handle.job)
            and labels.get(LABEL_ATTEMPT) == str(handle.attempt))
