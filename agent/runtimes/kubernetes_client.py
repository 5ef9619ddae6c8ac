"""The Kubernetes API as the runtime uses it: configuration, JSON calls off the event
loop, and the client's errors translated at this edge.

Why the official synchronous client in a thread pool rather than
``kubernetes_asyncio``: it is the client the issue names and the one kmock's tooling
targets, it is generated from the same OpenAPI spec a release ahead, and the agent
already runs the docker SDK this way.  Every call runs in a pool of
``max_concurrency`` threads with a connect/read timeout, so the event loop never
waits on the API server.  Answers are read as plain JSON (``_preload_content=False``):
no model objects are built for them.

Configuration: ``KUBECONFIG`` (and a context) when set, else the in-cluster service
account, else ``~/.kube/config``; loaded on first use, in the pool (it reads files).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.watch.watch import iter_resp_lines

from agent.runtimes.base import JobRejected, RuntimeFailure, RuntimeUnavailable
from agent.runtimes.docker_config import short_error
from agent.runtimes.kubernetes_manifest import KubernetesSettings

__all__ = ["KubernetesApi", "NameTaken", "end_watch", "load_client_configuration", "status_is",
           "watch_events"]

T = TypeVar("T")

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
CONNECT_TIMEOUT = 5.0  # seconds to open a connection to the API server
THREAD_JOIN_TIMEOUT = 5.0  # seconds close() waits for calls still running
WATCH_SECONDS = 300  # a watch asks the server to end after this long (then reopened)
WATCH_READ_TIMEOUT = WATCH_SECONDS + 30.0  # an idle watch connection is given up after this

# Errors that mean "the API server did not answer properly".
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (urllib3.exceptions.HTTPError, OSError)


class NameTaken(Exception):
    """A create answered 409: an object of that name exists."""


def load_client_configuration(settings: KubernetesSettings, *,
                              environ: Mapping[str, str] | None = None,
                              service_account_dir: Path = SERVICE_ACCOUNT_DIR
                              ) -> k8s.Configuration:
    """The client configuration: ``settings.kubeconfig`` (and ``context``) when set,
    else the in-cluster service account (``KUBERNETES_SERVICE_HOST`` and a token),
    else the default kubeconfig.  Blocking (reads files); raises the loaders' errors."""
    environ = os.environ if environ is None else environ
    configuration = k8s.Configuration()
    token = service_account_dir / "token"
    if settings.kubeconfig:
        k8s_config.load_kube_config(config_file=settings.kubeconfig, context=settings.context,
                                    client_configuration=configuration, persist_config=False)
    elif environ.get("KUBERNETES_SERVICE_HOST") and token.exists():
        # try_refresh_token: bound service-account tokens rotate; re-read them.
        k8s_config.incluster_config.InClusterConfigLoader(
            str(token), str(service_account_dir / "ca.crt"), try_refresh_token=True,
            environ=environ).load_and_set(configuration)
    else:
        k8s_config.load_kube_config(context=settings.context,
                                    client_configuration=configuration, persist_config=False)
    configuration.connection_pool_maxsize = settings.max_concurrency + 2
    configuration.retries = False  # one try; the supervisor retries what is transient
    return configuration


def status_is(failure: RuntimeFailure, *codes: int) -> bool:
    """Whether ``failure`` came from an API answer with one of these HTTP statuses."""
    cause = failure.__cause__
    return isinstance(cause, k8s.ApiException) and cause.status in codes


