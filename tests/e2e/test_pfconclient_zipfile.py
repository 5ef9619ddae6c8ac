"""python-pfconclient 4.0.0, library and command line, against the real controller
process with its embedded agent on a real engine (Docker and Podman)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from pfconclient import client as pfc
from pfconclient.exceptions import PfconRequestException

from tests.support.engines import BUSYBOX_IMAGE, Engine
from tests.support.zips import make_zip

# The plugin: copies its inputs to its outputs with a suffix, says so on stdout.
COPY_SCRIPT = ('set -e; cd "$0"; for f in $(find . -type f); do mkdir -p "$1/$(dirname $f)"; '
               'cp "$f" "$1/${f}.out"; echo "copied $f"; done; echo done')


def plugin_descriptors(script: str = COPY_SCRIPT, image: str = BUSYBOX_IMAGE) -> dict:
    return {"entrypoint": ["sh", "-c", script], "args": [], "auid": "cube",
            "number_of_workers": 1, "cpu_limit": 1000, "memory_limit": 200, "gpu_limit": 0,
            "image": image, "type": "ds", "env": ["CHRIS_JID=x"]}


def client_for(base: str) -> pfc.Client:
    token = pfc.Client.get_auth_token(base + "auth-token/", "pfcon", "pfcon1234")
    client = pfc.Client(base, token)
    client.initial_wait = 0.5
    client.max_wait = 4
    return client


def poll(client: pfc.Client, job_type: pfc.JobType, jid: str, rounds: int = 120) -> str:
    """Poll a little faster than the client's own backoff, bounded."""
    import time
    status = ""
    for _ in range(rounds):
        status = client.get_job_status(job_type, jid)["compute"]["status"]
        if status in ("finishedSuccessfully", "finishedWithError", "undefined"):
            return status
        time.sleep(0.25)
    return status


def test_library_zipfile_flow(container_engine: Engine, deployment_factory, tmp_path: Path):
    d = deployment_factory(container_engine)
    client = client_for(d.controller.base)
    info = client.get_server_info()
    assert info["pfcon_innetwork"] is False and info["storage_env"] == "zipfile"
    assert client.requires_copy_job is False and client.requires_upload_job is False

    jid = "chris-jid-1"
    data = make_zip({"a.txt": b"alpha\n", "sub/b.txt": b"beta\n"})
    resp = client.submit_job(pfc.JobType.PLUGIN, jid, plugin_descriptors(), data)
    assert resp["data"]["nfiles"] == 2
    assert resp["compute"]["status"] == "notStarted"
    assert client.poll_job_status(pfc.JobType.PLUGIN, jid) == "finishedSuccessfully"
    status = client.get_job_status(pfc.JobType.PLUGIN, jid)["compute"]
    assert "copied ./a.txt" in status["logs"] and status["logs"].endswith("done\n")

    out = tmp_path / "out"
    client.get_plugin_job_files(jid, str(out))
    assert (out / "a.txt.out").read_text() == "alpha\n"
    assert (out / "sub" / "b.txt.out").read_text() == "beta\n"

    assert client.submit_job(pfc.JobType.COPY, jid, {"output_dir": "x"})["compute"][
        "message"] == "copySkipped"
    resp = client.submit_job(pfc.JobType.DELETE, jid, {})
    assert resp["compute"]["status"] in ("notStarted", "started", "finishedSuccessfully")
    assert poll(client, pfc.JobType.DELETE, jid) == "finishedSuccessfully"
    assert not (d.storebase / f"key-{jid}").exists()
    client.delete_job(pfc.JobType.PLUGIN, jid)
    client.delete_job(pfc.JobType.DELETE, jid)
    with pytest.raises(PfconRequestException) as err:
        client.get_job_status(pfc.JobType.PLUGIN, jid)
    assert err.value.code == 404
    # The container is gone from the engine too.
    ps = subprocess.run([*container_engine.cli, "ps", "-a", "--filter", f"name=^{jid}$",
                         "--format", "{{.Names}}"], capture_output=True, text=True, timeout=30)
    assert jid not in ps.stdout.split()


