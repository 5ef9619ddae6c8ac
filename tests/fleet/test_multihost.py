"""Jobs across real separate hosts (network namespaces, one engine each): placement,
refusals at submit, queueing, and the faults DESIGN §5 promises to survive.

The guarantee checked throughout: every job reaches its true final state and none
runs twice (each job appends to ``runs.txt`` in its own outputs when it starts)."""

from __future__ import annotations

import io
import time
import zipfile

import pytest
from pfconclient import client as pfc
from pfconclient.exceptions import PfconRequestException

from tests.support.engines import BUSYBOX_IMAGE
from tests.support.processes import wait_for
from tests.support.tls import make_certs
from tests.support.zips import make_zip

pytestmark = [pytest.mark.docker, pytest.mark.podman]

RUN = 'echo run >> "$1/runs.txt"; echo "$0" > "$1/seen.txt"; sleep {secs}; echo finished'
TERMINAL = ("finishedSuccessfully", "finishedWithError", "undefined")


def descriptors(secs: float, cpu: int = 1000) -> dict:
    return {"entrypoint": ["sh", "-c", RUN.format(secs=secs)], "args": [], "auid": "cube",
            "number_of_workers": 1, "cpu_limit": cpu, "memory_limit": 64, "gpu_limit": 0,
            "image": BUSYBOX_IMAGE, "type": "ds"}


def submit(fleet, jid: str, secs: float, cpu: int = 1000) -> dict:
    return fleet.call(lambda: fleet.client().submit_job(
        pfc.JobType.PLUGIN, jid, descriptors(secs, cpu), make_zip({"in.txt": jid.encode()})))


def status(fleet, jid: str) -> dict:
    return fleet.call(lambda: fleet.client().get_job_status(pfc.JobType.PLUGIN, jid))["compute"]


def wait_all(fleet, jids: list[str], timeout: float = 120) -> dict[str, dict]:
    client = fleet.call(fleet.client)
    deadline = time.monotonic() + timeout
    done: dict[str, dict] = {}
    while time.monotonic() < deadline and len(done) < len(jids):
        for jid in jids:
            if jid not in done:
                c = fleet.call(client.get_job_status, pfc.JobType.PLUGIN, jid)["compute"]
                if c["status"] in TERMINAL:
                    done[jid] = c
        time.sleep(0.3)
    assert len(done) == len(jids), f"not finished: {sorted(set(jids) - set(done))}"
    return done


def runs(fleet, jid: str) -> int:
    path = fleet.storebase / f"key-{jid}" / "outgoing" / "runs.txt"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_jobs_land_on_every_host_and_outputs_come_back(fleet_factory) -> None:
    fleet = fleet_factory()
    jids = [f"spread-{i}" for i in range(6)]
    for jid in jids:
        assert submit(fleet, jid, secs=3)["compute"]["status"] == "notStarted"
    # The agents' heartbeats carry their load and the jobs they run (every second here).
    deadline = time.monotonic() + 20
    agents = fleet.agents_by_name()
    while time.monotonic() < deadline and sum(a["running"] for a in agents.values()) < 2:
        time.sleep(0.2)
        agents = fleet.agents_by_name()
    assert sum(a["running"] for a in agents.values()) >= 2, agents
    for agent in agents.values():
        assert agent["capacity"]["cpu_millicores"] == 4000, agent
        assert agent["capacity"]["memory_mib"] > 0 and 0 <= agent["cpu_percent"] <= 100, agent
        assert agent["memory_available_mib"] > 0 and agent["disk_free_mib"] > 0, agent
    results = wait_all(fleet, jids)
    assert {c["status"] for c in results.values()} == {"finishedSuccessfully"}
    jobs = fleet.jobs()
    assert {jobs[j]["agent"] for j in jids} == {"h1", "h2", "h3"}
    for jid in jids:
        assert runs(fleet, jid) == 1
        data = fleet.call(lambda j=jid: fleet.client().get_plugin_job_zip_data(j))
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            assert zf.read("seen.txt") == b"/share/incoming\n"


def test_the_fleet_over_tls(fleet_factory, tmp_path, monkeypatch) -> None:
    """The README's certificates (for 198.51.100.10, the controller's address here):
    agents on every host dial wss:// with the CA file, CUBE's client uses https."""
    certs = make_certs(tmp_path)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(certs.ca))  # as python-pfconclient reads it
    fleet = fleet_factory(tls=certs)
    assert fleet.base.startswith("https://198.51.100.10:")
    agents = fleet.agents_by_name()
    assert {n: a["state"] for n, a in agents.items()} == {
        "h1": "healthy", "h2": "healthy", "h3": "healthy"}
    jids = [f"tls-{i}" for i in range(3)]
    for jid in jids:
        assert submit(fleet, jid, secs=1)["compute"]["status"] == "notStarted"
    results = wait_all(fleet, jids)
    assert {c["status"] for c in results.values()} == {"finishedSuccessfully"}
    assert {fleet.jobs()[j]["agent"] for j in jids} == {"h1", "h2", "h3"}
    # an agent without the CA file never gets in
    untrusting = fleet.start_agent(fleet.topo.hosts[0], "untrusting", PFLEET_CA_FILE="")
    wait_for(lambda: "certificate verify failed" in untrusting.log_tail(), 20,
             what="the agent without the CA to say why it stays away")
    assert untrusting.alive()  # it keeps trying: the operator may fix the file
    assert "untrusting" not in fleet.agents_by_name()


