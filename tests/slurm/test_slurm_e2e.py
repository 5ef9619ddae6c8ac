"""python-pfconclient through the real controller and a SLURM agent on a real one-node
SLURM: the docker launcher (on the suite's dockerd, as root) and the charliecloud
launcher (controller, agent and jobs as the unprivileged user ``nobody``); reasons
for OOM, TIMEOUT and cancellation; ``kill -9`` of the agent; a hung slurmctld.

The TIMEOUT job is submitted when the charliecloud deployment starts and checked by
the module's last test: SLURM enforces time limits in whole minutes, checked every
30 s, so it takes 60-90 s, which the other tests spend meanwhile.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pfconclient import client as pfc

from tests.e2e.test_pfconclient_zipfile import COPY_SCRIPT, plugin_descriptors, poll
from tests.slurm.conftest import SlurmDeployment
from tests.support.engines import BUSYBOX_IMAGE, Engine
from tests.support.slurm import NOBODY, SlurmCluster
from tests.support.zips import make_zip

SLOW_IMAGE = "localhost/pfleet-test/slow:1"  # a rule gives it a 1-minute time limit
TIMEOUT_JID = "slurm-timeout"
RUN_ONCE = 'echo run >> "$1/runs.txt"; sleep {secs}; echo finished'
OOM_SCRIPT = "echo allocating; dd if=/dev/zero of=/dev/null bs=300M count=1 && echo survived"


def submit(client: pfc.Client, jid: str, script: str, image: str = BUSYBOX_IMAGE,
           **descriptors: object) -> dict:
    d = plugin_descriptors(script, image=image)
    d.update(descriptors)
    return client.submit_job(pfc.JobType.PLUGIN, jid, d, make_zip({"a.txt": b"alpha\n",
                                                                    "sub/b.txt": b"beta\n"}))


def compute(client: pfc.Client, jid: str) -> dict:
    return client.get_job_status(pfc.JobType.PLUGIN, jid)["compute"]


def wait_status(client: pfc.Client, jid: str, wanted: str, within: float = 60.0) -> None:
    deadline = time.monotonic() + within
    status = ""
    while time.monotonic() < deadline:
        status = compute(client, jid)["status"]
        if status == wanted:
            return
        assert status not in ("finishedSuccessfully", "finishedWithError", "undefined"), \
            f"{jid} ended {status} while waiting for {wanted}: {compute(client, jid)}"
        time.sleep(0.2)
    raise AssertionError(f"{jid} is {status}, not {wanted}, after {within:g} s")


def wait_for(predicate: Callable[[], object], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {within:g} s waiting for {what}")


@pytest.fixture(scope="module")
def ch_deploy(slurm_cluster: SlurmCluster, charliecloud_image: Path) -> Iterator[
        SlurmDeployment]:
    """Everything as ``nobody``, jobs run by ch-run; the TIMEOUT job starts right away."""
    slow = charliecloud_image.parent / "localhost%pfleet-test%slow+1"
    if not slow.exists():
        slow.symlink_to(charliecloud_image.name)
    workdir = slurm_cluster.root / "deploy-ch"
    workdir.mkdir(mode=0o755)
    d = SlurmDeployment(workdir, slurm_cluster, {
        "PFLEET_SLURM_LAUNCHER": "charliecloud",
        "PFLEET_SLURM_IMAGE_DIR": str(charliecloud_image.parent),
        "PFLEET_SLURM_RULES": json.dumps([{"image": "*/slow:*", "timelimit_minutes": 1}]),
    }, user=NOBODY)
    try:
        submit(d.client(), TIMEOUT_JID, "echo started; sleep 300", image=SLOW_IMAGE)
        yield d
    finally:
        d.stop()
        d.remove()


@pytest.fixture(scope="module")
def docker_deploy(slurm_cluster: SlurmCluster, docker_engine: Engine,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmDeployment]:
    """Root's controller and agent; jobs run ``docker run`` on the suite's dockerd."""
    d = SlurmDeployment(tmp_path_factory.mktemp("slurm-docker"), slurm_cluster, {
        "PFLEET_SLURM_LAUNCHER": "docker", "DOCKER_HOST": docker_engine.url})
    try:
        yield d
    finally:
        d.stop()


def check_zipfile_flow(d: SlurmDeployment, jid: str, tmp_path: Path) -> dict:
    client = d.client()
    resp = submit(client, jid, COPY_SCRIPT + "; id -u")
    assert resp["data"]["nfiles"] == 2 and resp["compute"]["status"] == "notStarted"
    assert client.poll_job_status(pfc.JobType.PLUGIN, jid) == "finishedSuccessfully"
    status = compute(client, jid)
    assert "copied ./a.txt" in status["logs"] and "copied ./sub/b.txt" in status["logs"]
    out = tmp_path / jid
    client.get_plugin_job_files(jid, str(out))
    assert (out / "a.txt.out").read_text() == "alpha\n"
    assert (out / "sub" / "b.txt.out").read_text() == "beta\n"
    assert len(list(d.work_dir.glob(f"{jid}.1.*"))) == 4  # script, output, result, jobid
    assert list(d.slurm_jobs(jid).values()) == ["COMPLETED"]
    client.delete_job(pfc.JobType.PLUGIN, jid)
    wait_for(lambda: not list(d.work_dir.glob(f"{jid}.1.*")), 20, f"{jid}'s files to go")
    return status


def test_charliecloud_flow_as_an_unprivileged_user(ch_deploy: SlurmDeployment,
                                                   tmp_path: Path) -> None:
    status = check_zipfile_flow(ch_deploy, "slurm-ch-flow", tmp_path)
    assert status["logs"].rstrip().endswith(f"done\n{NOBODY}")  # ran as nobody, not root
    outgoing = ch_deploy.storebase / "key-slurm-ch-flow" / "outgoing"
    assert os.stat(outgoing / "a.txt.out").st_uid == NOBODY


@pytest.mark.docker
def test_docker_launcher_flow_and_failures(docker_deploy: SlurmDeployment,
                                           docker_engine: Engine, tmp_path: Path) -> None:
    status = check_zipfile_flow(docker_deploy, "slurm-docker-flow", tmp_path)
    assert status["logs"].rstrip().endswith("done\n0")
    client = docker_deploy.client()
    submit(client, "slurm-fails", "echo oops; exit 3")
    submit(client, "slurm-noimage", "true", image="localhost/pfleet-test/absent:0")
    assert poll(client, pfc.JobType.PLUGIN, "slurm-fails") == "finishedWithError"
    failed = compute(client, "slurm-fails")
    assert failed["message"] == "exited 3" and "oops" in failed["logs"]
    assert poll(client, pfc.JobType.PLUGIN, "slurm-noimage") == "finishedWithError"
    message = compute(client, "slurm-noimage")["message"]
    assert "image not found: localhost/pfleet-test/absent:0" in message
    # The launcher removed its containers from the engine.
    ps = docker_engine.run_cli("ps", "-a", "--filter", "label=org.chrisproject.pfleet.agent",
                               "--format", "{{.Names}}")
    assert not [n for n in ps.stdout.split() if n.startswith("pfleet-slurm-")]


@pytest.mark.docker
def test_oom_reason_from_slurm_and_from_the_container_engine(
        ch_deploy: SlurmDeployment, docker_deploy: SlurmDeployment) -> None:
    ch, dock = ch_deploy.client(), docker_deploy.client()
    submit(ch, "slurm-oom-ch", OOM_SCRIPT, memory_limit=100)
    submit(dock, "slurm-oom-docker", OOM_SCRIPT, memory_limit=100)
    for client, jid in ((ch, "slurm-oom-ch"), (dock, "slurm-oom-docker")):
        assert poll(client, pfc.JobType.PLUGIN, jid) == "finishedWithError"
        status = compute(client, jid)
        assert status["message"] == "OOMKilled", (jid, status)
        assert "allocating" in status["logs"] and "survived" not in status["logs"]
    # SLURM's own verdict for the job it confined (task/cgroup, --mem=100M)
    assert list(ch_deploy.slurm_jobs("slurm-oom-ch").values()) == ["OUT_OF_MEMORY"]


def test_cancelled_job_and_delete_of_a_running_job(ch_deploy: SlurmDeployment) -> None:
    client = ch_deploy.client()
    submit(client, "slurm-cancel", "echo started; sleep 120")
    submit(client, "slurm-delete", "echo started; sleep 120")
    wait_status(client, "slurm-cancel", "started")
    wait_status(client, "slurm-delete", "started")
    # An administrator cancels one on the cluster.
    [slurm_id] = ch_deploy.slurm_jobs("slurm-cancel")
    ch_deploy.cluster.check("scancel", slurm_id)
    assert poll(client, pfc.JobType.PLUGIN, "slurm-cancel") == "finishedWithError"
    message = compute(client, "slurm-cancel")["message"]
    assert message.startswith("exited 143: CANCELLED"), message
    # CUBE deletes the other while it runs: its SLURM job is cancelled, its files go.
    client.delete_job(pfc.JobType.PLUGIN, "slurm-delete")
    wait_for(lambda: list(ch_deploy.slurm_jobs("slurm-delete").values()) == ["CANCELLED"], 30,
             "the deleted job's SLURM job to be cancelled")
    wait_for(lambda: not list(ch_deploy.work_dir.glob("slurm-delete.*")), 20,
             "the deleted job's files to go")


@pytest.mark.docker
def test_agent_kill9_and_restart_during_a_running_job(docker_deploy: SlurmDeployment) -> None:
    client = docker_deploy.client()
    submit(client, "slurm-k9", RUN_ONCE.format(secs=4))
    wait_status(client, "slurm-k9", "started")
    docker_deploy.agent.kill9()
    time.sleep(1.5)
    docker_deploy.agent.start()
    docker_deploy.controller.wait_agent(docker_deploy.name)
    assert poll(client, pfc.JobType.PLUGIN, "slurm-k9") == "finishedSuccessfully"
    assert compute(client, "slurm-k9")["logs"].endswith("finished\n")
    runs = docker_deploy.storebase / "key-slurm-k9" / "outgoing" / "runs.txt"
    assert runs.read_text() == "run\n"  # ran once
    assert len(docker_deploy.slurm_jobs("slurm-k9")) == 1  # submitted once


@pytest.mark.docker
def test_hung_slurmctld_makes_the_agent_unhealthy_not_its_jobs(
        docker_deploy: SlurmDeployment) -> None:
    client = docker_deploy.client()
    submit(client, "slurm-hung", "sleep 8; echo finished")
    wait_status(client, "slurm-hung", "started")
    assert docker_deploy.health()[0] == 200
    docker_deploy.cluster.pause_controller()
    try:
        def unhealthy() -> bool:
            code, body = docker_deploy.health()
            return code == 503 and any("slurmctld does not answer" in p
                                       for p in body["problems"])
        wait_for(unhealthy, 30, "the agent's /health to name the hung slurmctld")
        body = docker_deploy.health()[1]
        assert any("runtime slurm: slurmctld does not answer: sinfo did not answer" in p
                   for p in body["problems"]), body
        assert compute(client, "slurm-hung")["status"] == "started"

        def seen_by_controller() -> dict:
            return {a["name"]: a for a in docker_deploy.controller.agents()}[
                docker_deploy.name]
        wait_for(lambda: seen_by_controller()["state"] == "unhealthy", 15,
                 "the controller to see it unhealthy")
        # The last capacity stays offered: new jobs wait rather than being refused.
        assert seen_by_controller()["capacity"]["cpu_millicores"] == 16_000
    finally:
        docker_deploy.cluster.resume_controller()
    wait_for(lambda: docker_deploy.health()[0] == 200, 30, "the agent to be healthy again")
    assert poll(client, pfc.JobType.PLUGIN, "slurm-hung") == "finishedSuccessfully"


def test_timeout_reason(ch_deploy: SlurmDeployment) -> None:
    """Last in the module: the job started with the deployment (see the docstring)."""
    client = ch_deploy.client()
    assert poll(client, pfc.JobType.PLUGIN, TIMEOUT_JID, rounds=600) == "finishedWithError"
    status = compute(client, TIMEOUT_JID)
    assert status["message"].startswith("exited 143: TIMEOUT"), status
    assert "started" in status["logs"] and "DUE TO TIME LIMIT" in status["logs"]
    assert list(ch_deploy.slurm_jobs(TIMEOUT_JID).values()) == ["TIMEOUT"]
