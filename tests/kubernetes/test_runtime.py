"""KubernetesRuntime against kmock 0.8 with the official client: the Job objects
created, idempotent starts, the status mapping driven by setting Job and pod status
in the emulator, logs, cancel, removal, listing, probes and the two ways to configure
the client.  kmock never runs anything: ``Kubelet`` plays the cluster's part."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import kmock
import pytest

from agent.runtimes.base import Handle, JobRejected, RuntimeUnavailable
from agent.runtimes.kubernetes import KubernetesRuntime
from agent.runtimes.kubernetes_client import load_client_configuration
from agent.runtimes.kubernetes_manifest import KubernetesSettings, build_job, job_name
from tests.kubernetes.conftest import NAMESPACE, TOKEN, MakeRuntime, job_spec
from tests.support.kmock_server import KmockServer, Kubelet


def k8s_requests(server: KmockServer, method: str = "", path_part: str = "") -> list[Any]:
    return [r for r in server.requests()
            if (not method or str(r.method.value) == method) and path_part in str(r.url.path)]


async def test_start_creates_exactly_the_rendered_job(runtime: KubernetesRuntime,
                                                      kmock_server: KmockServer,
                                                      kubelet: Kubelet) -> None:
    spec = job_spec("chris-jid-1", cpu_limit=2000, memory_limit=512, gpu_limit=1,
                    number_of_workers=2)
    handle = await runtime.start(spec)
    assert (handle.runtime, handle.native_id, handle.job, handle.attempt, handle.name) == (
        "kubernetes", "chris-jid-1", spec.job, 1, "chris-jid-1")
    stored = kubelet.job("chris-jid-1")
    assert stored == build_job(spec, runtime.settings)
    (create,) = k8s_requests(kmock_server, "POST", "/jobs")
    assert str(create.url.path) == f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs"
    assert create.headers["Authorization"] == f"Bearer {TOKEN}"  # from the kubeconfig


async def test_a_jid_kubernetes_cannot_take_gets_a_valid_name(runtime: KubernetesRuntime,
                                                              kubelet: Kubelet) -> None:
    spec = job_spec("Chris_JID." + "x" * 80)
    handle = await runtime.start(spec)
    assert handle.native_id == job_name(spec.name) != spec.name
    assert kubelet.job(handle.native_id) is not None
    (found,) = await runtime.list_ours()
    assert (found.name, found.job, found.attempt) == (spec.name, spec.job, 1)


async def test_start_is_idempotent_per_attempt(runtime: KubernetesRuntime,
                                               kmock_server: KmockServer) -> None:
    spec = job_spec()
    first = await runtime.start(spec)
    assert await runtime.start(spec) == first
    assert len(k8s_requests(kmock_server, "POST", "/jobs")) == 2  # second one: 409, adopted
    assert not k8s_requests(kmock_server, "DELETE")


async def test_an_older_attempt_is_replaced_a_newer_one_refused(runtime: KubernetesRuntime,
                                                                kubelet: Kubelet) -> None:
    spec1 = job_spec("again")
    await runtime.start(spec1)
    spec2 = job_spec("again", attempt=2)
    await runtime.start(spec2)
    job = kubelet.job("again")
    assert job is not None
    assert job["metadata"]["labels"]["org.chrisproject.pfleet.attempt"] == "2"
    with pytest.raises(JobRejected, match="newer"):
        await runtime.start(spec1)


async def test_a_job_pfleet_did_not_make_is_never_touched(runtime: KubernetesRuntime,
                                                          kubelet: Kubelet) -> None:
    kubelet.batch.create_namespaced_job(NAMESPACE, {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "theirs"},
        "spec": {"template": {"spec": {"containers": []}}}}, _preload_content=False)
    with pytest.raises(JobRejected, match="did not create"):
        await runtime.start(job_spec("theirs"))
    assert kubelet.job("theirs") is not None


async def test_status_follows_the_job_and_its_pods(runtime: KubernetesRuntime,
                                                   kubelet: Kubelet) -> None:
    handle = await runtime.start(job_spec("life"))

    async def state() -> tuple[str, str]:
        status = (await runtime.status([handle]))[handle.job]
        return status.state, status.message

    assert await state() == ("pending", "no pod yet")
    kubelet.set_job_status("life", {"active": 1, "startTime": "2026-11-24T10:00:00Z"})
    pod = kubelet.make_pod("life")
    assert await state() == ("pending", "ContainerCreating")
    kubelet.set_pod(pod, {"running": {"startedAt": "2026-11-24T10:00:03Z"}}, "Running")
    assert await state() == ("running", "running")
    # pman#225: the Job's counters all empty for a moment: still running.
    kubelet.set_job_status("life", {"active": None, "startTime": None})
    assert await state() == ("running", "running")
    kubelet.finish("life", pod)
    status = (await runtime.status([handle]))[handle.job]
    assert (status.state, status.exit_code, status.oom) == ("exited", 0, False)
    assert status.started_at.startswith("20") and status.finished_at.startswith("20")


async def test_oom_and_exit_codes_come_from_the_pods(runtime: KubernetesRuntime,
                                                     kubelet: Kubelet) -> None:
    oom = await runtime.start(job_spec("oom"))
    bad = await runtime.start(job_spec("bad"))
    kubelet.finish("oom", kubelet.run("oom"), 137, "OOMKilled")
    kubelet.finish("bad", kubelet.run("bad"), 3)
    statuses = await runtime.status([oom, bad])
    assert (statuses[oom.job].oom, statuses[oom.job].message) == (True, "OOMKilled")
    assert (statuses[bad.job].exit_code, statuses[bad.job].oom) == (3, False)


async def test_an_image_that_cannot_be_pulled_is_a_start_failure(runtime: KubernetesRuntime,
                                                                 kubelet: Kubelet) -> None:
    handle = await runtime.start(job_spec("noimage", image="registry.invalid/nope:1"))
    pod = kubelet.make_pod("noimage")
    kubelet.set_pod(pod, {"waiting": {"reason": "ErrImagePull", "message": "not found"}},
                    "Pending")
    assert (await runtime.status([handle]))[handle.job].state == "pending"
    kubelet.set_pod(pod, {"waiting": {"reason": "ImagePullBackOff",
                                      "message": 'Back-off pulling image '
                                                 '"registry.invalid/nope:1"'}}, "Pending")
    status = (await runtime.status([handle]))[handle.job]
    assert status.state == "exited" and status.extra == {"failed": True}
    assert "image pull failed: ImagePullBackOff" in status.message
    assert "registry.invalid/nope:1" in status.message


async def test_status_is_two_list_calls_for_many_jobs(runtime: KubernetesRuntime,
                                                      kmock_server: KmockServer,
                                                      kubelet: Kubelet) -> None:
    handles = [await runtime.start(job_spec(f"many-{i}")) for i in range(5)]
    for h in handles[:3]:
        kubelet.run(h.native_id)
    before = len(kmock_server.requests())
    statuses = await runtime.status(handles)
    new = kmock_server.requests()[before:]
    assert [(str(r.method.value), str(r.url.path).rsplit("/", 1)[-1]) for r in new] == [
        ("GET", "jobs"), ("GET", "pods")]
    assert "org.chrisproject.pfleet.agent=k1" in new[0].params["labelSelector"]
    assert [statuses[h.job].state for h in handles] == ["running"] * 3 + ["pending"] * 2


async def test_a_deleted_or_replaced_job_is_missing(runtime: KubernetesRuntime,
                                                    kubelet: Kubelet) -> None:
    handle = await runtime.start(job_spec("gone"))
    kubelet.batch.delete_namespaced_job("gone", NAMESPACE, _preload_content=False)
    assert (await runtime.status([handle]))[handle.job].state == "missing"
    newer = await runtime.start(job_spec("gone", attempt=2))
    assert (await runtime.status([handle]))[handle.job].state == "missing"  # not attempt 1's
    assert (await runtime.status([newer]))[newer.job].state == "pending"


async def test_logs_of_every_pod_with_tail_and_while_creating(runtime: KubernetesRuntime,
                                                              kmock_server: KmockServer,
                                                              kubelet: Kubelet) -> None:
    handle = await runtime.start(job_spec("logs", number_of_workers=2))
    texts: dict[str, str] = {}
    waiting: set[str] = set()

    def reply(request: Any) -> Any:
        name = str(request.name)
        if name in waiting:  # what the API server answers before the container runs
            return kmock.KubernetesError(
                status=400, reason="BadRequest",
                message=f'container "logs" in pod "{name}" is waiting to start: '
                        "ContainerCreating")
        tail = int(request.params.get("tailLines", 10**6))
        return "".join(texts[name].splitlines(True)[-tail:]).encode()

    kmock_server.call(lambda: kmock_server.handler[kmock.resource("v1/pods"),
                                                    kmock.subresource("log")] << reply)
    assert await runtime.logs(handle, 10) == ""  # no pod yet
    creating = kubelet.make_pod("logs")
    waiting.add(creating)
    assert await runtime.logs(handle, 10) == ""  # the container is being created
    second = kubelet.make_pod("logs", {"running": {"startedAt": "2026-11-24T10:00:00Z"}},
                              "Running")
    texts.update({creating: "a1\na2\na3\n", second: "b1\nb2"})
    assert await runtime.logs(handle, 10) == "b1\nb2\n"
    waiting.clear()
    assert await runtime.logs(handle, 10) == "a1\na2\na3\nb1\nb2\n"
    assert await runtime.logs(handle, 3) == "a3\nb1\nb2\n"
    log_calls = k8s_requests(kmock_server, "GET", "/log")
    assert log_calls[-1].params["tailLines"] == "3"
    assert await runtime.logs(handle, 0) == ""


async def test_cancel_sets_a_passed_deadline(runtime: KubernetesRuntime,
                                             kubelet: Kubelet) -> None:
    handle = await runtime.start(job_spec("stopme"))
    await runtime.cancel(handle, grace=2.5)
    job = kubelet.job("stopme")
    assert job is not None and job["spec"]["activeDeadlineSeconds"] == 3
    await runtime.cancel(Handle("kubernetes", "absent", "x", 1, "absent"))  # no error


async def test_remove_deletes_in_the_background_and_is_idempotent(
        runtime: KubernetesRuntime, kmock_server: KmockServer, kubelet: Kubelet) -> None:
    handle = await runtime.start(job_spec("rm"))
    await runtime.remove(handle)
    assert kubelet.job("rm") is None
    (delete,) = k8s_requests(kmock_server, "DELETE")
    assert json.loads(delete.body)["propagationPolicy"] == "Background"
    await runtime.remove(handle)  # already gone: fine
    assert await runtime.list_ours() == []


async def test_remove_of_an_old_attempt_leaves_the_new_one(runtime: KubernetesRuntime,
                                                           kubelet: Kubelet) -> None:
    spec = job_spec("keep")
    await runtime.start(job_spec("keep", attempt=2, job=spec.job))
    await runtime.remove(Handle("kubernetes", "keep", spec.job, 1, "keep"))
    assert kubelet.job("keep") is not None


async def test_list_ours_only_this_agents_jobs(make_runtime: MakeRuntime) -> None:
    mine, theirs = make_runtime(), make_runtime(agent_name="k2")
    a = await mine.start(job_spec("a1"))
    await theirs.start(job_spec("b1"))
    assert await mine.list_ours() == [a]


async def test_probe_reports_the_capacity_of_matching_nodes(make_runtime: MakeRuntime,
                                                            kubelet: Kubelet) -> None:
    kubelet.add_node("n1", "3900m", "16Gi", {"chris": "yes"}, gpus="1")
    kubelet.add_node("n2", "8", "32Gi", {"chris": "yes"})
    kubelet.add_node("n3", "64", "256Gi", {"chris": "no"})
    kubelet.add_node("n4", "8", "32Gi", {"chris": "yes"}, ready=False)
    probe = await make_runtime(node_selector={"chris": "yes"}).probe()
    assert (probe.health, probe.cpu_millicores, probe.memory_mib, probe.gpus) == (
        "healthy", 11900, 48 * 1024, 1)
    none = await make_runtime(node_selector={"chris": "maybe"}).probe()
    assert none.health == "unhealthy" and "NODE_SELECTOR chris=maybe" in none.reason


async def test_probe_is_unhealthy_when_the_api_server_does_not_answer(
        runtime: KubernetesRuntime, kmock_server: KmockServer, kubelet: Kubelet) -> None:
    kubelet.add_node("n1", "2", "4Gi")
    assert (await runtime.probe()).health == "healthy"
    kmock_server.stop()
    probe = await runtime.probe()
    assert probe.health == "unhealthy"
    assert "unreachable" in probe.reason and kmock_server.url in probe.reason
    with pytest.raises(RuntimeUnavailable):
        await runtime.status([Handle("kubernetes", "x", "x", 1, "x")])


async def test_an_api_refusal_of_the_job_rejects_it(runtime: KubernetesRuntime,
                                                    kmock_server: KmockServer) -> None:
    def refuse(_request: Any) -> Any:
        return kmock.KubernetesError(
            status=422, reason="Invalid",
            message='Job.batch "x" is invalid: spec.template.spec.containers[0].image: '
                    "Required value")

    kmock_server.call(lambda: kmock_server.handler["post", kmock.resource("batch/v1/jobs")]
                      << refuse)
    with pytest.raises(JobRejected, match="Required value"):
        await runtime.start(job_spec("refused"))


async def test_bad_specs_are_rejected_before_any_call(runtime: KubernetesRuntime,
                                                      kmock_server: KmockServer) -> None:
    with pytest.raises(JobRejected, match="number_of_workers"):
        await runtime.start(job_spec(number_of_workers=0))
    with pytest.raises(JobRejected, match="image"):
        await runtime.start(job_spec(image=""))
    assert kmock_server.requests() == []


async def test_without_any_configuration_it_says_so(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.kube/config there
    runtime = KubernetesRuntime(KubernetesSettings(volume_name="pvc"))
    try:
        probe = await runtime.probe()
        assert probe.health == "unhealthy"
        assert "no usable Kubernetes configuration" in probe.reason
        with pytest.raises(RuntimeUnavailable):
            await runtime.start(job_spec())
    finally:
        await runtime.close()


def test_in_cluster_configuration_over_tls(kmock_tls: tuple[KmockServer, Any],
                                           tmp_path: Path) -> None:
    server, files = kmock_tls
    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    (sa / "token").write_text("in-cluster-token")  # as the kubelet writes it: no newline
    (sa / "ca.crt").write_bytes(files.ca.read_bytes())
    port = server.url.rsplit(":", 1)[1]
    configuration = load_client_configuration(
        KubernetesSettings(volume_name="pvc"), service_account_dir=sa,
        environ={"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": port})
    assert configuration.host == f"https://127.0.0.1:{port}"
    from kubernetes import client as k8s
    with k8s.ApiClient(configuration) as api:
        k8s.BatchV1Api(api).list_namespaced_job(NAMESPACE, _preload_content=False)
    (request,) = server.requests()
    assert request.headers["Authorization"].lower() == "bearer in-cluster-token"


def test_kubeconfig_context_is_honoured(kmock_server: KmockServer, tmp_path: Path) -> None:
    path = kmock_server.write_kubeconfig(tmp_path / "config")
    data = json.loads(path.read_text())
    data["contexts"].append({"name": "elsewhere", "context": {"cluster": "nowhere",
                                                              "user": "tester"}})
    data["clusters"].append({"name": "nowhere", "cluster": {"server": "http://127.0.0.1:9"}})
    path.write_text(json.dumps(data))
    default = load_client_configuration(KubernetesSettings(volume_name="p", kubeconfig=str(path)))
    other = load_client_configuration(KubernetesSettings(volume_name="p", kubeconfig=str(path),
                                                         context="elsewhere"))
    assert (default.host, other.host) == (kmock_server.url, "http://127.0.0.1:9")


def _watching(server: KmockServer) -> bool:
    return any(r.params.get("watch") == "true" for r in server.requests())


async def _until(predicate: Any, what: str, within: float = 10.0) -> None:
    for _ in range(int(within / 0.05)):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def test_changes_follow_a_watch_on_this_agents_jobs(make_runtime: MakeRuntime,
                                                          kmock_server: KmockServer,
                                                          kubelet: Kubelet) -> None:
    runtime, other = make_runtime(), make_runtime(agent_name="k2")
    changes = runtime.changes()
    first = asyncio.ensure_future(anext(changes))
    await _until(lambda: _watching(kmock_server), "the watch request")
    (watch,) = [r for r in kmock_server.requests() if r.params.get("watch") == "true"]
    assert watch.params["labelSelector"] == "org.chrisproject.pfleet.agent=k1"
    assert watch.params["timeoutSeconds"] == "300"
    await other.start(job_spec("not-mine"))  # another agent's Job: no change for us
    handle = await runtime.start(job_spec("watched"))
    assert await asyncio.wait_for(first, 10) == handle.job  # ADDED
    pod = kubelet.run("watched")
    kubelet.finish("watched", pod)
    assert await asyncio.wait_for(anext(changes), 10) == handle.job  # MODIFIED
    await changes.aclose()
    await _until(lambda: not [t for t in threading.enumerate()
                              if t.name == "pfleet-kubernetes-watch"], "the watch thread to end")


async def test_close_ends_an_open_watch(runtime: KubernetesRuntime,
                                        kmock_server: KmockServer) -> None:
    changes = runtime.changes()
    pending = asyncio.ensure_future(anext(changes))
    await _until(lambda: _watching(kmock_server), "the watch request")
    await runtime.close()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(pending, 10)
    assert not [t for t in threading.enumerate() if t.name == "pfleet-kubernetes-watch"]
    assert [item async for item in runtime.changes()] == []  # closed: nothing to follow


async def test_changes_end_when_the_api_server_is_gone(runtime: KubernetesRuntime,
                                                       kmock_server: KmockServer) -> None:
    kmock_server.stop()
    assert [item async for item in runtime.changes()] == []


async def test_probe_without_rbac_on_nodes_is_healthy_without_capacity(
        runtime: KubernetesRuntime, kmock_server: KmockServer) -> None:
    forbidden = kmock.KubernetesError(status=403, reason="Forbidden",
                                      message='nodes is forbidden: User "system:serviceaccount:'
                                              'chris:pfleet" cannot list resource "nodes"')
    kmock_server.call(lambda: kmock_server.handler["get", kmock.resource("v1/nodes")]
                      << forbidden)
    probe = await runtime.probe()
    assert (probe.health, probe.cpu_millicores, probe.memory_mib) == ("healthy", 0, 0)


async def test_remove_without_force_refuses_an_unfinished_job(runtime: KubernetesRuntime,
                                                              kubelet: Kubelet) -> None:
    handle = await runtime.start(job_spec("busy"))
    kubelet.run("busy")
    with pytest.raises(RuntimeUnavailable, match="with force"):
        await runtime.remove(handle, force=False)
    assert kubelet.job("busy") is not None