def test_impossible_jobs_are_refused_at_submit(fleet_factory) -> None:
    fleet = fleet_factory()
    client = fleet.call(fleet.client)
    gpu = descriptors(1) | {"gpu_limit": 1}
    with pytest.raises(PfconRequestException) as err:
        fleet.call(client.submit_job, pfc.JobType.PLUGIN, "gpu-1", gpu, make_zip({"x": b"1"}))
    assert err.value.code == 400 and "gpu_limit=1 but no agent has more than 0 GPU" in str(
        err.value)
    huge = descriptors(1, cpu=64000)
    with pytest.raises(PfconRequestException) as err:
        fleet.call(client.submit_job, pfc.JobType.PLUGIN, "huge-1", huge, make_zip({"x": b"1"}))
    assert err.value.code == 400 and "cpu_limit=64000" in str(err.value)
    assert not (fleet.storebase / "key-gpu-1").exists()
    assert not (fleet.storebase / "key-huge-1").exists()


def test_queue_drains_as_capacity_frees(fleet_factory) -> None:
    # Each host offers one CPU; each job wants one: three run, three wait in order.
    # The first three end 2 s apart, so a wrong order would show for 2 s at a time.
    fleet = fleet_factory(agent_env={"PFLEET_AGENT_CPU_MILLICORES": "1000"})
    jids = [f"queue-{i}" for i in range(6)]
    for jid, secs in zip(jids, (2, 4, 6, 2, 2, 2), strict=True):
        submit(fleet, jid, secs=secs)
    most_running = 0
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        jobs = fleet.jobs()
        states = [jobs[j]["state"] for j in jids]
        most_running = max(most_running, sum(s in ("ASSIGNED", "RUNNING") for s in states))
        # oldest first: no job leaves the queue while one submitted before it waits
        left = [s != "QUEUED" for s in states]
        assert left == sorted(left, reverse=True), f"placed out of order: {states}"
        if all(s == "COMPLETE" for s in states):
            break
        time.sleep(0.2)
    assert most_running == 3
    assert {c["status"] for c in wait_all(fleet, jids).values()} == {"finishedSuccessfully"}
    assert [runs(fleet, j) for j in jids] == [1] * 6


def drain_all_but(fleet, keep: str) -> None:
    for host in fleet.topo.hosts:
        if host.name != keep:
            fleet.admin("POST", f"agents/{host.name}/drain/", {})


def test_link_down_for_a_minute_changes_nothing(fleet_factory) -> None:
    fleet = fleet_factory()
    drain_all_but(fleet, "h1")
    jids = ["link-0", "link-1"]
    for jid in jids:
        submit(fleet, jid, secs=20)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(status(fleet, j)["status"] != "started"
                                              for j in jids):
        time.sleep(0.3)
    assert all(fleet.jobs()[j]["agent"] == "h1" for j in jids)
    fleet.topo.set_link("h1", False)
    try:
        time.sleep(10)
        # 3 heartbeats (1 s apart here) missed; the WebSocket has not timed out yet
        assert fleet.agents_by_name()["h1"]["state"] == "suspect"
        # Nothing moves while the lease (10 min) runs: the jobs still show started.
        assert [status(fleet, j)["status"] for j in jids] == ["started", "started"]
        submit(fleet, "link-late", secs=1)  # a suspect agent gets no new job
        time.sleep(3)
        assert fleet.jobs()["link-late"]["state"] == "QUEUED"
        time.sleep(47)  # the jobs end while the link is down
    finally:
        fleet.topo.set_link("h1", True)
    fleet.wait_agents(["h1"], timeout=60, states=("healthy", "draining"))
    results = wait_all(fleet, [*jids, "link-late"], timeout=60)
    assert {c["status"] for c in results.values()} == {"finishedSuccessfully"}
    assert all(c["logs"].endswith("finished\n") for c in results.values())
    assert [runs(fleet, j) for j in [*jids, "link-late"]] == [1, 1, 1]
    assert fleet.jobs()["link-late"]["agent"] == "h1"


