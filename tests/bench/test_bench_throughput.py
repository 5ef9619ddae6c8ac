"""Bench 4: 200 jobs running ``true`` (busybox), end to end, 8 at a time, against 200
bare ``docker run --rm busybox true`` 8 at a time.

pfleet, per job (as CUBE does it through python-pfconclient): POST pluginjobs/ with a
tiny zip, poll its status every 0.2 s until it finished, POST deletejobs/, poll that
every 0.2 s, DELETE both jobs.  Baseline: the docker CLI in 8 threads.  The two sides
run in ``PFLEET_BENCH_ROUNDS`` (2) rounds of A-B-B-A blocks (docker, pfleet, pfleet,
docker; 50 jobs each by default); each side's wall time is the sum of its blocks.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.bench.helpers import (
    BenchDeployment,
    JobFailed,
    PfconHttp,
    Report,
    cpu_seconds,
    median,
    percentile,
    plugin_descriptors,
    publish,
    tiny_zip,
)
from tests.support.engines import BUSYBOX_IMAGE, Engine

JOBS = int(os.environ.get("PFLEET_BENCH_JOBS", "200"))
ROUNDS = max(1, int(os.environ.get("PFLEET_BENCH_ROUNDS", "2")))
CONCURRENCY = 8
WARMUP = CONCURRENCY
POLL = 0.2
TARGET_RATIO = 1.10
PFCON_RATIO = 1.23  # measured with pfcon on this machine kind


def engine_cpu(engine: Engine) -> float | None:
    """dockerd's CPU time, when ``engine.pid`` is dockerd itself."""
    try:
        if Path(f"/proc/{engine.pid}/comm").read_text().strip() != "dockerd":
            return None
        return cpu_seconds(engine.pid)
    except OSError:
        return None


@dataclass
class Run:
    wall_s: float
    per_job_s: list[float]
    controller_cpu_s: float | None = None
    engine_cpu_s: float | None = None
    children_cpu_s: float | None = None  # the controller's waited-for children


