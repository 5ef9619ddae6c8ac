"""Benches 10 and 11: the SLURM agent against bare ``sbatch`` of the same batch script.

Both run on the suite's one-node SLURM (``slurm_cluster``: 16 CPUs declared,
``batch_sched_delay=0,sched_min_interval=0``) with a controller and a separate SLURM
agent (``launcher none``: the command runs on the node, so SLURM and pfleet are
measured, not a container engine).  The bare side submits the very script the
agent renders (``render_batch_script``) for the same command, limits and mounts.

10. POST -> running, interleaved, ``ROUNDS`` rounds.  pfleet: from just before the
    POST until the client's status GET (every ``OBSERVE`` s) says ``started``; bare:
    from just before ``sbatch`` until ``squeue`` (every ``OBSERVE`` s) says RUNNING.
    For information, until the job's own first action (a timestamp it writes).
11. ``JOBS`` short jobs end to end, ``CONCURRENCY`` client threads, A-B-B-A blocks.
    pfleet: POST, then status every ``POLL`` s until finished; bare: ``sbatch``, then
    ``squeue`` every ``POLL`` s until it ended.  Clean-up (DELETE) is not timed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from agent.protocol import JobSpec, Mount
from agent.runtimes.slurm_config import SlurmSettings
from agent.runtimes.slurm_script import job_files, render_batch_script
from tests.bench.helpers import (
    LOG_LEVEL,
    JobFailed,
    PfconHttp,
    Report,
    median,
    percentile,
    plugin_descriptors,
    publish,
    tiny_zip,
)
from tests.slurm.conftest import SlurmDeployment
from tests.support.slurm import SlurmCluster

ROUNDS = int(os.environ.get("PFLEET_BENCH_SLURM_ROUNDS", "15"))
JOBS = int(os.environ.get("PFLEET_BENCH_SLURM_JOBS", "100"))
CONCURRENCY = 8
OBSERVE = 0.02  # s between status looks while waiting for "running" (both sides)
POLL = 0.2  # s between status looks in the 100-job run (both sides), as CUBE polls
LATENCY_TARGET, JOBS_TARGET = 1.2, 1.3
STAMP = ("import sys, time; open(sys.argv[1] + '/t', 'w').write(repr(time.time())); "
         "time.sleep(1)")
STAMP_ENTRYPOINT = ["python3", "-c", STAMP]
SHORT_ENTRYPOINT = ["true"]
RUNNING_OR_LATER = {"RUNNING", "COMPLETING", "COMPLETED"}
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"}


class Bare:
    """Submits the agent's own batch script with sbatch, in a scratch storeBase."""

    def __init__(self, cluster: SlurmCluster, scratch: Path) -> None:
        self.cluster = cluster
        self.storebase = scratch / "storeBase"
        self.settings = SlurmSettings(agent_name="bare", work_dir=str(scratch / "work"),
                                      storebase=str(self.storebase), launcher="none")
        Path(self.settings.work_dir).mkdir(parents=True)
        self.env = {**os.environ, **cluster.env}

    def script(self, name: str, entrypoint: list[str]) -> str:
        """The script file for job ``name`` (command: entrypoint + the output dir)."""
        key = self.storebase / f"key-{name}"
        (key / "incoming").mkdir(parents=True)
        (key / "outgoing").mkdir()
        spec = JobSpec(job=name, attempt=1, name=name, jid=name, kind="plugin",
                       image="none", command=[*entrypoint, "/share/outgoing"],
                       cpu_limit=1000, memory_limit=200,
                       mounts=[Mount(f"key-{name}/incoming", "/share/incoming", True),
                               Mount(f"key-{name}/outgoing", "/share/outgoing", False)])
        files = job_files(self.settings.work_dir, name, 1)
        Path(files.script).write_text(render_batch_script(spec, self.settings, files))
        return files.script

    def sbatch(self, script: str) -> str:
        res = subprocess.run(["sbatch", "--parsable", script], capture_output=True, text=True,
                             timeout=60, env=self.env)
        if res.returncode != 0:
            raise JobFailed(f"sbatch {script}: {res.stderr.strip()}")
        return res.stdout.strip().split(";")[0]

    def state(self, job_id: str) -> str:
        res = subprocess.run(["squeue", "-h", "--states=all", "-j", job_id, "-o", "%T"],
                             capture_output=True, text=True, timeout=60, env=self.env)
        return res.stdout.strip()

    def wait(self, job_id: str, states: set[str], interval: float,
             within: float = 120.0) -> str:
        deadline = time.monotonic() + within
        for _ in range(int(within / interval) + 2):
            state = self.state(job_id)
            if state in states:
                return state
            if time.monotonic() > deadline:
                break
            time.sleep(interval)
        raise JobFailed(f"SLURM job {job_id} not in {sorted(states)} after {within:g} s")


