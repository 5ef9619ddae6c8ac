"""A Kubernetes API for the tests: kmock's emulator in a thread of its own, and a
stand-in for the Job controller and the kubelet.

No real API server can be installed on these machines (TESTBED.md), so the
Kubernetes runtime talks to kmock 0.8 (an in-memory API emulator) through the official
client.  kmock stores what it is sent and serves it back: it never runs a Job, makes
no pods, ignores label selectors and has no log endpoint.  ``Kubelet`` does what the
cluster would, through the same HTTP API: it creates the pods of a Job (with the
labels the Job controller copies from the template), moves their containers through
waiting/running/terminated and sets the Job's status and conditions; ``serve_logs``
answers the pods' log subresource.

The server runs its own event loop in a thread, so synchronous tests (python-pfconclient
flows) and separate agent processes can use it while the test blocks.

Fixtures: ``kmock_server`` (plain HTTP on 127.0.0.1) and ``kmock_tls`` (HTTPS with a
throwaway CA, for the in-cluster configuration).

PYTEST_DONT_REWRITE
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp.test_utils
import kmock
import pytest
from kubernetes import client as k8s

__all__ = ["KmockServer", "Kubelet", "kmock_server", "kmock_tls"]

T = TypeVar("T")
START_TIMEOUT = 10.0


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class KmockServer:
    """kmock's KubernetesEmulator behind an aiohttp server, in a thread."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self._ssl = ssl_context
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self.handler: kmock.KubernetesEmulator | None = None
        self.url = ""
        self._thread = threading.Thread(target=self._main, name="kmock", daemon=True)

    def start(self) -> KmockServer:
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT) or self._error is not None:
            raise RuntimeError(f"kmock did not start: {self._error!r}")
        return self

    def stop(self) -> None:
        """Stop serving (idempotent); the port is closed when this returns."""
        if self._stop is not None and self._thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop just closed by itself
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(START_TIMEOUT)

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported to start(); the thread just ends
            self._error = exc
            self._ready.set()
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        server_cls = _tls_server(self._ssl) if self._ssl else aiohttp.test_utils.RawTestServer
        async with kmock.KubernetesEmulator() as handler, \
                kmock.Server(handler, server_cls=server_cls) as server:
            # The resources a cluster always has: lists answer [] before any object exists.
            handler.resources["batch/v1/jobs"] = kmock.ResourceInfo(namespaced=True, kind="Job")
            handler.resources["v1/pods"] = kmock.ResourceInfo(namespaced=True, kind="Pod")
            handler.resources["v1/nodes"] = kmock.ResourceInfo(namespaced=False, kind="Node")
            self.handler = handler
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` in the server's loop (kmock's DSL is not thread-safe) and return."""
        async def run() -> T:
            return fn()
        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(START_TIMEOUT)

    def requests(self) -> list[Any]:
        """Every request kmock received so far (kmock ``Request`` records)."""
        assert self.handler is not None
        handler = self.handler
        return self.call(lambda: list(handler))

    def serve_logs(self, logs: Callable[[str], str] | dict[str, str]) -> None:
        """Answer ``GET .../pods/NAME/log`` with ``logs[NAME]`` (or ``logs(NAME)``),
        honouring ``tailLines`` like the API server."""
        def reply(request: Any) -> Any:
            name = str(request.name)
            text = logs(name) if callable(logs) else logs.get(name, "")
            tail = request.params.get("tailLines")
            if tail is not None:
                text = "".join(text.splitlines(keepends=True)[-int(tail):])
            return text.encode()  # bytes: served as they are

        assert self.handler is not None
        handler = self.handler
        self.call(lambda: handler[kmock.resource("v1/pods"), kmock.subresource("log")] << reply)

    def api_client(self, **configuration: Any) -> k8s.ApiClient:
        cfg = k8s.Configuration()
        cfg.host = self.url
        for key, value in configuration.items():
            setattr(cfg, key, value)
        return k8s.ApiClient(cfg)

    def write_kubeconfig(self, path: Path, *, token: str = "test-token",
                         namespace: str = "default") -> Path:
        """A kubeconfig naming this server (its one context is current)."""
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
            "clusters": [{"name": "kmock", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": token}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "tester",
                                                       "namespace": namespace}}],
        }))
        return path


def _tls_server(context: ssl.SSLContext) -> type[aiohttp.test_utils.RawTestServer]:
    class TLSRawTestServer(aiohttp.test_utils.RawTestServer):
        async def start_server(self, **kwargs: Any) -> None:
            await super().start_server(ssl=context, **kwargs)

    return TLSRawTestServer


class Kubelet:
    """Plays the Job controller and kubelet for Jobs in one namespace, over the API."""

    def __init__(self, server: KmockServer, namespace: str = "default") -> None:
        self.api = server.api_client()
        self.batch = k8s.BatchV1Api(self.api)
        self.core = k8s.CoreV1Api(self.api)
        self.namespace = namespace
        self._pods = 0

    def close(self) -> None:
        self.api.close()

    def job(self, name: str) -> dict[str, Any] | None:
        try:
            resp = self.batch.read_namespaced_job(name, self.namespace, _preload_content=False)
        except k8s.ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return dict(json.loads(resp.data))

    def jobs(self) -> list[dict[str, Any]]:
        resp = self.batch.list_namespaced_job(self.namespace, _preload_content=False)
        return list(json.loads(resp.data)["items"])

    def pods(self, job_name: str) -> list[dict[str, Any]]:
        resp = self.core.list_namespaced_pod(self.namespace, _preload_content=False)
        return [p for p in json.loads(resp.data)["items"]
                if (p["metadata"].get("labels") or {}).get("job-name") == job_name]

    def make_pod(self, job_name: str, state: dict[str, Any] | None = None,
                 phase: str = "Pending") -> str:
        """A pod of the Job, as the Job controller makes it; returns its name."""
        job = self.job(job_name)
        assert job is not None, f"no Job {job_name}"
        template = job["spec"]["template"]
        self._pods += 1
        name = f"{job_name[:52]}-p{self._pods:04d}"
        labels = {**(template["metadata"].get("labels") or {}), "job-name": job_name,
                  "batch.kubernetes.io/job-name": job_name}
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "namespace": self.namespace, "labels": labels,
                            "creationTimestamp": now()},
               "spec": template["spec"]}
        self.core.create_namespaced_pod(self.namespace, pod, _preload_content=False)
        self.set_pod(name, state or {"waiting": {"reason": "ContainerCreating"}}, phase)
        return name

    def set_pod(self, pod_name: str, state: dict[str, Any], phase: str) -> None:
        status = {"phase": phase,
                  "containerStatuses": [{"name": "c", "ready": "running" in state,
                                         "restartCount": 0, "state": state}]}
        self.core.patch_namespaced_pod_status(pod_name, self.namespace, {"status": status},
                                              _preload_content=False)

    def set_job_status(self, job_name: str, status: dict[str, Any]) -> None:
        self.batch.patch_namespaced_job_status(job_name, self.namespace, {"status": status},
                                               _preload_content=False)

    # The usual lifecycle of a one-pod Job, step by step.

    def run(self, job_name: str) -> str:
        pod = self.make_pod(job_name)
        self.set_pod(pod, {"running": {"startedAt": now()}}, "Running")
        self.set_job_status(job_name, {"active": 1, "ready": 1, "startTime": now()})
        return pod

    def finish(self, job_name: str, pod: str, exit_code: int = 0, reason: str = "") -> None:
        reason = reason or ("Completed" if exit_code == 0 else "Error")
        self.set_pod(pod, {"terminated": {"exitCode": exit_code, "reason": reason,
                                          "startedAt": now(), "finishedAt": now()}},
                     "Succeeded" if exit_code == 0 else "Failed")
        if exit_code == 0:
            self.set_job_status(job_name, {
                "active": 0, "ready": 0, "succeeded": 1, "completionTime": now(),
                "conditions": [{"type": "Complete", "status": "True",
                                "lastTransitionTime": now()}]})
        else:
            self.set_job_status(job_name, {
                "active": 0, "ready": 0, "failed": 1,
                "conditions": [{"type": "Failed", "status": "True",
                                "reason": "BackoffLimitExceeded",
                                "message": "Job has reached the specified backoff limit",
                                "lastTransitionTime": now()}]})

    def add_node(self, name: str, cpu: str, memory: str, labels: dict[str, str] | None = None,
                 *, ready: bool = True, unschedulable: bool = False, gpus: str = "") -> None:
        allocatable = {"cpu": cpu, "memory": memory, "pods": "110"}
        if gpus:
            allocatable["nvidia.com/gpu"] = gpus
        node = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "labels": labels or {}},
                "spec": {"unschedulable": unschedulable},
                "status": {"allocatable": allocatable,
                           "conditions": [{"type": "Ready",
                                           "status": "True" if ready else "False"}]}}
        self.core.create_node(node, _preload_content=False)


@dataclass
class TLSFiles:
    ca: Path
    key: Path


def make_tls(directory: Path) -> TLSFiles:
    """A self-signed certificate for 127.0.0.1 (it is its own CA)."""
    key, cert = directory / "apiserver-key.pem", directory / "apiserver.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
         "-subj", "/CN=kubernetes", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60)
    return TLSFiles(cert, key)


@contextlib.contextmanager
def running_kmock(ssl_context: ssl.SSLContext | None = None) -> Iterator[KmockServer]:
    server = KmockServer(ssl_context).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def kmock_server() -> Iterator[KmockServer]:
    with running_kmock() as server:
        yield server


@pytest.fixture
def kmock_tls(tmp_path: Path) -> Iterator[tuple[KmockServer, TLSFiles]]:
    files = make_tls(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(files.ca, files.key)
    with running_kmock(context) as server:
        yield server, files
