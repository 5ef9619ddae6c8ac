"""A SLURM cluster across hosts: slurmctld and slurmd in host namespace h1, a second
slurmd in h2, the agent on h3 (the login node, which runs no jobs), the controller in
its own namespace; the storeBase and the work directories are shared (NFS stand-in).
Every request goes from inside the controller namespace (``tests.fleet``'s ``Fleet``).

Jobs run with the charliecloud launcher and write ``$SLURMD_NODENAME`` into their
outputs, so where SLURM put them is read off the storeBase."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from pfconclient import client as pfc

from tests.e2e.test_pfconclient_zipfile import plugin_descriptors
from tests.fleet.conftest import Fleet
from tests.support.slurm import SlurmCluster, start_multinode_cluster, unpack_busybox_image
from tests.support.topology import start_topology
from tests.support.zips import make_zip

WHERE = 'echo "$SLURMD_NODENAME" > "$1/node-${SLURM_PROCID:-0}.txt"; echo done'
# Two jobs that each need a whole node, and wait (bounded) for each other through the
# host's /tmp (ch-run binds it): both run at once, so SLURM must use both nodes.
TOGETHER = ('echo "$SLURMD_NODENAME" > "$1/node-0.txt"; touch {barrier}/{me}; i=0; '
            'while [ ! -e {barrier}/{other} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); '
            'done; [ -e {barrier}/{other} ] && echo done')
IMAGE = "localhost/pfleet-test/busybox:1"


@pytest.fixture(scope="module")
def slurm_fleet(tmp_path_factory: pytest.TempPathFactory,
                busybox_rootfs: Path) -> Iterator[tuple[Fleet, SlurmCluster]]:
    workdir = tmp_path_factory.mktemp("slurm-multinode")
    with start_topology(3, [None, None, None], images=False, workdir=workdir) as topo, \
            start_multinode_cluster(topo) as cluster:
        images = workdir / "images"
        unpack_busybox_image(images / "localhost%pfleet-test%busybox+1", busybox_rootfs)
        fleet = Fleet(topo, workdir / "fleet", {})
        try:
            fleet.start_agent(topo.host("h3"), CONTAINER_ENV="slurm",
                              PFLEET_SLURM_LAUNCHER="charliecloud",
                              PFLEET_SLURM_IMAGE_DIR=str(images),
                              PFLEET_AGENT_CPU_MILLICORES="", **cluster.env)
            fleet.wait_agents(["h3"])
            yield fleet, cluster
        finally:
            fleet.stop()


def nodes_of(fleet: Fleet, jid: str) -> list[str]:
    outgoing = fleet.storebase / f"key-{jid}" / "outgoing"
    return sorted(p.read_text().strip() for p in outgoing.glob("node-*.txt"))


def run_jobs(fleet: Fleet, jobs: dict[str, dict]) -> dict[str, dict]:
    """Submit every job, wait for them all (inside the controller namespace)."""
    def go() -> dict[str, dict]:
        client = fleet.client()
        for jid, descriptors in jobs.items():
            client.submit_job(pfc.JobType.PLUGIN, jid, descriptors, make_zip({"x": b"1"}))
        for jid in jobs:
            client.poll_job_status(pfc.JobType.PLUGIN, jid)
        return {jid: client.get_job_status(pfc.JobType.PLUGIN, jid)["compute"]
                for jid in jobs}
    return fleet.call(go)


def test_agent_offers_the_cluster_capacity(slurm_fleet: tuple[Fleet, SlurmCluster]) -> None:
    fleet, _ = slurm_fleet
    agent = fleet.agents_by_name()["h3"]
    assert agent["runtime"] == "slurm" and agent["state"] == "healthy"
    # two nodes of 2 CPUs and 4000 MiB each, from sinfo
    assert (agent["capacity"]["cpu_millicores"], agent["capacity"]["memory_mib"]) == \
        (4000, 8000)


def test_jobs_land_on_both_compute_nodes(slurm_fleet: tuple[Fleet, SlurmCluster]) -> None:
    fleet, cluster = slurm_fleet
    barrier = Path(tempfile.mkdtemp(prefix="pfleet-slurm-barrier-"))
    try:
        jobs = {}
        for me, other in (("mn-a", "mn-b"), ("mn-b", "mn-a")):
            jobs[me] = plugin_descriptors(TOGETHER.format(barrier=barrier, me=me, other=other),
                                          image=IMAGE)
            jobs[me]["cpu_limit"] = 2000  # a node has 2 CPUs: two of these cannot share one
        jobs["mn-workers"] = plugin_descriptors(WHERE, image=IMAGE)
        jobs["mn-workers"]["number_of_workers"] = 2
        results = run_jobs(fleet, jobs)
    finally:
        shutil.rmtree(barrier, ignore_errors=True)
    for jid, compute in results.items():
        assert compute["status"] == "finishedSuccessfully", (jid, compute)
    # number_of_workers=2: one worker on each node, through srun
    assert nodes_of(fleet, "mn-workers") == ["h1", "h2"]
    assert results["mn-workers"]["logs"].count("done") == 2
    # two whole-node jobs running at the same time: one on each node
    assert sorted(nodes_of(fleet, "mn-a") + nodes_of(fleet, "mn-b")) == ["h1", "h2"]
    out = cluster.check("squeue", "-h", "--states=all", "-o", "%j %T %N")
    placed = {line.split()[0]: line.split()[2] for line in out.splitlines()}
    assert placed["mn-workers"] == "h[1-2]"