def docker_baseline(engine: Engine, count: int, prefix: str) -> Run:
    def one(i: int) -> float:
        t0 = time.monotonic()
        run = subprocess.run([*engine.cli, "run", "--rm", "--name", f"{prefix}-{i}",
                              BUSYBOX_IMAGE, "true"],
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        if run.returncode != 0:
            raise JobFailed(f"docker run {prefix}-{i}: {run.stderr.strip()}")
        return time.monotonic() - t0

    cpu0 = engine_cpu(engine)
    t0 = time.monotonic()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        per_job = list(pool.map(one, range(count)))
    wall = time.monotonic() - t0
    cpu1 = engine_cpu(engine)
    return Run(wall, per_job, engine_cpu_s=None if cpu0 is None or cpu1 is None else cpu1 - cpu0)


@dataclass
class Phases:
    submit: float
    to_finished: float
    cleanup: float
    polls: int


def pfleet_run(deployment: BenchDeployment, count: int, prefix: str) -> tuple[Run, list[Phases]]:
    local = threading.local()
    clients: list[PfconHttp] = []
    lock = threading.Lock()
    descriptors = plugin_descriptors(["true"], BUSYBOX_IMAGE, cpu_limit=1000, memory_limit=64)
    data = tiny_zip()

    def client() -> PfconHttp:
        if not hasattr(local, "http"):
            local.http = deployment.client()
            with lock:
                clients.append(local.http)
        return local.http

    def one(i: int) -> Phases:
        http = client()
        jid = f"{prefix}-{i}"
        t0 = time.monotonic()
        http.submit(jid, descriptors, data)
        t1 = time.monotonic()
        polls = 0
        deadline = t1 + 120.0
        for _ in range(int(120.0 / POLL) + 2):
            time.sleep(POLL)
            polls += 1
            status = http.status(jid)
            if status["status"] in ("finishedSuccessfully", "finishedWithError", "undefined"):
                break
            if time.monotonic() > deadline:
                raise JobFailed(f"job {jid} not finished after 120 s: {status}")
        if status["status"] != "finishedSuccessfully":
            raise JobFailed(f"job {jid}: {status}")
        t2 = time.monotonic()
        http.delete_data(jid, interval=POLL)
        t3 = time.monotonic()
        return Phases(t1 - t0, t2 - t1, t3 - t2, polls)

    cpu0, ecpu0 = cpu_seconds(deployment.pid), engine_cpu(deployment.engine)
    all0 = cpu_seconds(deployment.pid, children=True)
    t0 = time.monotonic()
    try:
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            phases = list(pool.map(one, range(count)))
    finally:
        for http in clients:
            http.close()
    wall = time.monotonic() - t0
    cpu1, ecpu1 = cpu_seconds(deployment.pid), engine_cpu(deployment.engine)
    children = cpu_seconds(deployment.pid, children=True) - all0 - (cpu1 - cpu0)
    run = Run(wall, [p.submit + p.to_finished + p.cleanup for p in phases], cpu1 - cpu0,
              None if ecpu0 is None or ecpu1 is None else ecpu1 - ecpu0, children)  # fmt: skip
    return run, phases


def _total(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else sum(v or 0.0 for v in values)


def merge(runs: list[Run]) -> Run:
    return Run(
        wall_s=sum(r.wall_s for r in runs),
        per_job_s=[t for r in runs for t in r.per_job_s],
        controller_cpu_s=_total([r.controller_cpu_s for r in runs]),
        engine_cpu_s=_total([r.engine_cpu_s for r in runs]),
        children_cpu_s=_total([r.children_cpu_s for r in runs]),
    )


@pytest.mark.bench
@pytest.mark.timeout(900)
def test_jobs_end_to_end_throughput(bench_deployment, bench_engine: Engine) -> None:
    deployment: BenchDeployment = bench_deployment()
    docker_baseline(bench_engine, WARMUP, "tp-warm-docker")
    pfleet_run(deployment, WARMUP, "tp-warm")

    # ROUNDS rounds of A-B-B-A blocks, so a drift of the machine's speed during the
    # run weighs on both sides alike (one round's docker blocks differed by up to 25 %).
    block = JOBS // (2 * ROUNDS)
    docker_runs: list[Run] = []
    pfleet_runs: list[Run] = []
    phases: list[Phases] = []
    blocks: list[str] = []
    for r in range(ROUNDS):
        for side in ("docker", "pfleet", "pfleet", "docker"):
            name = f"tp-{side}-{r}-{len(blocks)}"
            if side == "docker":
                docker_runs.append(docker_baseline(bench_engine, block, name))
                blocks.append(f"d {docker_runs[-1].wall_s:.1f}")
            else:
                run, run_phases = pfleet_run(deployment, block, name)
                pfleet_runs.append(run)
                phases += run_phases
                blocks.append(f"p {run.wall_s:.1f}")
    pfleet, docker = merge(pfleet_runs), merge(docker_runs)
    jobs = block * 2 * ROUNDS
    round_ratios = [
        sum(r.wall_s for r in pfleet_runs[2 * i : 2 * i + 2])
        / sum(r.wall_s for r in docker_runs[2 * i : 2 * i + 2])
        for i in range(ROUNDS)
    ]
    baseline_wall = docker.wall_s

    report = Report(4, f"{jobs} jobs 'true' (busybox) end to end, concurrency {CONCURRENCY}")
    report.add(f"wall time for {jobs} jobs (s)", pfleet.wall_s, baseline_wall, "docker run --rm",
               f"<= {TARGET_RATIO:.2f}x", pfleet.wall_s / baseline_wall <= TARGET_RATIO,
               fmt="{:.2f}")  # fmt: skip
    report.add("jobs per second", jobs / pfleet.wall_s, jobs / baseline_wall, "docker run --rm",
               fmt="{:.2f}")  # fmt: skip
    report.add("per job median (s)", median(pfleet.per_job_s),
               median(docker.per_job_s), "docker run --rm",
               fmt="{:.2f}")  # fmt: skip
    report.add("per job p90 (s)", percentile(pfleet.per_job_s, 90),
               percentile(docker.per_job_s, 90), "docker run --rm",
               fmt="{:.2f}")  # fmt: skip
    report.add("  submit POST -> 201, median (ms)", 1000 * median([p.submit for p in phases]))
    report.add("  201 -> seen finished, median (ms)",
               1000 * median([p.to_finished for p in phases]))  # fmt: skip
    report.add("  deletejobs + DELETEs, median (ms)", 1000 * median([p.cleanup for p in phases]))
    report.add("  status polls per job, mean", sum(p.polls for p in phases) / len(phases),
               fmt="{:.2f}")  # fmt: skip
    if pfleet.controller_cpu_s is not None:
        report.add("controller CPU (s)", pfleet.controller_cpu_s, fmt="{:.2f}")
    if pfleet.children_cpu_s is not None:
        report.add("  its child processes' CPU (s)", pfleet.children_cpu_s, fmt="{:.2f}")
    if pfleet.engine_cpu_s is not None and docker.engine_cpu_s is not None:
        report.add("dockerd CPU (s)", pfleet.engine_cpu_s, docker.engine_cpu_s, "docker run --rm",
                   fmt="{:.2f}")  # fmt: skip
    report.note(
        f"{ROUNDS} rounds of blocks of {block} jobs, d(ocker)/p(fleet) in order (s): "
        f"{' / '.join(blocks)}; ratio per round: "
        f"{', '.join(f'{x:.2f}x' for x in round_ratios)}; "
        f"pfcon reference ratio {PFCON_RATIO:.2f}x"
    )
    report.note(f"pfleet: cpu_limit 1000, memory_limit 64, status polled every {POLL} s "
                "(a poll's wait adds up to 0.2 s per job and per delete job)")  # fmt: skip
    report.extra = {
        "pfleet_wall_s": pfleet.wall_s,
        "docker_wall_s": docker.wall_s,
        "blocks": blocks,
        "round_ratios": round_ratios,
        "controller_cpu_s": pfleet.controller_cpu_s,
    }
    publish(report)
