"""The Docker/Podman runtime: one container per job attempt, through the ``docker`` SDK.

Podman is driven through its Docker-compatible socket; ``DockerSettings.engine``
only switches the quirks below and the runtime name reported to the controller.

What this module promises (see ``base.Runtime`` for the contract):

* The event loop never blocks: the calls on a job's path (create, start, inspect,
  logs, stop, remove) go straight to the engine over aiohttp
  (``docker_http.EngineHTTP``); the rarer SDK calls run in a thread pool of
  ``max_concurrency`` threads; the event stream has a thread of its own.
* A container is named after the job (``spec.name``) and carries pfleet's labels
  (job, attempt, agent, jid) next to ``JOB_LABELS`` and pfcon's job_type label,
  so ``list_ours()`` finds every one again after an agent restart.
* ``start`` is idempotent on (name, attempt) and never leaves a container behind
  when it rejects a job.
* The SDK's exceptions stop here: callers see only ``JobRejected`` and
  ``RuntimeUnavailable``.

Engine differences found on Docker 20.10 and Podman 4.3 (compat API v1.41):

* Podman answers 500 for errors that are the job's fault (name in use, invalid
  name, OCI runtime failures), so create/start errors are classified by their
  text as well as their status (``docker_config.PERMANENT_ERROR_MARKERS``).
* Podman silently drops GPU device requests, so the podman engine rejects GPU jobs
  up front instead of running them without a GPU.
* Podman never sets ``State.OOMKilled`` (cgroup v1): exit 137 under a memory limit
  is reported as OOM, marked as inferred (``docker_config.status_from_inspect``).
* Podman's event filter takes its own names (``died``, ``remove``) but reports
  Docker's (``die``); the filter lists below account for both.
* Podman creates a missing bind-mount source instead of refusing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import random
import ssl
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import docker
import docker.errors
import docker.models.containers
import docker.utils.utils
import requests

from agent.protocol import JobSpec
from agent.runtimes.base import (
    LABEL_AGENT,
    LABEL_ATTEMPT,
    LABEL_JID,
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
from agent.runtimes.docker_config import (
    GPU_ERROR_MARKER,
    MIB,
    DockerSettings,
    build_create_kwargs,
    is_name_conflict,
    is_permanent_create_error,
    parse_container_user,
    short_error,
    status_from_inspect,
)
from agent.runtimes.docker_http import TRANSPORT_ERRORS, EngineHTTP, unsupported_url
from agent.runtimes.keyed_locks import KeyedLocks

__all__ = ["DockerRuntime", "DockerSettings"]

log = logging.getLogger("pfleet.agent.docker")

T = TypeVar("T")

INFO_TTL = 30.0  # seconds an engine info() answer is reused (it is slow-ish)
THREAD_JOIN_TIMEOUT = 5.0  # seconds close() waits for the event and pool threads
DEFAULT_DOCKER_URL = "unix:///var/run/docker.sock"

# Errors that mean "the engine did not answer properly" rather than a bug in pfleet.
ENGINE_ERRORS: tuple[type[BaseException], ...] = (
    docker.errors.DockerException,
    requests.exceptions.RequestException,
    OSError,
    *TRANSPORT_ERRORS,
)

# Container events that change a job's state.  Podman filters on its native names
# (died, remove) and reports Docker's (die); unknown names simply never match.
EVENT_ACTIONS = {
    "docker": ["start", "die", "oom", "destroy"],
    "podman": ["start", "died", "oom", "remove"],
}

# A container whose summary state is one of these keeps its inspected status until
# the summary changes, so a steady fleet costs one list call per status().
STABLE_SUMMARY_STATES = frozenset({"running", "paused", "exited", "dead"})
DIRECT_INSPECT_MAX = 2  # status() of this many handles or fewer inspects them directly



class DockerRuntime(Runtime):
    """Runs each job attempt as one Docker or Podman container.

    Construction does no I/O (the engine may be down when the agent starts); it
    raises ``ValueError`` naming every bad setting.  The client is created on first
    use; a ``docker_local_volume`` storeBase is resolved on first probe/start.
    """

    def __init__(self, settings: DockerSettings, *, rng: random.Random | None = None) -> None:
        url = settings.base_url or os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_URL
        problems = [*settings.validate(), *filter(None, [unsupported_url(url)])]
        if problems:
            raise ValueError("docker runtime settings: " + "; ".join(problems))
        self.settings = settings
        self.name = settings.engine
        self._user = parse_container_user(settings.container_user)
        self._rng = rng or random.SystemRandom()
        self._url = url
        self._filters = {"label": f"{LABEL_AGENT}={settings.agent_name}"}
        self._executor = ThreadPoolExecutor(
            max_workers=settings.max_concurrency, thread_name_prefix=f"pfleet-{settings.engine}"
        )
        self._docker: docker.DockerClient | None = None
        self._http: EngineHTTP | None = None
        self._client_lock = asyncio.Lock()
        self._info: dict[str, Any] | None = None
        self._info_at = 0.0
        self._storebase = settings.storebase if settings.volume_type == "host" else None
        self._locks = KeyedLocks()
        self._status_cache: dict[str, tuple[str, JobStatus]] = {}  # id -> (summary, status)
        self._stopped: set[str] = set()  # container ids pfleet stopped (not OOM on podman)
        self._event_streams = 0
        self._closed = False

    # ------------------------------------------------------------------ interface

    def capabilities(self) -> Capabilities:
        # Podman's compat API drops GPU device requests (see the module docstring).
        return Capabilities(
            multi_worker=False, hard_memory_limit=True, gpus=self.settings.engine == "docker"
        )

    async def probe(self) -> Probe:
        try:
            client = await self._client()
            await self._run(client.ping)
            info = await self._engine_info()
            cpu = int(info.get("NCPU") or 0) * 1000
            memory = int(info.get("MemTotal") or 0) // MIB
            await self._storebase_path()
        # A probe never raises: any failure, expected or not, is an unhealthy report.
        except Exception as exc:
            reason = str(exc) if isinstance(exc, RuntimeFailure) else str(self._failure(exc))
            return Probe("unhealthy", reason=reason)
        return Probe("healthy", cpu_millicores=cpu, memory_mib=memory, gpus=self.settings.gpus)

    async def start(self, spec: JobSpec) -> Handle:
        if spec.number_of_workers != 1:
            raise JobRejected(
                f"number_of_workers must be 1 on {self.name}, not {spec.number_of_workers}"
            )
        if not spec.image:
            raise JobRejected("no image given")
        if spec.gpu_limit > 0 and self.settings.engine == "podman":
            raise JobRejected(
                f"GPU unavailable: {spec.gpu_limit} GPU(s) requested, but GPUs "
                "cannot be given to containers through Podman's "
                "Docker-compatible API"
            )
        client = await self._client()
        storebase = await self._storebase_path()
        info = await self._engine_info()
        try:
            kwargs = build_create_kwargs(
                spec,
                self.settings,
                storebase,
                swap_limit=bool(info.get("SwapLimit", True)),
                user=self._user,
                rng=self._rng,
            )
        except ValueError as exc:
            raise JobRejected(str(exc)) from exc
        async with self._locks.hold(f"name:{spec.name}"):
            return await self._create_and_start(client, spec, kwargs)

    async def status(self, handles: list[Handle]) -> dict[str, JobStatus]:
        if not handles:
            return {}
        client = await self._client()
        if len(handles) <= DIRECT_INSPECT_MAX:
            return await self._status_direct(handles)
        rows = await self._call(client.api.containers, all=True, filters=self._filters)
        by_id = {str(row.get("Id")): row for row in rows}
        result: dict[str, JobStatus] = {}
        wanted: list[tuple[Handle, str, str]] = []
        for handle in handles:
            row = _find_row(by_id, handle.native_id)
            if row is None:
                result[handle.job] = JobStatus("missing", message="container not found")
                continue
            cid, summary = str(row["Id"]), str(row.get("State") or "")
            cached = self._status_cache.get(cid)
            if cached is not None and cached[0] == summary and summary in STABLE_SUMMARY_STATES:
                result[handle.job] = cached[1]
            else:
                wanted.append((handle, cid, summary))
        answers = await asyncio.gather(
            *(self._inspect(cid) for _, cid, _ in wanted), return_exceptions=True
        )
        for (handle, cid, summary), attrs in zip(wanted, answers, strict=True):
            if isinstance(attrs, BaseException):
                raise self._failure(attrs) from attrs
            if attrs is None:
                result[handle.job] = JobStatus("missing", message="container not found")
                continue
            status = status_from_inspect(
                attrs, engine=self.settings.engine, stopped_by_us=cid in self._stopped
            )
            if status.state == "unknown":
                log.warning(
                    "status.unknown jid=%s container=%s state=%s",
                    _jid(attrs),
                    cid[:12],
                    status.message,
                )
            self._status_cache[cid] = (summary, status)
            result[handle.job] = status
        for cid in set(self._status_cache) - by_id.keys():
            del self._status_cache[cid]
        self._stopped.intersection_update(by_id)
        return result

    async def _status_direct(self, handles: list[Handle]) -> dict[str, JobStatus]:
        """Status of a few workloads (an engine event names one): one inspect each."""
        answers = await asyncio.gather(
            *(self._inspect(_ref(h)) for h in handles), return_exceptions=True
        )
        result: dict[str, JobStatus] = {}
        for handle, attrs in zip(handles, answers, strict=True):
            if isinstance(attrs, BaseException):
                raise self._failure(attrs) from attrs
            labels = ((attrs or {}).get("Config") or {}).get("Labels") or {}
            if attrs is None or labels.get(LABEL_AGENT) != self.settings.agent_name:
                result[handle.job] = JobStatus("missing", message="container not found")
                continue
            cid = str(attrs["Id"])
            result[handle.job] = status_from_inspect(
                attrs, engine=self.settings.engine, stopped_by_us=cid in self._stopped
            )
        return result

    async def logs(self, handle: Handle, tail: int) -> str:
        if tail <= 0:
            return ""
        api = await self._api()
        try:
            data = await api.logs(_ref(handle), tail)
        except docker.errors.NotFound:
            return ""
        except ENGINE_ERRORS as exc:
            raise self._failure(exc) from exc
        return data.decode("utf-8", errors="replace")

    async def cancel(self, handle: Handle, grace: float = 10.0) -> None:
        api = await self._api()
        self._stopped.add(handle.native_id)
        log.info(
            "cancel jid=%s job=%s attempt=%d container=%s grace=%s",
            _handle_jid(handle),
            handle.job,
            handle.attempt,
            handle.native_id[:12],
            grace,
        )
        try:
            await api.stop(_ref(handle), max(0, math.ceil(grace)))
        except docker.errors.NotFound:
            return
        except ENGINE_ERRORS as exc:
            raise self._failure(exc) from exc

    async def remove(self, handle: Handle, force: bool = True) -> None:
        api = await self._api()
        try:
            await api.remove_container(_ref(handle), force=force)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            if "already in progress" not in str(exc.explanation or exc).lower():
                raise self._failure(exc) from exc
        except ENGINE_ERRORS as exc:
            raise self._failure(exc) from exc
        log.info(
            "removed jid=%s job=%s attempt=%d container=%s",
            _handle_jid(handle),
            handle.job,
            handle.attempt,
            handle.native_id[:12],
        )
        self._status_cache.pop(handle.native_id, None)
        self._stopped.discard(handle.native_id)

    async def list_ours(self) -> list[Handle]:
        client = await self._client()
        rows = await self._call(client.api.containers, all=True, filters=self._filters)
        handles = []
        for row in rows:
            labels = row.get("Labels") or {}
            names = row.get("Names") or [""]
            try:
                attempt = int(labels.get(LABEL_ATTEMPT, ""))
            except ValueError:
                log.warning(
                    "list.skipped container=%s reason=bad-attempt-label", str(row.get("Id"))[:12]
                )
                continue
            job = labels.get(LABEL_JOB)
            if not job:
                continue
            handles.append(
                Handle(
                    self.name,
                    str(row["Id"]),
                    str(job),
                    attempt,
                    str(names[0]).lstrip("/"),
                    str(labels.get(LABEL_JOB_TYPE, "plugin")),
                )
            )
        return handles

    async def changes(self) -> AsyncIterator[str]:
        """Job ids from the engine's container events (start, die, oom, destroy).

        The iteration ends when the stream breaks or cannot be opened (the agent
        polls ``status`` meanwhile and restarts this later); ``close()`` ends it.
        """
        if self._closed:
            return
        filters = {"type": ["container"], "label": [self._filters["label"]],
                   "event": EVENT_ACTIONS[self.settings.engine]}
        opened = False

        def on_open() -> None:
            nonlocal opened
            opened = True
            self._event_streams += 1

        try:
            api = await self._api()
            async for event in api.events(filters, on_open=on_open):
                job = ((event.get("Actor") or {}).get("Attributes") or {}).get(LABEL_JOB)
                if job:
                    yield str(job)
            log.info("events.ended engine=%s", self.name)
        # The stream ends by being closed under us or by the engine going away;
        # either way the agent falls back on polling.
        except (RuntimeFailure, *ENGINE_ERRORS) as exc:
            what = "events.ended" if opened else "events.unavailable"
            log.warning("%s engine=%s reason=%s", what, self.name, short_error(str(exc)))
        finally:
            if opened:
                self._event_streams -= 1

    @property
    def event_streams(self) -> int:
        """How many ``changes()`` streams are open at the engine right now."""
        return self._event_streams

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        client, self._docker = self._docker, None
        http, self._http = self._http, None
        if http is not None:
            await http.close()
        loop = asyncio.get_running_loop()
        if client is not None:
            with contextlib.suppress(Exception):  # closing a broken client is still closed
                await loop.run_in_executor(self._executor, client.close)
        self._executor.shutdown(wait=False, cancel_futures=True)
        # A blocking call still running (a long pull) is not waited for past the bound.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.to_thread(self._executor.shutdown, wait=True), THREAD_JOIN_TIMEOUT
            )

    # -------------------------------------------------------------------- start

    async def _create_and_start(
        self, client: docker.DockerClient, spec: JobSpec, kwargs: dict[str, Any]
    ) -> Handle:
        """Create then start, in as few engine calls as the common case allows: the
        name is looked up only when creating it conflicts (a re-attach, or an older
        attempt to replace), the image only when the engine says it is missing."""
        pulled = False
        for _ in range(4):
            try:
                cid = await self._create_container(client, kwargs)
            except docker.errors.APIError as exc:
                text = short_error(str(exc.explanation or exc))
                if is_name_conflict(exc.status_code, text):
                    existing = await self._inspect(spec.name)
                    if existing is not None:
                        adopted = await self._adopt_or_clear(spec, existing)
                        if adopted is not None:
                            return adopted
                    continue
                if not pulled and exc.status_code == 404 and "image" in text.lower():
                    pulled = True
                    await self._ensure_image(client, spec)
                    continue
                failure = self._failure(exc, creating=True)
                log.warning(
                    "start.failed jid=%s job=%s attempt=%d step=create reason=%s",
                    spec.jid,
                    spec.job,
                    spec.attempt,
                    text,
                )
                raise failure from exc
            except ENGINE_ERRORS as exc:
                raise self._failure(exc) from exc
            await self._start_container(spec, cid)
            log.info(
                "started jid=%s job=%s attempt=%d container=%s image=%s",
                spec.jid,
                spec.job,
                spec.attempt,
                cid[:12],
                spec.image,
            )
            return self._handle(spec, cid)
        raise RuntimeUnavailable(f"container name {spec.name} keeps being taken")

    async def _adopt_or_clear(self, spec: JobSpec, attrs: dict[str, Any]) -> Handle | None:
        """The handle of ``attrs`` when it is this attempt's container (started if it
        was only created); otherwise remove it and return None."""
        cid = str(attrs["Id"])
        labels = (attrs.get("Config") or {}).get("Labels") or {}
        ours = (
            labels.get(LABEL_JOB) == spec.job
            and labels.get(LABEL_AGENT) == self.settings.agent_name
        )
        try:
            attempt = int(labels.get(LABEL_ATTEMPT, ""))
        except ValueError:
            attempt = -1
        if ours and attempt == spec.attempt:
            if (attrs.get("State") or {}).get("Status") == "created":
                await self._start_container(spec, cid)
            log.info(
                "start.adopted jid=%s job=%s attempt=%d container=%s",
                spec.jid,
                spec.job,
                spec.attempt,
                cid[:12],
            )
            return self._handle(spec, cid)
        if ours and attempt > spec.attempt:
            raise JobRejected(
                f"container {spec.name} already runs attempt {attempt}, newer than {spec.attempt}"
            )
        log.info(
            "start.replacing jid=%s job=%s attempt=%d container=%s old_job=%s old_attempt=%s",
            spec.jid,
            spec.job,
            spec.attempt,
            cid[:12],
            labels.get(LABEL_JOB, ""),
            labels.get(LABEL_ATTEMPT, ""),
        )
        try:
            await (await self._api()).remove_container(cid, force=True)
        except docker.errors.NotFound:
            pass
        except ENGINE_ERRORS as exc:
            raise self._failure(exc) from exc
        return None

    async def _start_container(self, spec: JobSpec, cid: str) -> None:
        try:
            await (await self._api()).start(cid)
            return
        except docker.errors.APIError as exc:
            text = short_error(str(exc.explanation or exc))
            if GPU_ERROR_MARKER in text.lower():
                failure: RuntimeFailure = JobRejected(
                    f"GPU unavailable: {spec.gpu_limit} GPU(s) requested but the "
                    f"{self.name} engine has no GPU device driver ({text})"
                )
            else:
                failure = self._failure(exc, creating=True)
            error: BaseException = exc
        except ENGINE_ERRORS as exc:
            failure, error, text = self._failure(exc), exc, str(exc)
        log.warning(
            "start.failed jid=%s job=%s attempt=%d step=start container=%s reason=%s",
            spec.jid,
            spec.job,
            spec.attempt,
            cid[:12],
            short_error(text),
        )
        if isinstance(failure, JobRejected):  # leave no debris behind a rejected job
            with contextlib.suppress(docker.errors.NotFound, *ENGINE_ERRORS):
                await (await self._api()).remove_container(cid, force=True)
        raise failure from error

    async def _ensure_image(self, client: docker.DockerClient, spec: JobSpec) -> None:
        """Return when ``spec.image`` is present, after one pull if it was not."""
        if await self._image_present(client, spec.image):
            return
        async with self._locks.hold(f"image:{spec.image}"):
            if await self._image_present(client, spec.image):
                return
            log.info("image.pull jid=%s image=%s", spec.jid, spec.image)
            reason = await self._call(_pull, client, spec.image)
            if not await self._image_present(client, spec.image):
                log.warning("image.missing jid=%s image=%s reason=%s", spec.jid, spec.image, reason)
                raise JobRejected(
                    f"image not found: {spec.image}: {reason or 'the pull did not produce it'}"
                )

    async def _image_present(self, client: docker.DockerClient, image: str) -> bool:
        try:
            await self._run(client.api.inspect_image, image)
            return True
        except docker.errors.NotFound:
            return False
        except docker.errors.APIError as exc:
            if exc.status_code is not None and 400 <= exc.status_code < 500:
                raise JobRejected(
                    f"image not found: {image}: {short_error(str(exc.explanation or exc))}"
                ) from exc
            raise self._failure(exc) from exc
        except ENGINE_ERRORS as exc:
            raise self._failure(exc) from exc

    # ------------------------------------------------------------------- helpers

    async def _run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Call a blocking function in the bounded pool."""
        if self._closed:
            raise RuntimeUnavailable(f"the {self.name} runtime is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    async def _call(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """``_run`` with every engine error turned into ``RuntimeUnavailable``."""
        try:
            return await self._run(fn, *args, **kwargs)
        except ENGINE_ERRORS as exc:
            raise self._failure(exc) from exc

    async def _client(self) -> docker.DockerClient:
        if self._docker is not None:
            return self._docker
        async with self._client_lock:
            if self._docker is None:
                client = await self._call(self._connect)
                self._http = EngineHTTP(
                    self._url, client.api._version, timeout=self.settings.request_timeout,
                    tls=_tls_context(client.api),
                    connections=max(10, self.settings.max_concurrency + 2))
                self._docker = client
        return self._docker

    async def _api(self) -> EngineHTTP:
        """The direct client for the calls on a job's path (made with the SDK client,
        whose negotiated API version it uses)."""
        await self._client()
        if self._closed or self._http is None:
            raise RuntimeUnavailable(f"the {self.name} runtime is closed")
        return self._http

    async def _create_container(self, client: docker.DockerClient, kwargs: dict[str, Any]) -> str:
        """``containers.create`` as the SDK builds it, sent directly (and without the
        extra inspect the SDK's model layer makes afterwards)."""
        config, name = _container_config(client, kwargs)
        return await (await self._api()).create_container(config, name)

    def _connect(self) -> docker.DockerClient:
        # version="auto" asks the engine, so new engines that dropped old API
        # versions keep working; that is I/O, hence not in __init__.
        options: dict[str, Any] = {
            "version": "auto",
            "timeout": self.settings.request_timeout,
            "max_pool_size": max(10, self.settings.max_concurrency + 2),
        }
        url = self.settings.base_url
        if url and url.startswith("unix://"):
            client = docker.DockerClient(base_url=url, **options)
        else:
            # DOCKER_TLS_VERIFY / DOCKER_CERT_PATH apply to a configured TCP URL too, as
            # for the docker CLI (the agent hands DOCKER_HOST over as base_url).
            environment = {**os.environ, "DOCKER_HOST": url} if url else dict(os.environ)
            try:
                client = docker.from_env(environment=environment, **options)
            except docker.errors.TLSParameterError as exc:
                raise RuntimeUnavailable(
                    f"{self.name} engine at {self._url}: {_tls_files_problem(environment)}"
                ) from exc
        client.api.trust_env = False  # no proxy settings looked up on every request
        return client

    async def _engine_info(self) -> dict[str, Any]:
        now = time.monotonic()
        if self._info is None or now - self._info_at > INFO_TTL:
            client = await self._client()
            self._info = await self._call(client.info)
            self._info_at = now
        return self._info

    async def _storebase_path(self) -> str:
        """The storeBase's host path; for docker_local_volume, the volume's Mountpoint."""
        if self._storebase is not None:
            return self._storebase
        name = str(self.settings.volume_name)
        client = await self._client()
        try:
            volume = await self._run(client.api.inspect_volume, name)
        except docker.errors.NotFound as exc:
            raise RuntimeUnavailable(
                f"storeBase volume {name!r} (VOLUME_NAME) does not exist on the {self.name} engine"
            ) from exc
        except ENGINE_ERRORS as exc:
            raise self._failure(exc) from exc
        driver, mountpoint = volume.get("Driver"), str(volume.get("Mountpoint") or "")
        if driver != "local":
            raise RuntimeUnavailable(
                f"storeBase volume {name!r} (VOLUME_NAME) uses driver "
                f"{driver!r}; only 'local' volumes can be bind-mounted"
            )
        if not mountpoint.startswith("/"):
            raise RuntimeUnavailable(
                f"storeBase volume {name!r} (VOLUME_NAME) has no host mountpoint"
            )
        log.info("storebase.resolved volume=%s path=%s", name, mountpoint)
        self._storebase = mountpoint
        return mountpoint

    async def _inspect(self, ref: str) -> dict[str, Any] | None:
        try:
            return await (await self._api()).inspect_container(ref)
        except docker.errors.NotFound:
            return None
        except ENGINE_ERRORS as exc:
            raise self._failure(exc) from exc


    def _failure(self, exc: BaseException, *, creating: bool = False) -> RuntimeFailure:
        """Translate an SDK/transport error.  ``creating``: a create/start error that
        is the job's fault becomes ``JobRejected``."""
        if isinstance(exc, RuntimeFailure):
            return exc
        if isinstance(exc, docker.errors.APIError):
            text = short_error(str(exc.explanation or exc))
            if creating and is_permanent_create_error(exc.status_code, text):
                return JobRejected(text)
            return RuntimeUnavailable(f"{self.name} engine error: {text}")
        tls_error = _ssl_error(exc)
        if tls_error is not None:  # the SDK buries it at the end of a long message
            return RuntimeUnavailable(f"{self.name} engine unreachable at {self._url}: "
                                      f"TLS error: {short_error(str(tls_error))}")
        return RuntimeUnavailable(
            f"{self.name} engine unreachable at {self._url}: {short_error(str(exc))}"
        )

    def _handle(self, spec: JobSpec, cid: str) -> Handle:
        return Handle(self.name, cid, spec.job, spec.attempt, spec.name, spec.kind)


def _container_config(
    client: docker.DockerClient, kwargs: dict[str, Any]
) -> tuple[dict[str, Any], str | None]:
    """The body and name of the create request the SDK would send for ``kwargs``
    (``containers.run`` style); pure computation, no I/O."""
    args = docker.models.containers._create_container_args(
        {**kwargs, "version": client.api._version})
    name = args.pop("name", None)
    if args.pop("platform", None):
        raise JobRejected("a platform cannot be chosen for pfleet jobs")
    environment = args.get("environment")
    if isinstance(environment, dict):
        environment = docker.utils.utils.format_environment(environment)
    if args.pop("use_config_proxy", True):  # the SDK's default: ~/.docker/config.json proxies
        environment = client.api._proxy_configs.inject_proxy_environment(environment) or None
    args["environment"] = environment
    return dict(client.api.create_container_config(**args)), name


def _tls_context(api: docker.APIClient) -> ssl.SSLContext | None:
    """The TLS settings the SDK resolved (DOCKER_TLS_VERIFY, DOCKER_CERT_PATH) as an
    SSL context for the direct client; None for plain HTTP and unix sockets."""
    if not str(api.base_url).startswith("https://"):
        return None
    verify = api.verify
    context = ssl.create_default_context(cafile=verify if isinstance(verify, str) else None)
    if verify is False:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if api.cert:
        cert, key = api.cert if isinstance(api.cert, tuple) else (api.cert, None)
        context.load_cert_chain(cert, key)
    return context


def _tls_files_problem(environment: dict[str, str]) -> str:
    """What DOCKER_TLS_VERIFY / DOCKER_CERT_PATH lack, in the operator's terms (the SDK's
    own message names neither the directory nor the files)."""
    verify = environment.get("DOCKER_TLS_VERIFY") not in (None, "")
    directory = environment.get("DOCKER_CERT_PATH") or os.path.expanduser("~/.docker")
    needed = ["cert.pem", "key.pem", *(["ca.pem"] if verify else [])]
    missing = [name for name in needed if not os.path.isfile(os.path.join(directory, name))]
    return (f"TLS is on (DOCKER_TLS_VERIFY / DOCKER_CERT_PATH) but {directory} lacks "
            f"{', '.join(missing) or 'a usable certificate'}; it must hold "
            f"{', '.join(needed)}")


def _ssl_error(exc: BaseException) -> ssl.SSLError | None:
    """The TLS error behind a transport failure (the SDK and requests wrap it in
    several layers: causes, arguments, urllib3's ``reason``), if there is one."""
    seen: set[int] = set()
    todo: list[Any] = [exc]
    while todo and len(seen) < 32:
        error = todo.pop()
        if not isinstance(error, BaseException) or id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, ssl.SSLError):
            return error
        todo += [error.__cause__, error.__context__, getattr(error, "reason", None),
                 *error.args]
    return None


def _pull(client: docker.DockerClient, image: str) -> str:
    """Pull ``image`` (its tag, or latest) once; return the engine's error text, if any."""
    error = ""
    try:
        for line in client.api.pull(image, stream=True, decode=True):
            if isinstance(line, dict) and line.get("error"):
                error = str(line["error"])
    except docker.errors.APIError as exc:
        error = str(exc.explanation or exc)
    return short_error(error)


def _find_row(rows: dict[str, dict[str, Any]], native_id: str) -> dict[str, Any] | None:
    row = rows.get(native_id)
    if row is None and native_id:
        row = next((r for cid, r in rows.items() if cid.startswith(native_id)), None)
    return row


def _ref(handle: Handle) -> str:
    return handle.native_id or handle.name


def _jid(attrs: dict[str, Any]) -> str:
    labels = (attrs.get("Config") or {}).get("Labels") or {}
    return str(labels.get(LABEL_JID, ""))


def _handle_jid(handle: Handle) -> str:
    # Containers are named <jid>[-copy|-upload|-delete] (pfcon-api.md §2.3).
    for suffix in ("-copy", "-upload", "-delete"):
        if handle.kind == suffix[1:] and handle.name.endswith(suffix):
            return handle.name[: -len(suffix)]
    return handle.name


