"""Bench 1: POST -> container running, against a bare ``docker run`` of the same
container, side by side.

The container's first action writes a wall-clock timestamp into
``/share/outgoing/t``; latency = that timestamp - the time just before the request
(pfleet: the POST; baseline: the docker SDK's ``containers.run(detach=True)``, and
for information the ``docker run -d`` CLI).  Same image, command, bind mounts and
limits on every side; the three are interleaved (order rotated each round).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import docker
import pytest
from docker.types import Mount

from tests.bench.helpers import (
    JobFailed,
    PfconHttp,
    Report,
    median,
    percentile,
    plugin_descriptors,
    publish,
    tiny_zip,
)
from tests.support.engines import PYTHON_IMAGE, Engine

ROUNDS = int(os.environ.get("PFLEET_BENCH_LATENCY_N", "15"))
TARGET_RATIO = 1.10
SCRIPT = "import time; open('/share/outgoing/t', 'w').write(repr(time.time()))"
ENTRYPOINT = ["python3", "-c", SCRIPT]
# pfcon's command line for an "fs" plugin: entrypoint + args + the output dir.
COMMAND = [*ENTRYPOINT, "/share/outgoing"]
CPU_LIMIT, MEMORY_MIB = 1000, 200


def wait_timestamp(path: Path, timeout: float = 60.0) -> float:
    """The float the container wrote to ``path`` (polled every 5 ms, bounded)."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.005) + 2):
        try:
            text = path.read_text()
            if text:
                return float(text)
        except (FileNotFoundError, ValueError):
            pass
        if time.monotonic() > deadline:
            break
        time.sleep(0.005)
    raise JobFailed(f"no timestamp in {path} after {timeout:g} s")


class Sides:
    def __init__(self, http: PfconHttp, storebase: Path, engine: Engine, scratch: Path) -> None:
        self.http = http
        self.storebase = storebase
        self.engine = engine
        self.scratch = scratch
        self.client = docker.DockerClient(base_url=engine.url, timeout=120)
        self.zip = tiny_zip()
        self.descriptors = plugin_descriptors(
            ENTRYPOINT, PYTHON_IMAGE, cpu_limit=CPU_LIMIT, memory_limit=MEMORY_MIB
        )
        self.post_to_201: list[float] = []
        self.sent: dict[str, tuple[float, float]] = {}  # name -> (request time, timestamp)

    # pfleet: POST, the container's timestamp, then wait for the end and clean up.
    def pfleet(self, name: str) -> float:
        prepared = self.http.prepare_submit(name, self.descriptors, self.zip)
        t0 = time.time()
        response = self.http.send(prepared)
        self.post_to_201.append(time.time() - t0)
        if response.status_code != 201:
            raise JobFailed(f"submit {name}: {response.status_code} {response.text[:300]}")
        stamp = wait_timestamp(self.storebase / f"key-{name}" / "outgoing" / "t")
        self.sent[name] = (t0, stamp)
        done = self.http.wait(name, interval=0.05, timeout=60.0)
        if done["status"] != "finishedSuccessfully":
            raise JobFailed(f"job {name}: {done}")
        self.http.remove(name)
        self._wait_container_gone(name)
        shutil.rmtree(self.storebase / f"key-{name}")
        return stamp - t0

    def _wait_container_gone(self, name: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / 0.02) + 2):
            if not self.client.api.containers(all=True, filters={"name": f"^{name}$"}):
                return
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        raise JobFailed(f"container {name} not removed after DELETE")

    def _dirs(self, name: str) -> tuple[Path, Path]:
        incoming, outgoing = self.scratch / name / "incoming", self.scratch / name / "outgoing"
        incoming.mkdir(parents=True)
        outgoing.mkdir()
        (incoming / "in.txt").write_text("benchmark input\n")
        return incoming, outgoing

    # Baseline: the docker SDK, as pfcon drives the engine.
    def sdk(self, name: str) -> float:
        incoming, outgoing = self._dirs(name)
        t0 = time.time()
        container = self.client.containers.run(
            PYTHON_IMAGE,
            COMMAND,
            name=name,
            detach=True,
            mounts=[
                Mount("/share/incoming", str(incoming), type="bind", read_only=True),
                Mount("/share/outgoing", str(outgoing), type="bind"),
            ],
            mem_limit=MEMORY_MIB << 20,
            memswap_limit=MEMORY_MIB << 20,
            nano_cpus=CPU_LIMIT * 1_000_000,
        )
        stamp = wait_timestamp(outgoing / "t")
        self.sent[name] = (t0, stamp)
        code = container.wait(timeout=60)["StatusCode"]
        container.remove(force=True)
        shutil.rmtree(self.scratch / name)
        if code != 0:
            raise JobFailed(f"baseline container {name} exited {code}")
        return stamp - t0

    # For information: the docker CLI (adds the CLI's own start-up).
    def cli(self, name: str) -> float:
        incoming, outgoing = self._dirs(name)
        argv = [
            *self.engine.cli, "run", "-d", "--name", name,
            "--mount", f"type=bind,source={incoming},target=/share/incoming,readonly",
            "--mount", f"type=bind,source={outgoing},target=/share/outgoing",
            "--memory", f"{MEMORY_MIB}m", "--memory-swap", f"{MEMORY_MIB}m",
            "--cpus", str(CPU_LIMIT / 1000), PYTHON_IMAGE, *COMMAND,
        ]  # fmt: skip
        t0 = time.time()
        run = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        if run.returncode != 0:
            raise JobFailed(f"docker run {name}: {run.stderr.strip()}")
        stamp = wait_timestamp(outgoing / "t")
        self.sent[name] = (t0, stamp)
        container = self.client.containers.get(name)
        code = container.wait(timeout=60)["StatusCode"]
        container.remove(force=True)
        shutil.rmtree(self.scratch / name)
        if code != 0:
            raise JobFailed(f"baseline container {name} exited {code}")
        return stamp - t0


