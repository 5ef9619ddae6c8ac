"""Resilience: ``kill -9`` of the controller or of an agent while jobs run.

The one guarantee every scenario checks: every job reaches its true final state,
and none runs twice.  Each job appends a line to ``runs.txt`` in its own output
directory when it starts, so "ran once" is read off the storeBase, not trusted
from pfleet's own bookkeeping.
"""

from __future__ import annotations

import random
import threading
import time

import pytest
from pfconclient import client as pfc
from pfconclient.exceptions import PfconRequestException

from tests.e2e.test_pfconclient_zipfile import client_for, plugin_descriptors, poll
from tests.support.engines import Engine
from tests.support.zips import make_zip

pytestmark = pytest.mark.docker

RUN_ONCE = 'echo run >> "$1/runs.txt"; sleep {secs}; echo finished'


def submit(client: pfc.Client, jid: str, secs: float) -> dict:
    return client.submit_job(pfc.JobType.PLUGIN, jid,
                             plugin_descriptors(RUN_ONCE.format(secs=secs)),
                             make_zip({"in.txt": jid.encode()}))


def runs(d, jid: str) -> int:
    path = d.storebase / f"key-{jid}" / "outgoing" / "runs.txt"
    return len(path.read_text().splitlines()) if path.exists() else 0


def wait_started(client: pfc.Client, jids: list[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(client.get_job_status(pfc.JobType.PLUGIN, j)["compute"]["status"] == "started"
               for j in jids):
            return
        time.sleep(0.2)
    raise TimeoutError(f"jobs {jids} did not all start")


def test_controller_with_local_agent_killed_while_jobs_run(docker_engine: Engine,
                                                           deployment_factory):
    d = deployment_factory(docker_engine)
    client = client_for(d.controller.base)
    jids = [f"k9-{i}" for i in range(3)]
    for jid in jids:
        submit(client, jid, secs=4)
    wait_started(client, jids)
    d.controller.kill9()  # the embedded agent dies with it; the containers do not
    d.controller.start()
    d.controller.wait_ready()
    client = client_for(d.controller.base)
    for jid in jids:
        assert poll(client, pfc.JobType.PLUGIN, jid) == "finishedSuccessfully"
        status = client.get_job_status(pfc.JobType.PLUGIN, jid)["compute"]
        assert status["logs"].endswith("finished\n")
        assert runs(d, jid) == 1


def test_controller_killed_agent_keeps_running(docker_engine: Engine, deployment_factory):
    d = deployment_factory(docker_engine, local_agent=False)
    d.add_agent("h1")
    client = client_for(d.controller.base)
    jids = ["sep-0", "sep-1"]
    for jid in jids:
        submit(client, jid, secs=3)
    wait_started(client, jids)
    d.controller.kill9()
    time.sleep(4)  # the jobs end while no controller listens: the agent's outbox keeps it
    d.controller.start()
    d.controller.wait_ready()
    d.controller.wait_agent("h1")
    client = client_for(d.controller.base)
    for jid in jids:
        assert poll(client, pfc.JobType.PLUGIN, jid) == "finishedSuccessfully"
        assert runs(d, jid) == 1


def test_agent_killed_and_restarted_reattaches(docker_engine: Engine, deployment_factory):
    d = deployment_factory(docker_engine, local_agent=False)
    agent = d.add_agent("h1")
    client = client_for(d.controller.base)
    jids = ["ag-0", "ag-1", "ag-2"]
    for jid in jids:
        submit(client, jid, secs=3)
    # One more that fails, to check a failure while the agent is down is reported too.
    client.submit_job(pfc.JobType.PLUGIN, "ag-fail",
                      plugin_descriptors('echo run >> "$1/runs.txt"; sleep 2; exit 5'),
                      make_zip({"x": b"1"}))
    wait_started(client, [*jids, "ag-fail"])
    agent.kill9()
    time.sleep(3.5)
    agent.start()
    d.controller.wait_agent("h1")
    for jid in jids:
        assert poll(client, pfc.JobType.PLUGIN, jid) == "finishedSuccessfully"
        assert runs(d, jid) == 1
    assert poll(client, pfc.JobType.PLUGIN, "ag-fail") == "finishedWithError"
    assert client.get_job_status(pfc.JobType.PLUGIN, "ag-fail")["compute"]["message"] == \
        "exited 5"
    assert runs(d, "ag-fail") == 1


def test_controller_killed_at_random_moments_during_submits(docker_engine: Engine,
                                                            deployment_factory):
    """Submits go on while the controller is killed twice at random moments; every
    client retries its POST until it gets an answer (pfcon's idempotent re-POST).
    Every job ends finishedSuccessfully and ran exactly once."""
    d = deployment_factory(docker_engine)
    jids = [f"storm-{i}" for i in range(12)]
    answered: dict[str, dict] = {}
    stop = threading.Event()

    def submitter() -> None:
        for jid in jids:
            for _ in range(200):
                if stop.is_set():
                    return
                try:
                    answered[jid] = submit(client_for(d.controller.base), jid, secs=0.5)
                    break
                except (PfconRequestException, OSError):
                    time.sleep(0.2)

    rng = random.Random(20261124)
    thread = threading.Thread(target=submitter)
    thread.start()
    try:
        for _ in range(2):
            time.sleep(rng.uniform(0.2, 1.5))
            d.controller.kill9()
            d.controller.start()
            d.controller.wait_ready()
        thread.join(timeout=120)
    finally:
        stop.set()
        thread.join(timeout=10)
    assert sorted(answered) == sorted(jids)
    client = client_for(d.controller.base)
    for jid in jids:
        assert poll(client, pfc.JobType.PLUGIN, jid) == "finishedSuccessfully", jid
        assert runs(d, jid) == 1, jid
