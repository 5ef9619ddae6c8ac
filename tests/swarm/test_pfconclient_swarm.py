"""python-pfconclient 4.0.0 against the real controller process and a separate
``pfleet-agent`` process with ``CONTAINER_ENV=swarm`` on the suite's single-node swarm:
the zipfile flow end to end, and a plugin killed for memory."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pfconclient import client as pfc
from pfconclient.exceptions import PfconRequestException

from tests.e2e.conftest import Deployment
from tests.e2e.test_pfconclient_zipfile import client_for, plugin_descriptors, poll
from tests.support.engines import Engine
from tests.support.zips import make_zip

SWARM_ENV = {"CONTAINER_ENV": "swarm", "PFLEET_AGENT_POLL_INTERVAL": "0.5"}


@pytest.fixture
def swarm_deployment(tmp_path: Path, swarm_engine: Engine) -> Iterator[Deployment]:
    deployment = Deployment(tmp_path, swarm_engine, local_agent=False, extra_env=SWARM_ENV)
    try:
        deployment.add_agent("sw1", SWARM_ENV)
        yield deployment
    finally:
        deployment.stop()


def services(engine: Engine, name: str) -> list[str]:
    ls = subprocess.run([*engine.cli, "service", "ls", "--filter", f"name={name}",
                         "--format", "{{.Name}}"], capture_output=True, text=True, timeout=60)
    return ls.stdout.split()


def test_zipfile_flow_on_swarm(swarm_deployment: Deployment, swarm_engine: Engine,
                               tmp_path: Path) -> None:
    d = swarm_deployment
    client = client_for(d.controller.base)
    assert client.get_server_info()["container_env"] == "swarm"
    assert d.controller.agents()[0]["runtime"] == "swarm"

    jid = "chris-jid-21"
    resp = client.submit_job(pfc.JobType.PLUGIN, jid, plugin_descriptors(),
                             make_zip({"a.txt": b"alpha\n", "sub/b.txt": b"beta\n"}))
    assert resp["compute"]["status"] == "notStarted"
    assert poll(client, pfc.JobType.PLUGIN, jid) == "finishedSuccessfully"
    compute = client.get_job_status(pfc.JobType.PLUGIN, jid)["compute"]
    assert "copied ./a.txt" in compute["logs"] and compute["logs"].endswith("done\n")
    assert services(swarm_engine, jid) == [jid]

    out = tmp_path / "out"
    client.get_plugin_job_files(jid, str(out))
    assert (out / "a.txt.out").read_text() == "alpha\n"
    assert (out / "sub" / "b.txt.out").read_text() == "beta\n"

    client.submit_job(pfc.JobType.DELETE, jid, {})
    assert poll(client, pfc.JobType.DELETE, jid) == "finishedSuccessfully"
    assert not (d.storebase / f"key-{jid}").exists()
    client.delete_job(pfc.JobType.PLUGIN, jid)
    client.delete_job(pfc.JobType.DELETE, jid)
    with pytest.raises(PfconRequestException) as err:
        client.get_job_status(pfc.JobType.PLUGIN, jid)
    assert err.value.code == 404
    assert services(swarm_engine, jid) == []


def test_a_plugin_out_of_memory_on_swarm(swarm_deployment: Deployment) -> None:
    client = client_for(swarm_deployment.controller.base)
    descriptors = plugin_descriptors("x=a; while true; do x=$x$x$x$x; done")
    descriptors["memory_limit"] = 16
    client.submit_job(pfc.JobType.PLUGIN, "oom", descriptors, make_zip({"x": b"1"}))
    assert poll(client, pfc.JobType.PLUGIN, "oom") == "finishedWithError"
    assert client.get_job_status(pfc.JobType.PLUGIN, "oom")["compute"]["message"] == "OOMKilled"