def test_an_engine_that_dies_takes_its_host_out_of_placement(fleet_factory) -> None:
    """h1's dockerd is killed: its agent says so in its heartbeats, the controller lists
    it unhealthy with the reason and places nothing there; with the engine back, the
    job that waited runs there."""
    # capacity configured, not read from the engine (0 while it is dead): only the
    # agent's health keeps the job away
    fleet = fleet_factory(agent_env={"PFLEET_AGENT_MEMORY_MIB": "4096"})
    drain_all_but(fleet, "h1")
    fleet.topo.kill_engine("h1")
    try:
        wait_for(lambda: fleet.agents_by_name()["h1"]["state"] == "unhealthy", 30,
                 interval=0.3, what="h1 unhealthy once its engine died")
        h1 = fleet.agents_by_name()["h1"]
        assert any(problem.startswith("runtime docker:") for problem in h1["problems"]), h1
        submit(fleet, "engine-0", secs=1)
        time.sleep(3)  # the submit's round, and the heartbeats', placed nothing
        assert fleet.jobs()["engine-0"]["state"] == "QUEUED"
    finally:
        fleet.topo.start_engine("h1")
    fleet.wait_agents(["h1"], timeout=60)
    result = wait_all(fleet, ["engine-0"])["engine-0"]
    assert result["status"] == "finishedSuccessfully", result
    assert fleet.jobs()["engine-0"]["agent"] == "h1" and runs(fleet, "engine-0") == 1


def test_host_lost_past_a_short_lease(fleet_factory) -> None:
    # Each host offers one CPU (an engine refuses more CPUs than the machine has).
    fleet = fleet_factory(PFLEET_AGENT_LEASE="5",
                          agent_env={"PFLEET_AGENT_CPU_MILLICORES": "1000"})
    drain_all_but(fleet, "h2")
    submit(fleet, "lost-0", secs=120)  # all h2 offers
    submit(fleet, "after-0", secs=1)  # waits: h2 is full, the others drain
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and status(fleet, "lost-0")["status"] != "started":
        time.sleep(0.3)
    assert status(fleet, "lost-0")["status"] == "started"
    assert fleet.jobs()["after-0"]["state"] == "QUEUED"
    # The host dies: its agent is killed and its link goes down.
    fleet.agents["h2"].kill9()
    fleet.topo.set_link("h2", False)
    fleet.admin("POST", "agents/h1/undrain/", {})  # the queued job goes there
    deadline = time.monotonic() + 60
    lost = status(fleet, "lost-0")
    while time.monotonic() < deadline and lost["status"] != "undefined":
        time.sleep(0.5)
        lost = status(fleet, "lost-0")
    assert lost["status"] == "undefined"
    assert lost["message"].startswith("agent h2 lost: no contact for 5 s")
    after = wait_all(fleet, ["after-0"])["after-0"]
    assert after["status"] == "finishedSuccessfully" and fleet.jobs()["after-0"]["agent"] == "h1"
    # The host comes back: the lost job's container is removed, nothing runs twice.
    fleet.topo.set_link("h2", True)
    fleet.agents["h2"].start()
    fleet.wait_agents(["h2"], timeout=60, states=("healthy", "draining"))
    client = fleet.topo.host("h2").client()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and client.containers.list(
                all=True, filters={"name": "lost-0"}):
            time.sleep(0.5)
        assert client.containers.list(all=True, filters={"name": "lost-0"}) == []
    finally:
        client.close()
    assert runs(fleet, "lost-0") == 1


def test_controller_killed_agents_reconnect(fleet_factory) -> None:
    fleet = fleet_factory()
    jids = [f"ck-{i}" for i in range(6)]
    for jid in jids:
        submit(fleet, jid, secs=6)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(status(fleet, j)["status"] != "started"
                                              for j in jids):
        time.sleep(0.3)
    assert [status(fleet, j)["status"] for j in jids] == ["started"] * 6
    fleet.controller.kill9()  # with every job running
    time.sleep(3)
    fleet.controller.start()
    fleet.wait_ready()
    fleet.wait_agents(["h1", "h2", "h3"], timeout=60)
    results = wait_all(fleet, jids)
    assert {c["status"] for c in results.values()} == {"finishedSuccessfully"}
    assert [runs(fleet, j) for j in jids] == [1] * 6


def test_agent_killed_and_restarted_on_its_host(fleet_factory) -> None:
    fleet = fleet_factory()
    drain_all_but(fleet, "h3")  # the podman host
    jids = ["ak-0", "ak-1"]
    for jid in jids:
        submit(fleet, jid, secs=4)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(status(fleet, j)["status"] != "started"
                                              for j in jids):
        time.sleep(0.3)
    fleet.agents["h3"].kill9()
    time.sleep(5)
    fleet.agents["h3"].start()
    results = wait_all(fleet, jids)
    assert {c["status"] for c in results.values()} == {"finishedSuccessfully"}
    assert [runs(fleet, j) for j in jids] == [1, 1]
    assert {fleet.jobs()[j]["agent"] for j in jids} == {"h3"}