class KubernetesApi:
    """Calls ``BatchV1Api``/``CoreV1Api`` methods by name, in a bounded thread pool.

    Every error is a ``RuntimeFailure`` whose ``__cause__`` is the client's exception
    (``status_is`` reads its HTTP status)."""

    def __init__(self, settings: KubernetesSettings) -> None:
        self.settings = settings
        self.host = ""
        self._executor = ThreadPoolExecutor(max_workers=settings.max_concurrency,
                                            thread_name_prefix="pfleet-kubernetes")
        self._client: k8s.ApiClient | None = None
        self._apis: dict[str, Any] = {}  # "batch" / "core" -> the typed API object
        self._lock = asyncio.Lock()
        self._closed = False

    async def json(self, api: str, method: str, /, *args: Any, creating: bool = False,
                   **kwargs: Any) -> dict[str, Any]:
        """``method`` of the ``api`` ("batch" or "core") answered with a JSON object.
        ``creating``: an API refusal is ``JobRejected`` and a 409 ``NameTaken``."""
        try:
            data = await self.raw(api, method, *args, **kwargs)
        except RuntimeFailure as exc:
            if creating and status_is(exc, 409):
                raise NameTaken() from exc.__cause__
            if creating and status_is(exc, 400, 403, 404, 422):
                raise JobRejected(f"Kubernetes refused the Job: {_api_message(exc.__cause__)}"
                                  ) from exc.__cause__
            raise
        try:
            body = json.loads(data)
        except ValueError as exc:
            raise RuntimeUnavailable(f"Kubernetes API answered something that is not "
                                     f"JSON: {short_error(repr(data[:200]))}") from exc
        return body if isinstance(body, dict) else {}

    async def raw(self, api: str, method: str, /, *args: Any, **kwargs: Any) -> bytes:
        """``method`` of the ``api`` API: the whole answer body."""
        await self._connect()
        bound = getattr(self._apis[api], method)
        try:
            return await self._run(_call_raw, bound, *args,
                                   _request_timeout=(CONNECT_TIMEOUT,
                                                     self.settings.request_timeout), **kwargs)
        except (k8s.ApiException, *TRANSPORT_ERRORS) as exc:
            raise self.failure(exc) from exc

    async def watch(self, api: str, method: str, /, *args: Any, **kwargs: Any) -> Any:
        """Open a watch of ``method`` (a list call): the streaming HTTP response, to be
        read in a thread of its own (``watch_events``) and ended with ``end_watch``."""
        await self._connect()
        bound = getattr(self._apis[api], method)
        try:
            return await self._run(functools.partial(
                bound, *args, watch=True, _preload_content=False,
                _request_timeout=(CONNECT_TIMEOUT, WATCH_READ_TIMEOUT), **kwargs))
        except (k8s.ApiException, *TRANSPORT_ERRORS) as exc:
            raise self.failure(exc) from exc

    def failure(self, exc: BaseException) -> RuntimeFailure:
        """Translate a client or transport error (a ``RuntimeFailure`` stays as it is)."""
        if isinstance(exc, RuntimeFailure):
            return exc
        if isinstance(exc, k8s.ApiException):
            return RuntimeUnavailable(f"Kubernetes API error {exc.status or 0}: "
                                      f"{_api_message(exc)}")
        where = f" at {self.host}" if self.host else ""
        return RuntimeUnavailable(f"Kubernetes API server{where} unreachable: "
                                  f"{short_error(str(exc))}")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        client, self._client = self._client, None
        loop = asyncio.get_running_loop()
        if client is not None:
            with contextlib.suppress(Exception):  # closing a broken client is still closed
                await loop.run_in_executor(self._executor, client.close)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.to_thread(self._executor.shutdown, wait=True), THREAD_JOIN_TIMEOUT)

    async def _connect(self) -> None:
        if self._client is not None:
            return
        async with self._lock:
            if self._client is not None:
                return
            try:
                # Building the client loads CA files too: all of it off the loop.
                host, client = await self._run(_new_client, self.settings)
            except RuntimeFailure:
                raise
            # Loading a kubeconfig raises many types (ConfigException, YAML and file
            # errors); each means the same thing here: no usable configuration.
            except Exception as exc:
                raise RuntimeUnavailable(
                    "no usable Kubernetes configuration (KUBECONFIG, in-cluster service "
                    f"account, ~/.kube/config): {short_error(str(exc))}") from exc
            self.host, self._client = host, client
            self._apis = {"batch": k8s.BatchV1Api(client), "core": k8s.CoreV1Api(client)}

    async def _run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        if self._closed:
            raise RuntimeUnavailable("the kubernetes runtime is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))


def watch_events(response: Any) -> Iterator[dict[str, Any]]:
    """The events of a watch response (blocking; ends with the stream, on an ``ERROR``
    event, or when ``end_watch`` shuts the connection)."""
    for line in iter_resp_lines(response):
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if not isinstance(event, dict) or event.get("type") == "ERROR":
            return  # e.g. 410 Gone: the caller opens a new watch
        yield event


def end_watch(response: Any) -> None:
    """Close a watch from another thread: the reader blocked in it wakes up."""
    with contextlib.suppress(Exception):  # already closed, or broken: ended either way
        shutdown = getattr(response, "shutdown", None)  # urllib3 >= 2.3
        if shutdown is not None:
            shutdown()
        response.close()


def _new_client(settings: KubernetesSettings) -> tuple[str, k8s.ApiClient]:
    configuration = load_client_configuration(settings)
    return str(configuration.host), k8s.ApiClient(configuration)


def _call_raw(method: Callable[..., Any], *args: Any, **kwargs: Any) -> bytes:
    """Run one API method without building model objects; the whole body as bytes."""
    response = method(*args, _preload_content=False, **kwargs)
    try:
        return bytes(response.data)
    finally:
        response.release_conn()


def _api_message(exc: Any) -> str:
    """The reason and ``message`` of an API Status body, else the HTTP reason."""
    try:
        body = json.loads(exc.body or "")
        if isinstance(body, dict) and body.get("message"):
            return short_error(f"{body.get('reason') or exc.reason}: {body['message']}")
    except (TypeError, ValueError):
        pass
    return short_error(str(exc.reason or exc))
