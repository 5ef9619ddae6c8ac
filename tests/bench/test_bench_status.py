"""Bench 2: status GETs per second with 16 concurrent clients (``wrk -t2 -c16 -d10s``),
against a finished job and against a running one.  The baseline is the figure
measured with pfcon on this machine kind (155/s); the controller's CPU time during
each run is read from /proc/<pid>/stat.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass

import pytest

from tests.bench.helpers import (
    BenchDeployment,
    JobFailed,
    Report,
    cpu_seconds,
    plugin_descriptors,
    publish,
    tiny_zip,
)
from tests.support.engines import BUSYBOX_IMAGE

PFCON_REFERENCE = 155.0  # GETs/s measured with pfcon on this machine kind
TARGET = 2000.0
DURATION = os.environ.get("PFLEET_BENCH_WRK_DURATION", "10s")
THREADS, CONNECTIONS = 2, 16


def ensure_wrk() -> str:
    """``wrk``'s path, installing the Debian package when missing (skip if impossible)."""
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("wrk is missing and cannot be installed here (needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for step in (["apt-get", "install", "-y", "-q", "wrk"], ["apt-get", "update", "-q"],
                 ["apt-get", "install", "-y", "-q", "wrk"]):  # fmt: skip
        if step[1] == "update" and shutil.which("wrk"):
            break
        subprocess.run(step, capture_output=True, text=True, timeout=300, env=env)
    found = shutil.which("wrk")
    if not found:
        pytest.skip("wrk could not be installed (apt-get install -y wrk failed)")
    return found


@dataclass
class WrkResult:
    requests_per_s: float
    requests: int
    seconds: float
    non_2xx: int
    socket_errors: int
    p50_ms: float
    p99_ms: float
    cpu_s: float  # controller CPU time during the run
    output: str


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}[unit]


def run_wrk(wrk: str, url: str, token: str, pid: int) -> WrkResult:
    argv = [wrk, f"-t{THREADS}", f"-c{CONNECTIONS}", f"-d{DURATION}", "--latency",
            "-H", f"Authorization: Bearer {token}", url]  # fmt: skip
    cpu0 = cpu_seconds(pid)
    run = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    cpu = cpu_seconds(pid) - cpu0
    out = run.stdout
    if run.returncode != 0:
        raise JobFailed(f"wrk failed ({run.returncode}): {run.stderr or out}")
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in ([\d.]+)(ms|s|m)", out)
    if rps is None or total is None:
        raise JobFailed(f"cannot read wrk's output:\n{out}")
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    seconds = float(total.group(2)) * {"ms": 0.001, "s": 1.0, "m": 60.0}[total.group(3)]
    return WrkResult(
        requests_per_s=float(rps.group(1)),
        requests=int(total.group(1)),
        seconds=seconds,
        non_2xx=int(non2xx.group(1)) if non2xx else 0,
        socket_errors=sum(int(g) for g in errors.groups()) if errors else 0,
        p50_ms=_ms(p50.group(1)) if p50 else float("nan"),
        p99_ms=_ms(p99.group(1)) if p99 else float("nan"),
        cpu_s=cpu,
        output=out,
    )


@pytest.mark.bench
@pytest.mark.timeout(300)
def test_status_gets_per_second(bench_deployment) -> None:
    wrk = ensure_wrk()
    deployment: BenchDeployment = bench_deployment()
    http = deployment.client()
    try:
        http.submit("st-done", plugin_descriptors(["true"], BUSYBOX_IMAGE), tiny_zip())
        done = http.wait("st-done")
        if done["status"] != "finishedSuccessfully":
            raise JobFailed(f"st-done: {done}")
        http.submit(
            "st-running", plugin_descriptors(["sh", "-c", "sleep 300"], BUSYBOX_IMAGE), tiny_zip()
        )
        http.wait("st-running", until=("started",), timeout=60.0)

        results: dict[str, WrkResult] = {}
        for label, jid in (("finished", "st-done"), ("running", "st-running")):
            url = f"{deployment.base}pluginjobs/{jid}/"
            result = run_wrk(wrk, url, deployment.token, deployment.pid)
            if result.requests == 0 or result.non_2xx or result.socket_errors:
                raise JobFailed(f"wrk against {label} job: {result.requests} requests, "
                                f"{result.non_2xx} non-2xx, {result.socket_errors} socket "
                                f"errors\n{result.output}")  # fmt: skip
            results[label] = result
        still = http.status("st-running")["status"]
        http.remove("st-running")
    finally:
        http.close()
    if still != "started":
        raise JobFailed(f"the running job was no longer running during its run: {still}")

    report = Report(2, f"status GETs/s, wrk -t{THREADS} -c{CONNECTIONS} -d{DURATION}")
    for label, r in results.items():
        report.add(f"GET status of a {label} job (/s)", r.requests_per_s, PFCON_REFERENCE,
                   "pfcon ref", f">= {TARGET:.0f}/s", r.requests_per_s >= TARGET,
                   fmt="{:.0f}")  # fmt: skip
    for label, r in results.items():
        report.add(f"{label}: latency p50 (ms)", r.p50_ms, fmt="{:.2f}")
        report.add(f"{label}: latency p99 (ms)", r.p99_ms, fmt="{:.2f}")
    for label, r in results.items():
        share = 100.0 * r.cpu_s / r.seconds
        per_req = 1e6 * r.cpu_s / max(r.requests, 1)
        report.add(f"{label}: controller CPU (s)", r.cpu_s, fmt="{:.2f}")
        report.note(f"{label}: {r.requests} requests in {r.seconds:.1f} s; controller CPU "
                    f"{r.cpu_s:.2f} s = {share:.0f}% of one core, {per_req:.0f} us per request "
                    f"({os.cpu_count()} cores, wrk on the same machine)")  # fmt: skip
    report.extra = {label: {k: v for k, v in vars(r).items() if k != "output"}
                    for label, r in results.items()}  # fmt: skip
    publish(report)
