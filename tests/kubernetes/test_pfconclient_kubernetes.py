"""python-pfconclient against the real controller process and a separate
``pfleet-agent`` process with ``CONTAINER_ENV=kubernetes``, pointed at kmock through
a kubeconfig.  Nothing runs the Jobs, so the test plays the cluster (``Kubelet``):
it waits for the Job the agent creates, checks it, "runs" the plugin by writing its
outputs into the storeBase, and moves the pod and Job through their states; the
client's view follows."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pfconclient import client as pfc
from pfconclient.exceptions import PfconRequestException

from tests.conftest import free_port
from tests.e2e.test_pfconclient_zipfile import client_for, plugin_descriptors, poll
from tests.support.kmock_server import KmockServer, Kubelet
from tests.support.processes import ControllerProc, Proc, agent_proc, controller_proc
from tests.support.zips import make_zip

NAMESPACE = "chris"
PVC = "chris-storebase"
IMAGE = "ghcr.io/fnndsc/pl-simpledsapp:2.1.0"


def wait_for(predicate: Any, what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.1) + 1):
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class Stack:
    def __init__(self, workdir: Path, server: KmockServer, poll_interval: str) -> None:
        self.storebase = workdir / "storeBase"
        self.storebase.mkdir()
        kubeconfig = server.write_kubeconfig(workdir / "kubeconfig")
        self.controller: ControllerProc = controller_proc(
            workdir, free_port(), {"CONTAINER_ENV": "kubernetes",
                                   "COMPUTE_VOLUME_TYPE": "kubernetes_pvc",
                                   "STOREBASE_MOUNT": str(self.storebase)},
            local_agent=False)
        self.agent: Proc | None = None
        self.controller.start()
        try:
            self.controller.wait_ready()
            self.agent = agent_proc(workdir, "k8s1", self.controller, {
                "CONTAINER_ENV": "kubernetes", "KUBECONFIG": str(kubeconfig),
                "JOB_NAMESPACE": NAMESPACE, "VOLUME_NAME": PVC,
                "STOREBASE_MOUNT": str(self.storebase), "PFLEET_AGENT_POLL_INTERVAL": poll_interval,
                "JOB_LABELS": "chris/tenant=lab"})
            self.agent.start()
            self.controller.wait_agent("k8s1")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.agent is not None:
            self.agent.stop()
        self.controller.stop()


@pytest.fixture
def stack(request: pytest.FixtureRequest, tmp_path: Path, kmock_server: KmockServer,
          kubelet: Kubelet) -> Iterator[Stack]:
    # The cluster's one node: its allocatable resources are the agent's capacity.
    kubelet.add_node("node-1", "8", "16Gi")
    s = Stack(tmp_path, kmock_server, getattr(request, "param", "0.3"))
    try:
        yield s
    finally:
        s.stop()


def submit(client: pfc.Client, jid: str, **descriptors: Any) -> None:
    client.submit_job(pfc.JobType.PLUGIN, jid,
                      {**plugin_descriptors(image=IMAGE), **descriptors},
                      make_zip({"a.txt": b"alpha\n", "sub/b.txt": b"beta\n"}))


def status(client: pfc.Client, jid: str) -> dict[str, Any]:
    return dict(client.get_job_status(pfc.JobType.PLUGIN, jid)["compute"])


# The agent polls only every 120 s here: it sees the Job start and end through its
# watch on the Jobs (Runtime.changes), well before the client's polls give up.
@pytest.mark.parametrize("stack", ["120"], indirect=True)
def test_zipfile_flow_on_kubernetes(stack: Stack, kmock_server: KmockServer,
                                    kubelet: Kubelet, tmp_path: Path) -> None:
    client = client_for(stack.controller.base)
    info = client.get_server_info()
    assert (info["container_env"], info["compute_volume_type"]) == ("kubernetes",
                                                                    "kubernetes_pvc")
    agents = stack.controller.agents()
    assert agents[0]["name"] == "k8s1"
    assert agents[0]["capacity"]["cpu_millicores"] == 8000  # the node's allocatable
    assert agents[0]["capacity"]["memory_mib"] == 16384

    jid = "chris-jid-11"
    submit(client, jid)
    job = wait_for(lambda: kubelet.job(jid), "the agent to create the Job")
    pod_spec = job["spec"]["template"]["spec"]
    container = pod_spec["containers"][0]
    assert job["metadata"]["namespace"] == NAMESPACE
    assert job["metadata"]["labels"]["chris/tenant"] == "lab"
    assert container["image"] == IMAGE
    assert container["command"][-2:] == ["/share/incoming", "/share/outgoing"]
    assert pod_spec["volumes"] == [{"name": "storebase",
                                    "persistentVolumeClaim": {"claimName": PVC}}]
    assert container["volumeMounts"] == [
        {"name": "storebase", "mountPath": "/share/incoming", "readOnly": True,
         "subPath": f"key-{jid}/incoming"},
        {"name": "storebase", "mountPath": "/share/outgoing", "readOnly": False,
         "subPath": f"key-{jid}/outgoing"}]
    assert status(client, jid)["status"] == "notStarted"  # a Job without a running pod

    # The cluster runs it: the pod's container writes the outputs, then ends.
    kmock_server.serve_logs({f"{jid}-p0001": "copied ./a.txt\ncopied ./sub/b.txt\ndone\n"})
    pod = kubelet.run(jid)
    wait_for(lambda: status(client, jid)["status"] == "started", "started")
    key = stack.storebase / f"key-{jid}"
    (key / "outgoing" / "sub").mkdir(parents=True, exist_ok=True)
    (key / "outgoing" / "a.txt.out").write_bytes((key / "incoming" / "a.txt").read_bytes())
    (key / "outgoing" / "sub" / "b.txt.out").write_text("beta\n")
    kubelet.finish(jid, pod)
    assert poll(client, pfc.JobType.PLUGIN, jid) == "finishedSuccessfully"
    assert status(client, jid)["logs"] == "copied ./a.txt\ncopied ./sub/b.txt\ndone\n"

    out = tmp_path / "out"
    client.get_plugin_job_files(jid, str(out))
    assert (out / "a.txt.out").read_text() == "alpha\n"
    assert (out / "sub" / "b.txt.out").read_text() == "beta\n"

    client.submit_job(pfc.JobType.DELETE, jid, {})
    assert poll(client, pfc.JobType.DELETE, jid) == "finishedSuccessfully"
    assert not key.exists()
    client.delete_job(pfc.JobType.PLUGIN, jid)
    wait_for(lambda: kubelet.job(jid) is None, "the Job to be deleted")
    with pytest.raises(PfconRequestException) as err:
        client.get_job_status(pfc.JobType.PLUGIN, jid)
    assert err.value.code == 404


def test_oom_and_image_failures_reach_the_client(stack: Stack, kubelet: Kubelet) -> None:
    client = client_for(stack.controller.base)
    submit(client, "oom", number_of_workers=2, memory_limit=100)
    submit(client, "noimage")
    job = wait_for(lambda: kubelet.job("oom"), "the oom Job")
    assert job["spec"]["parallelism"] == job["spec"]["completions"] == 2
    kubelet.finish("oom", kubelet.run("oom"), 137, "OOMKilled")
    assert poll(client, pfc.JobType.PLUGIN, "oom") == "finishedWithError"
    assert status(client, "oom")["message"] == "OOMKilled"

    wait_for(lambda: kubelet.job("noimage"), "the noimage Job")
    pod = kubelet.make_pod("noimage")
    kubelet.set_pod(pod, {"waiting": {"reason": "ImagePullBackOff",
                                      "message": f'Back-off pulling image "{IMAGE}"'}},
                    "Pending")
    assert poll(client, pfc.JobType.PLUGIN, "noimage") == "finishedWithError"
    message = status(client, "noimage")["message"]
    assert message.startswith("image pull failed: ImagePullBackOff") and IMAGE in message