def engine_phases(sides: Sides, since: float) -> dict[str, dict[str, list[float]]]:
    """Per side, in ms: request -> the engine's ``create`` event, ``create`` -> ``start``,
    ``start`` -> the container's own timestamp (the engine's events carry ns times)."""
    seen: dict[str, dict[str, float]] = {}
    events = sides.client.events(
        since=int(since) - 1,
        until=int(time.time()) + 1,
        decode=True,
        filters={"type": "container", "event": ["create", "start"]},
    )
    for event in events:
        name = ((event.get("Actor") or {}).get("Attributes") or {}).get("name", "")
        seen.setdefault(name, {})[str(event.get("Action"))] = int(event["timeNano"]) / 1e9
    out: dict[str, dict[str, list[float]]] = {}
    for name, (t0, stamp) in sides.sent.items():
        marks = seen.get(name, {})
        if "create" not in marks or "start" not in marks or "-warm-" in name:
            continue
        side = name.split("-")[1]
        phases = out.setdefault(side, {"create": [], "start": [], "process": []})
        phases["create"].append(1000 * (marks["create"] - t0))
        phases["start"].append(1000 * (marks["start"] - marks["create"]))
        phases["process"].append(1000 * (stamp - marks["start"]))
    return out


@pytest.mark.bench
@pytest.mark.timeout(900)
def test_post_to_running_latency(bench_deployment, bench_engine: Engine, tmp_path: Path) -> None:
    deployment = bench_deployment()
    http = deployment.client()
    sides = Sides(http, deployment.storebase, bench_engine, tmp_path)
    runners: list[tuple[str, Callable[[str], float]]] = [
        ("pfleet", sides.pfleet),
        ("sdk", sides.sdk),
        ("cli", sides.cli),
    ]
    results: dict[str, list[float]] = {name: [] for name, _ in runners}
    try:
        for name, run in runners:  # warm-up: caches, first-use paths
            run(f"lat-warm-{name}")
        sides.post_to_201.clear()
        t_start, wall_start = time.monotonic(), time.time()
        for i in range(ROUNDS):
            k = i % len(runners)
            for name, run in runners[k:] + runners[:k]:
                results[name].append(run(f"lat-{name}-{i}"))
        elapsed = time.monotonic() - t_start
        phases = engine_phases(sides, wall_start)
    finally:
        http.close()
        sides.client.close()

    ms = {name: [v * 1000 for v in values] for name, values in results.items()}
    report = Report(1, f"POST -> container running ({PYTHON_IMAGE}, {ROUNDS} rounds, interleaved)")
    p_med, s_med, c_med = (median(ms[n]) for n in ("pfleet", "sdk", "cli"))
    report.add(
        "median POST->running (ms)",
        p_med,
        s_med,
        "docker SDK",
        f"<= {TARGET_RATIO:.2f}x",
        p_med / s_med <= TARGET_RATIO,
    )
    report.add(
        "p90 POST->running (ms)", percentile(ms["pfleet"], 90), percentile(ms["sdk"], 90),
        "docker SDK",
    )  # fmt: skip
    report.add("median vs docker CLI (ms)", p_med, c_med, "docker run -d")
    report.add("p90 vs docker CLI (ms)", percentile(ms["pfleet"], 90), percentile(ms["cli"], 90),
               "docker run -d")  # fmt: skip
    report.add("min POST->running (ms)", min(ms["pfleet"]), min(ms["sdk"]), "docker SDK")
    labels = {"create": "  request -> engine 'create' event (ms)",
              "start": "  'create' -> 'start' event (ms)",
              "process": "  'start' event -> container's timestamp (ms)"}  # fmt: skip
    if "pfleet" in phases and "sdk" in phases:
        for key, label in labels.items():
            report.add(label, median(phases["pfleet"][key]), median(phases["sdk"][key]),
                       "docker SDK")  # fmt: skip
    post_ms = [v * 1000 for v in sides.post_to_201]
    report.add("median POST->201 answer (ms)", median(post_ms))
    report.add("median 201->running (ms)", p_med - median(post_ms))
    report.note(f"container: python3 -c <write time.time()>, cpu {CPU_LIMIT}m, {MEMORY_MIB} MiB, "
                "incoming (ro) + outgoing bind mounts on every side")  # fmt: skip
    report.note(f"{ROUNDS * 3} timed runs in {elapsed:.0f} s; pfleet samples (ms): "
                + " ".join(f"{v:.0f}" for v in ms["pfleet"]))  # fmt: skip
    report.note("docker SDK samples (ms): " + " ".join(f"{v:.0f}" for v in ms["sdk"]))
    report.extra = {"samples_ms": ms, "post_to_201_ms": post_ms, "engine_phases_ms": phases}
    publish(report)