def test_failing_plugin_and_missing_image(container_engine: Engine, deployment_factory):
    d = deployment_factory(container_engine)
    client = client_for(d.controller.base)
    client.submit_job(pfc.JobType.PLUGIN, "fails", plugin_descriptors("echo oops; exit 3"),
                      make_zip({"x": b"1"}))
    assert poll(client, pfc.JobType.PLUGIN, "fails") == "finishedWithError"
    compute = client.get_job_status(pfc.JobType.PLUGIN, "fails")["compute"]
    assert compute["message"] == "exited 3" and "oops" in compute["logs"]

    client.submit_job(pfc.JobType.PLUGIN, "noimage",
                      plugin_descriptors(image="localhost/pfleet-test/absent:0"),
                      make_zip({"x": b"1"}))
    assert poll(client, pfc.JobType.PLUGIN, "noimage") == "finishedWithError"
    compute = client.get_job_status(pfc.JobType.PLUGIN, "noimage")["compute"]
    assert "image" in compute["message"] and "absent" in compute["message"]


@pytest.mark.docker
def test_gpu_request_without_gpu_fails_with_reason(docker_engine: Engine, deployment_factory):
    # The local agent advertises one GPU it does not have, so the job is placed and the
    # engine's refusal is what the client sees (rather than a refusal at submit).
    d = deployment_factory(docker_engine, extra_env={"PFLEET_AGENT_GPUS": "1"})
    client = client_for(d.controller.base)
    descriptors = plugin_descriptors("true")
    descriptors["gpu_limit"] = 1
    client.submit_job(pfc.JobType.PLUGIN, "gpu", descriptors, make_zip({"x": b"1"}))
    assert poll(client, pfc.JobType.PLUGIN, "gpu") == "finishedWithError"
    assert "GPU" in client.get_job_status(pfc.JobType.PLUGIN, "gpu")["compute"]["message"]


@pytest.mark.docker
def test_command_line_client(docker_engine: Engine, deployment_factory, tmp_path: Path):
    d = deployment_factory(docker_engine)
    base = d.controller.base
    cli = [sys.executable, "-m", "pfconclient", base]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cli, *args], capture_output=True, text=True, timeout=120)

    auth = run("auth", "--pfcon_user", "pfcon", "--pfcon_password", "pfcon1234")
    assert auth.returncode == 0, auth.stderr
    token = auth.stdout.split("token:")[1].strip()
    cli = [*cli, "-a", token]

    # The CLI's submit always adds a data_file part containing "1000": in zipfile mode
    # that is a bad zip, refused with a clear 400 and nothing left behind.
    submit = run("submit", "--job_type", "plugin", "--jid", "cli1", "--entrypoint", "true",
                 "--args", "hello", "--auid", "cube", "--number_of_workers", "1",
                 "--cpu_limit", "1000", "--memory_limit", "200", "--gpu_limit", "0",
                 "--image", BUSYBOX_IMAGE, "--type", "fs")
    assert submit.returncode != 0
    assert "data_file: Bad zip file" in submit.stdout + submit.stderr
    assert not (d.storebase / "key-cli1").exists()

    # Status, poll and delete work on a job submitted by the library.
    client = pfc.Client(base, token)
    client.submit_job(pfc.JobType.PLUGIN, "cli2", plugin_descriptors("echo hi"),
                      make_zip({"x": b"1"}))
    poll_out = run("poll", "--job_type", "plugin", "--jid", "cli2")
    assert poll_out.returncode == 0, poll_out.stderr
    status = run("status", "--job_type", "plugin", "--jid", "cli2")
    assert "Job cli2 status: finishedSuccessfully" in status.stdout
    deleted = run("delete", "--job_type", "plugin", "--jid", "cli2")
    assert deleted.returncode == 0 and "Deleted job cli2" in deleted.stdout
    gone = run("status", "--job_type", "plugin", "--jid", "cli2")
    assert gone.returncode != 0


@pytest.mark.docker
def test_zip_download_is_valid_for_empty_output(docker_engine: Engine, deployment_factory,
                                                tmp_path: Path):
    d = deployment_factory(docker_engine)
    client = client_for(d.controller.base)
    client.submit_job(pfc.JobType.PLUGIN, "empty", plugin_descriptors("true"),
                      make_zip({"x": b"1"}))
    assert poll(client, pfc.JobType.PLUGIN, "empty") == "finishedSuccessfully"
    client.get_plugin_job_zip_file("empty", str(tmp_path))
    with zipfile.ZipFile(tmp_path / "empty.zip") as zf:
        assert zf.namelist() == []