def wait_stamp(path: Path, within: float = 60.0) -> float:
    deadline = time.monotonic() + within
    for _ in range(int(within / 0.005) + 2):
        try:
            text = path.read_text()
            if text:
                return float(text)
        except (FileNotFoundError, ValueError):
            pass
        if time.monotonic() > deadline:
            break
        time.sleep(0.005)
    raise JobFailed(f"no timestamp in {path} after {within:g} s")


@pytest.fixture(scope="module")
def slurm_bench(slurm_cluster: SlurmCluster,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmDeployment]:
    deployment = SlurmDeployment(
        tmp_path_factory.mktemp("bench-slurm"), slurm_cluster,
        {"PFLEET_SLURM_LAUNCHER": "none", "PFLEET_AGENT_CPU_MILLICORES": "64000"},
        controller_args=["--log-level", LOG_LEVEL])
    try:
        yield deployment
    finally:
        deployment.stop()


@pytest.mark.bench
@pytest.mark.timeout(900)
def test_post_to_running_vs_bare_sbatch(slurm_bench: SlurmDeployment,
                                        slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    http = PfconHttp(slurm_bench.controller.base, slurm_bench.controller.token())
    bare = Bare(slurm_cluster, tmp_path)
    descriptors = plugin_descriptors(STAMP_ENTRYPOINT, "none", memory_limit=200)
    data = tiny_zip()
    seen: dict[str, list[float]] = {"pfleet": [], "bare": [], "pfleet_job": [], "bare_job": [],
                                    "post": []}

    def pfleet(name: str) -> None:
        prepared = http.prepare_submit(name, descriptors, data)
        t0 = time.time()
        response = http.send(prepared)
        seen["post"].append(time.time() - t0)
        if response.status_code != 201:
            raise JobFailed(f"submit {name}: {response.status_code} {response.text[:300]}")
        http.wait(name, until=("started", "finishedSuccessfully"), interval=OBSERVE)
        seen["pfleet"].append(time.time() - t0)
        stamp = wait_stamp(slurm_bench.storebase / f"key-{name}" / "outgoing" / "t")
        seen["pfleet_job"].append(stamp - t0)
        done = http.wait(name, interval=0.1)
        if done["status"] != "finishedSuccessfully":
            raise JobFailed(f"job {name}: {done}")
        http.remove(name)
        shutil.rmtree(slurm_bench.storebase / f"key-{name}", ignore_errors=True)

    def baseline(name: str) -> None:
        script = bare.script(name, STAMP_ENTRYPOINT)
        t0 = time.time()
        job_id = bare.sbatch(script)
        bare.wait(job_id, RUNNING_OR_LATER, OBSERVE)
        seen["bare"].append(time.time() - t0)
        stamp = wait_stamp(bare.storebase / f"key-{name}" / "outgoing" / "t")
        seen["bare_job"].append(stamp - t0)
        if bare.wait(job_id, ENDED, 0.1) != "COMPLETED":
            raise JobFailed(f"bare job {name} did not complete")

    try:
        pfleet("sl-warm-pfleet")
        baseline("sl-warm-bare")
        for key in seen:
            seen[key].clear()
        t_start = time.monotonic()
        for i in range(ROUNDS):
            order = [pfleet, baseline] if i % 2 == 0 else [baseline, pfleet]
            for run in order:
                run(f"sl-{run.__name__}-{i}")
        elapsed = time.monotonic() - t_start
    finally:
        http.close()

    ms = {k: [v * 1000 for v in values] for k, values in seen.items()}
    p_med, b_med = median(ms["pfleet"]), median(ms["bare"])
    report = Report(10, f"SLURM: POST -> running vs bare sbatch of the same script "
                        f"({ROUNDS} rounds, interleaved)")
    report.add("median POST->running seen (ms)", p_med, b_med, "sbatch+squeue",
               f"<= {LATENCY_TARGET:.2f}x", p_med / b_med <= LATENCY_TARGET)
    report.add("p90 POST->running seen (ms)", percentile(ms["pfleet"], 90),
               percentile(ms["bare"], 90), "sbatch+squeue")
    report.add("median POST->job's first action (ms)", median(ms["pfleet_job"]),
               median(ms["bare_job"]), "sbatch")
    report.add("median POST->201 answer (ms)", median(ms["post"]))
    report.note(f"job: python3 writing time.time() then sleeping 1 s, launcher none, cpu 1000m, "
                f"200 MiB; both sides look every {OBSERVE * 1000:.0f} ms (GET status / squeue)")
    report.note(f"{ROUNDS * 2} timed runs in {elapsed:.0f} s; pfleet samples (ms): "
                + " ".join(f"{v:.0f}" for v in ms["pfleet"]))
    report.note("bare samples (ms): " + " ".join(f"{v:.0f}" for v in ms["bare"]))
    report.extra = {"samples_ms": ms}
    publish(report)


@pytest.mark.bench
@pytest.mark.timeout(900)
def test_short_jobs_end_to_end_vs_bare_sbatch(slurm_bench: SlurmDeployment,
                                              slurm_cluster: SlurmCluster,
                                              tmp_path: Path) -> None:
    bare = Bare(slurm_cluster, tmp_path)
    descriptors = plugin_descriptors(SHORT_ENTRYPOINT, "none", memory_limit=64)
    data = tiny_zip()
    token = slurm_bench.controller.token()
    local = threading.local()
    clients: list[PfconHttp] = []
    lock = threading.Lock()

    def client() -> PfconHttp:
        if not hasattr(local, "http"):
            local.http = PfconHttp(slurm_bench.controller.base, token)
            with lock:
                clients.append(local.http)
        return local.http

    def pfleet_one(name: str) -> None:
        http = client()
        http.submit(name, descriptors, data)
        done = http.wait(name, interval=POLL, timeout=300)
        if done["status"] != "finishedSuccessfully":
            raise JobFailed(f"job {name}: {done}")

    def bare_one(name: str) -> None:
        job_id = bare.sbatch(bare.script(name, SHORT_ENTRYPOINT))
        if bare.wait(job_id, ENDED, POLL, within=300) != "COMPLETED":
            raise JobFailed(f"bare job {name} did not complete")

    def block(run: Callable[[str], None], prefix: str, count: int) -> float:
        t0 = time.monotonic()
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            list(pool.map(run, [f"{prefix}-{i}" for i in range(count)]))
        return time.monotonic() - t0

    half = JOBS // 2
    walls = {"pfleet": 0.0, "bare": 0.0}
    try:
        block(pfleet_one, "sj-warm-p", CONCURRENCY)
        block(bare_one, "sj-warm-b", CONCURRENCY)
        for side, prefix in (("bare", "sj-b1"), ("pfleet", "sj-p1"), ("pfleet", "sj-p2"),
                             ("bare", "sj-b2")):
            walls[side] += block(pfleet_one if side == "pfleet" else bare_one, prefix, half)
        cleanup = PfconHttp(slurm_bench.controller.base, token)
        try:
            for prefix, count in (("sj-warm-p", CONCURRENCY), ("sj-p1", half),
                                  ("sj-p2", half)):
                for i in range(count):
                    cleanup.remove(f"{prefix}-{i}")
        finally:
            cleanup.close()
    finally:
        for http in clients:
            http.close()

    report = Report(11, f"SLURM: {2 * half} short jobs ('true') end to end, {CONCURRENCY} "
                        "client threads, vs bare sbatch")
    report.add("wall time (s)", walls["pfleet"], walls["bare"], "sbatch+squeue",
               f"<= {JOBS_TARGET:.2f}x", walls["pfleet"] / walls["bare"] <= JOBS_TARGET,
               fmt="{:.2f}")
    report.add("jobs/s", 2 * half / walls["pfleet"], 2 * half / walls["bare"],
               "sbatch+squeue", fmt="{:.2f}")
    report.note(f"A-B-B-A blocks of {half}; status/squeue every {POLL} s per job, as CUBE "
                "polls; launcher none; clean-up (DELETE) not timed")
    publish(report)
