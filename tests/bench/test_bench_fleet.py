"""Bench 7, 8 and 9: the fleet side of the controller, with simulated agents.

No container engine is needed: the agents are protocol-level clients (aiohttp
WebSocket clients speaking ``agent.protocol``) running in one child process, this
module run as ``python -m tests.bench.test_bench_fleet <config.json>`` (``SimFleet``).
It connects every agent (hello, then waits for welcome), prints one JSON line, then
heartbeats each agent every 5 s (spread evenly over the interval) until it reads
``stop`` on its stdin, and prints its counters as a last JSON line.

**Bench 7, 500 agents heartbeating.**  (b) A real ``pfleet-controller`` (production mode)
process (heartbeat interval 5 s); 500 agent tokens minted through the admin API
(``POST /api/v1/agents/tokens/``); after every agent said hello and a settling time,
the controller's CPU time (``/proc/<pid>/stat`` utime + stime, all threads) over a
60 s window (``PFLEET_BENCH_FLEET_WINDOW``).  A ``GET /health/`` every 0.1 s during
the window shows how responsive the loop stays.  (a) The controller does not answer
a heartbeat, so its handling time cannot be seen from outside: the same app
(``create_app`` + ``web.AppRunner``) runs in a thread of the benchmark process, on
its own event loop, with ``agent.protocol.decode`` and ``Fleet._handle`` wrapped by
timers (monkeypatched: an instrumented controller, not the shipped one).  Handling
time = decode + ``Fleet._handle`` (which awaits the SQLite UPDATE on the store
thread), over a 30 s window (``PFLEET_BENCH_FLEET_P99_WINDOW``).  Targets: <= 25 % of
one core, p99 < 10 ms.

**Bench 8, placement with 500 agents and 5,000 queued jobs.**  The pure
``placement.choose`` over 500 ``AgentView`` (varied capacity, usage, labels; a few
suspect, draining or unhealthy) for each of 5,000 requests, taking the capacity of
each placed job as ``place_queued`` does.  Then ``Fleet.place_queued()`` against a
real ``Store`` (SQLite in a temporary directory) holding 5,000 QUEUED jobs, with 500
sessions whose WebSocket only counts what it is sent; rounds run until the queue is
empty.  Per-job time = round time / jobs considered, and the p99 of one job's
iteration: the time between two consecutive ``choose`` calls of a round, where the
store call that assigns the choices among 64 jobs considered and the run messages
sent for them count as a share for each of those jobs.  Target: p99 < 5 ms.

**Bench 9, dispatch capacity.**  A real ``pfleet-controller`` process in production
mode (compact JSON answers, as ChRIS deployments run it), 8 simulated agents
answering each ``run`` at once with ``event running`` and ``event exited 0`` (and
``logs_reply`` to a logs request).  Clients (aiohttp, in the
benchmark process) at concurrency 32 and 64 (``PFLEET_BENCH_FLEET_CONCURRENCY``):
each job = POST pluginjobs/ (multipart, tiny zip), then GET its status every 10 ms
until ``finishedSuccessfully``.  2,000 jobs per run (``PFLEET_BENCH_FLEET_JOBS``)
after a warm-up.  Target: >= 500 jobs/s.

``PFLEET_BENCH_FLEET_PYSPY=<dir>``: also record the controller with ``py-spy``
(raw collapsed stacks, ``<dir>/bench7-heartbeats.txt`` and ``bench9-c<N>.txt``)
during the measured windows; py-spy must be on PATH or in the venv.
``PFLEET_BENCH_FLEET_PYSPY_GIL=1``: only samples that hold the GIL (``--gil``): where
the interpreter's time goes, threads included.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import datetime as dt
import json
import os
import random
import resource
import secrets
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import requests
from aiohttp import web

from agent import protocol as p
from controller import placement
from controller.app import create_app
from controller.auth import issue_agent_token
from controller.config import DEV_PASSWORD, DEV_USER, Config, load_config
from controller.fleet import ASSIGN_GROUP, QUEUE_PAGE, AgentSession, Fleet
from controller.states import State
from controller.storage import zipmode
from controller.store import JobRow, Store
from tests.bench.helpers import (
    LOG_LEVEL,
    JobFailed,
    Report,
    cpu_seconds,
    percentile,
    plugin_descriptors,
    publish,
    tiny_zip,
)
from tests.conftest import free_port
from tests.support.processes import ControllerProc, controller_proc, http_json

REPO_ROOT = Path(__file__).resolve().parents[2]

AGENTS = int(os.environ.get("PFLEET_BENCH_FLEET_AGENTS", "500"))
HEARTBEAT = 5.0
CPU_WINDOW = float(os.environ.get("PFLEET_BENCH_FLEET_WINDOW", "60"))
P99_WINDOW = float(os.environ.get("PFLEET_BENCH_FLEET_P99_WINDOW", "30"))
SETTLE = HEARTBEAT + 1.0  # every agent has sent its first heartbeat
QUEUED_JOBS = 5000
DISPATCH_AGENTS = 8
DISPATCH_JOBS = int(os.environ.get("PFLEET_BENCH_FLEET_JOBS", "2000"))
CONCURRENCIES = tuple(int(c) for c in
                      os.environ.get("PFLEET_BENCH_FLEET_CONCURRENCY", "32,64").split(","))
STATUS_POLL = 0.01
DISPATCH_STOREBASE = os.environ.get("PFLEET_BENCH_FLEET_STOREBASE", "tmpfs")  # or "disk"
PYSPY_DIR = os.environ.get("PFLEET_BENCH_FLEET_PYSPY", "")
PYSPY_GIL = os.environ.get("PFLEET_BENCH_FLEET_PYSPY_GIL", "") == "1"

CPU_TARGET = 25.0  # % of one core
HB_P99_TARGET_MS = 10.0
PLACE_P99_TARGET_MS = 5.0
DISPATCH_TARGET = 500.0  # jobs/s

SIM_MAX_SECONDS = 900.0  # a simulated fleet never outlives this, whatever happens


def load_note() -> str:
    load1 = os.getloadavg()[0]
    flag = " (ABOVE 1.5: other work competed)" if load1 > 1.5 else ""
    return f"load average (1 min) at the end: {load1:.2f}{flag}"


def ms(seconds: float) -> float:
    return seconds * 1000.0


# ======================================================= simulated agents (child)


def rfc3339() -> str:
    return dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")


class SimAgent:
    """One agent at the protocol level: hello, heartbeats, and (``answer_runs``) a
    job that ends at once for every ``run``."""

    def __init__(self, url: str, name: str, token: str, capacity: dict[str, Any],
                 labels: dict[str, str], answer_runs: bool) -> None:
        self.url = url
        self.name = name
        self.token = token
        self.answer_runs = answer_runs
        self.hello = p.Hello(version=p.PROTOCOL_VERSION, agent=name, runtime="fake",
                             capabilities={"multi_worker": False, "hard_memory_limit": True,
                                           "gpus": 0},
                             labels=labels, capacity=capacity, software="bench-sim",
                             found_by="configured")
        self.heartbeat_text = p.encode(p.Heartbeat(
            cpu_percent=3.5, memory_total_mib=capacity["memory_mib"],
            memory_available_mib=capacity["memory_mib"] // 2, disk_total_mib=500_000,
            disk_free_mib=250_000, gpus=0, runtime_ok=True, running=[], problems=[],
            capacity=capacity))
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.lock = asyncio.Lock()
        self.reader: asyncio.Task[None] | None = None
        self.seq = 0
        self.counts = {"heartbeats": 0, "runs": 0, "events": 0, "acks": 0, "logs": 0,
                       "other": 0}

    async def send_text(self, text: str) -> None:
        assert self.ws is not None
        async with self.lock:
            await self.ws.send_str(text)

    async def connect(self, http: aiohttp.ClientSession) -> None:
        self.ws = await http.ws_connect(self.url, max_msg_size=32 << 20,
                                        headers={"Authorization": f"Bearer {self.token}"})
        await self.send_text(p.encode(self.hello))
        msg = await self.ws.receive(timeout=120.0)
        if msg.type != aiohttp.WSMsgType.TEXT:
            raise RuntimeError(f"{self.name}: no welcome: {msg.type} {msg.data!r}")
        welcome = p.decode(msg.data)
        if not isinstance(welcome, p.Welcome):
            raise RuntimeError(f"{self.name}: expected welcome, got {welcome.type}")
        self.reader = asyncio.create_task(self.read_loop())

    async def read_loop(self) -> None:
        assert self.ws is not None
        async for msg in self.ws:  # also answers the controller's pings
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            message = p.decode(msg.data)
            if isinstance(message, p.Run) and self.answer_runs:
                self.counts["runs"] += 1
                spec = message.spec
                now = rfc3339()
                for state, extra in (("running", {}),
                                     ("exited", {"exit_code": 0, "finished_at": now,
                                                 "logs": ""})):
                    self.seq += 1
                    await self.send_text(p.encode(p.Event(
                        seq=self.seq, job=spec.job, attempt=spec.attempt, state=state,
                        started_at=now, **extra)))
                    self.counts["events"] += 1
            elif isinstance(message, p.Ack):
                self.counts["acks"] += 1
            elif isinstance(message, p.LogsRequest):
                self.counts["logs"] += 1
                await self.send_text(p.encode(p.LogsReply(request=message.request, logs="")))
            elif isinstance(message, p.Remove) and message.request:
                await self.send_text(p.encode(p.RemoveReply(request=message.request)))
            else:
                self.counts["other"] += 1

    async def heartbeat_loop(self, offset: float, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time() + offset
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, next_at - loop.time()))
            if stop.is_set():
                return
            try:
                await self.send_text(self.heartbeat_text)
            except (ConnectionResetError, RuntimeError):
                return
            self.counts["heartbeats"] += 1
            next_at += HEARTBEAT

    async def close(self) -> None:
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await self.ws.close()
        if self.reader is not None:
            self.reader.cancel()
            with contextlib.suppress(BaseException):
                await self.reader


def _emit(data: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(data) + "\n")
    sys.stdout.flush()


async def sim_fleet_main(cfg: dict[str, Any]) -> None:
    """The child process: connect every agent, report, heartbeat until ``stop``."""
    loop = asyncio.get_running_loop()
    agents = [SimAgent(cfg["url"], a["name"], a["token"], a["capacity"], a["labels"],
                       cfg["answer_runs"]) for a in cfg["agents"]]
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    cpu0 = time.process_time()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        gate = asyncio.Semaphore(cfg.get("connect_concurrency", 32))

        async def connect(agent: SimAgent) -> None:
            async with gate:
                await agent.connect(http)

        t0 = time.monotonic()
        results = await asyncio.gather(*(connect(a) for a in agents), return_exceptions=True)
        connect_s = time.monotonic() - t0
        errors = [f"{a.name}: {r!r}" for a, r in zip(agents, results, strict=True)
                  if isinstance(r, BaseException)]
        live = [a for a, r in zip(agents, results, strict=True) if not isinstance(r, BaseException)]
        _emit({"ready": len(live), "errors": errors[:5], "connect_s": connect_s})
        stop = asyncio.Event()
        beats = [asyncio.create_task(a.heartbeat_loop(i * HEARTBEAT / max(len(live), 1), stop))
                 for i, a in enumerate(live)]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stdin.readline(), cfg.get("max_seconds", SIM_MAX_SECONDS))
        stop.set()
        await asyncio.gather(*beats, return_exceptions=True)
        totals: dict[str, int] = {}
        for a in live:
            for key, value in a.counts.items():
                totals[key] = totals.get(key, 0) + value
        closed_early = sum(1 for a in live if a.reader is not None and a.reader.done())
        await asyncio.gather(*(a.close() for a in agents), return_exceptions=True)
    _emit({"done": True, "counts": totals, "closed_early": closed_early,
           "cpu_s": time.process_time() - cpu0})


class SimFleet:
    """The child process of simulated agents, seen from the benchmark."""

    def __init__(self, workdir: Path, url: str, agents: list[dict[str, Any]], *,
                 answer_runs: bool, tag: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        cfg_path = workdir / f"sim-{tag}.json"
        cfg_path.write_text(json.dumps({"url": url, "agents": agents,
                                        "answer_runs": answer_runs,
                                        "max_seconds": SIM_MAX_SECONDS}))
        self.log_path = workdir / f"sim-{tag}.log"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.bench.test_bench_fleet", str(cfg_path)],
                cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self._buf = b""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _line(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise JobFailed(f"simulated agents: no answer after {timeout:.0f} s\n"
                                f"{self.log_tail()}")
            ready, _, _ = select.select([fd], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise JobFailed(f"simulated agents exited ({self.proc.poll()})\n"
                                    f"{self.log_tail()}")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def wait_ready(self, expected: int, timeout: float = 240.0) -> dict[str, Any]:
        info = self._line(timeout)
        if info.get("ready") != expected:
            raise JobFailed(f"only {info.get('ready')} of {expected} simulated agents "
                            f"connected: {info.get('errors')}")
        return info

    def stop(self, timeout: float = 60.0) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"stop\n")
        self.proc.stdin.flush()
        info = self._line(timeout)
        self.proc.wait(timeout=timeout)
        return info

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # by PID: the child this object started
            self.proc.wait(timeout=10)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def sim_agents(names: list[str], tokens: dict[str, str], *, big: bool) -> list[dict[str, Any]]:
    out = []
    for i, name in enumerate(names):
        capacity = ({"cpu_millicores": 10_000_000, "memory_mib": 10_000_000, "gpus": 0} if big
                    else {"cpu_millicores": (4, 8, 16, 32, 64)[i % 5] * 1000,
                          "memory_mib": (8, 16, 32, 64, 128)[i % 5] * 1024, "gpus": 0})
        out.append({"name": name, "token": tokens[name], "capacity": capacity,
                    "labels": {"zone": "abcd"[i % 4], "bench": "1"}})
    return out


# ============================================================ controller helpers


def raise_fd_limit() -> None:
    """500 agents are 500 sockets on each side; the children inherit the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 8192 if hard == resource.RLIM_INFINITY else min(hard, 8192)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def start_controller(workdir: Path) -> ControllerProc:
    """``pfleet-controller`` in production mode (compact JSON answers, as a ChRIS
    deployment runs it; the dev credentials given explicitly), no local agent, on
    127.0.0.1, heartbeat 5 s."""
    storebase = workdir / "storeBase"
    storebase.mkdir(parents=True, exist_ok=True)
    env = {"STOREBASE_MOUNT": str(storebase), "STOREBASE": str(storebase),
           "PFLEET_HEARTBEAT_INTERVAL": str(HEARTBEAT), "SECRET_KEY": secrets.token_hex(16),
           "PFCON_USER": DEV_USER, "PFCON_PASSWORD": DEV_PASSWORD}
    if os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    ctl = controller_proc(workdir, free_port(), env, local_agent=False,
                          extra_args=["--log-level", LOG_LEVEL], dev=False)
    ctl.start()
    try:
        ctl.wait_ready()
    except BaseException:
        ctl.stop()
        raise
    return ctl


async def _mint(base: str, client_token: str, names: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    gate = asyncio.Semaphore(16)
    headers = {"Authorization": f"Bearer {client_token}"}
    async with aiohttp.ClientSession(headers=headers) as http:

        async def one(name: str) -> None:
            async with gate, http.post(base + "agents/tokens/", json={"name": name}) as r:
                body = await r.json()
                if r.status != 201:
                    raise JobFailed(f"token for {name}: {r.status} {body}")
                out[name] = body["token"]

        await asyncio.gather(*(one(n) for n in names))
    return out


def mint_tokens(ctl: ControllerProc, names: list[str]) -> tuple[dict[str, str], float]:
    """Agent tokens through the admin API; returns them and the seconds it took."""
    t0 = time.monotonic()
    tokens = asyncio.run(_mint(ctl.base, ctl.token(), names))
    return tokens, time.monotonic() - t0


def fleet_url(base: str) -> str:
    return base.replace("http://", "ws://", 1) + "fleet/connect"


def agent_states(ctl: ControllerProc) -> dict[str, int]:
    status, body = http_json("GET", ctl.base + "agents/", token=ctl.token(), timeout=30.0)
    if status != 200 or not isinstance(body, dict):
        raise JobFailed(f"GET agents/: {status} {body}")
    states: dict[str, int] = {}
    for agent in body["agents"]:
        states[agent["state"]] = states.get(agent["state"], 0) + 1
    return states


class PySpy:
    """``py-spy record`` of a process for a while (only with PFLEET_BENCH_FLEET_PYSPY)."""

    def __init__(self, pid: int, name: str, seconds: float) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.path: Path | None = None
        if not PYSPY_DIR:
            return
        exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(exe).exists():
            return
        out = Path(PYSPY_DIR)
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / f"{name}.txt"
        self.proc = subprocess.Popen(
            [exe, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "200",
             "--format", "raw", "--nonblocking", "-o", str(self.path),
             *(["--gil"] if PYSPY_GIL else [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def wait(self) -> None:
        if self.proc is not None:
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # by PID: the py-spy this object started
                self.proc.wait(timeout=10)


class HealthProbe(threading.Thread):
    """GET /health/ every 0.1 s: how long the controller's loop keeps a request waiting."""

    def __init__(self, base: str) -> None:
        super().__init__(name="bench-health-probe", daemon=True)
        self.base = base
        self.samples: list[float] = []
        self.failures = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        with requests.Session() as http:
            while not self._stop_event.is_set():
                t0 = time.perf_counter()
                try:
                    ok = http.get(self.base + "health/", timeout=10).status_code == 200
                except requests.RequestException:
                    ok = False
                if ok:
                    self.samples.append(time.perf_counter() - t0)
                else:
                    self.failures += 1
                self._stop_event.wait(0.1)

    def finish(self) -> None:
        self._stop_event.set()
        self.join(timeout=15)


class InProcessController:
    """The controller app on its own event loop in a thread of this process (bench 7a)."""

    def __init__(self, workdir: Path) -> None:
        (workdir / "storeBase").mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.config: Config = load_config({
            "PFLEET_STATE_DIR": str(workdir / "state"),
            "STOREBASE_MOUNT": str(workdir / "storeBase"),
            "PFLEET_HEARTBEAT_INTERVAL": str(HEARTBEAT),
            "PFLEET_LISTEN": f"127.0.0.1:{self.port}",
        }, dev=True)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="bench-controller",
                                       daemon=True)
        self.app: web.Application | None = None
        self.runner: web.AppRunner | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v1/"

    def call(self, coro: Any, timeout: float = 120.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> None:
        self.thread.start()
        self.call(self._start())

    async def _start(self) -> None:
        self.app = create_app(self.config)
        self.runner = web.AppRunner(self.app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    def mint(self, names: list[str]) -> dict[str, str]:
        from controller.store import STORE

        assert self.app is not None
        store = self.app[STORE]

        async def add() -> dict[str, str]:
            out = {}
            for name in names:
                token, jti = issue_agent_token(self.config, name)
                await store.add_token(jti, name)
                out[name] = token
            return out

        return self.call(add())

    def stop(self) -> None:
        if self.thread.is_alive():
            if self.runner is not None:
                with contextlib.suppress(Exception):
                    self.call(self.runner.cleanup(), timeout=60.0)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=30)
        if not self.thread.is_alive():
            self.loop.close()


# ================================================================ bench 7


@dataclass
class ProcessRun:
    connect_s: float = 0.0
    connect_cpu_s: float = 0.0
    mint_s: float = 0.0
    window_s: float = 0.0
    cpu_s: float = 0.0
    heartbeats: int = 0
    health: list[float] = field(default_factory=list)
    health_failures: int = 0
    states: dict[str, int] = field(default_factory=dict)
    sim_cpu_s: float = 0.0


def run_heartbeats_process(workdir: Path, names: list[str]) -> ProcessRun:
    run = ProcessRun()
    ctl = start_controller(workdir)
    sim: SimFleet | None = None
    try:
        tokens, run.mint_s = mint_tokens(ctl, names)
        cpu0 = cpu_seconds(ctl.pid)
        sim = SimFleet(workdir, fleet_url(ctl.base), sim_agents(names, tokens, big=False),
                       answer_runs=False, tag="heartbeats")
        ready = sim.wait_ready(len(names))
        run.connect_s = ready["connect_s"]
        run.connect_cpu_s = cpu_seconds(ctl.pid) - cpu0
        time.sleep(SETTLE)
        run.states = agent_states(ctl)
        spy = PySpy(ctl.pid, "bench7-heartbeats", min(CPU_WINDOW, 30.0))
        probe = HealthProbe(ctl.base)
        probe.start()
        cpu0, t0 = cpu_seconds(ctl.pid), time.monotonic()
        time.sleep(CPU_WINDOW)
        run.cpu_s = cpu_seconds(ctl.pid) - cpu0
        run.window_s = time.monotonic() - t0
        probe.finish()
        spy.wait()
        run.health, run.health_failures = probe.samples, probe.failures
        done = sim.stop()
        run.heartbeats = done["counts"]["heartbeats"]
        run.sim_cpu_s = done["cpu_s"]
        if done["closed_early"]:
            raise JobFailed(f"{done['closed_early']} agent links were closed by the controller")
    finally:
        if sim is not None:
            sim.kill()
        ctl.stop()
    return run


@dataclass
class InProcessRun:
    window_s: float = 0.0
    cpu_s: float = 0.0
    handle: list[float] = field(default_factory=list)  # decode + Fleet._handle, seconds
    handle_only: list[float] = field(default_factory=list)
    decode: list[float] = field(default_factory=list)
    sqlite: list[float] = field(default_factory=list)  # Store._agent_heartbeat on its thread


def run_heartbeats_in_process(workdir: Path, names: list[str],
                              monkeypatch: pytest.MonkeyPatch) -> InProcessRun:
    decode_times: dict[int, float] = {}
    handle: list[float] = []
    handle_only: list[float] = []
    decode: list[float] = []
    sqlite: list[float] = []
    original_decode = p.decode
    original_handle = Fleet._handle
    original_update = Store._agent_heartbeat

    def timed_decode(text: str | bytes) -> p.Message:
        t0 = time.perf_counter()
        message = original_decode(text)
        if isinstance(message, p.Heartbeat):
            decode_times[id(message)] = time.perf_counter() - t0
        return message

    async def timed_handle(self: Fleet, session: AgentSession, message: p.Message) -> None:
        t0 = time.perf_counter()
        try:
            await original_handle(self, session, message)
        finally:
            if isinstance(message, p.Heartbeat):
                spent = time.perf_counter() - t0
                decoded = decode_times.pop(id(message), 0.0)
                handle_only.append(spent)
                decode.append(decoded)
                handle.append(spent + decoded)

    def timed_update(self: Store, name: str, heartbeat: dict[str, Any],
                     seen_at: float) -> None:
        t0 = time.perf_counter()
        original_update(self, name, heartbeat, seen_at)
        sqlite.append(time.perf_counter() - t0)

    # Fleet calls ``p.decode`` through the module, so patching the module is enough;
    # the simulated agents run in a child process and are not affected.
    monkeypatch.setattr(p, "decode", timed_decode)
    monkeypatch.setattr(Fleet, "_handle", timed_handle)
    monkeypatch.setattr(Store, "_agent_heartbeat", timed_update)
    ctl = InProcessController(workdir)
    sim: SimFleet | None = None
    run = InProcessRun()
    try:
        ctl.start()
        tokens = ctl.mint(names)
        sim = SimFleet(workdir, fleet_url(ctl.base), sim_agents(names, tokens, big=False),
                       answer_runs=False, tag="heartbeats-inproc")
        sim.wait_ready(len(names))
        time.sleep(SETTLE)
        marks = len(handle), len(handle_only), len(decode), len(sqlite)
        cpu0, t0 = time.process_time(), time.monotonic()
        time.sleep(P99_WINDOW)
        run.cpu_s = time.process_time() - cpu0  # this process: the controller's threads
        run.window_s = time.monotonic() - t0
        run.handle, run.handle_only = handle[marks[0]:], handle_only[marks[1]:]
        run.decode, run.sqlite = decode[marks[2]:], sqlite[marks[3]:]
        done = sim.stop()
        if done["closed_early"]:
            raise JobFailed(f"{done['closed_early']} agent links were closed by the controller")
    finally:
        if sim is not None:
            sim.kill()
        ctl.stop()
    return run


@pytest.mark.bench
@pytest.mark.timeout(600)
def test_heartbeats_500_agents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raise_fd_limit()
    names = [f"sim-{i:04d}" for i in range(AGENTS)]
    proc = run_heartbeats_process(tmp_path / "process", names)
    if proc.states.get("healthy", 0) != AGENTS:
        raise JobFailed(f"the controller lists {proc.states}, not {AGENTS} healthy agents")
    inproc = run_heartbeats_in_process(tmp_path / "inproc", names, monkeypatch)
    if not inproc.handle:
        raise JobFailed("no heartbeat was handled during the in-process window")

    share = 100.0 * proc.cpu_s / proc.window_s
    expected = AGENTS * proc.window_s / HEARTBEAT
    p99 = ms(percentile(inproc.handle, 99))
    report = Report(7, f"{AGENTS} simulated agents heartbeating every {HEARTBEAT:g} s")
    report.add(f"(b) controller process CPU, {proc.window_s:.0f} s window (% of one core)",
               share, target=f"<= {CPU_TARGET:g} %", ok=share <= CPU_TARGET)
    report.add("(b) controller CPU per heartbeat (us)",
               1e6 * proc.cpu_s / max(expected, 1), fmt="{:.0f}")
    report.add("(b) GET /health/ during the window: p50 (ms)",
               ms(percentile(proc.health, 50)), fmt="{:.2f}")
    report.add("(b) GET /health/ during the window: p99 (ms)",
               ms(percentile(proc.health, 99)), fmt="{:.2f}")
    report.add(f"(b) connect {AGENTS} agents (s)", proc.connect_s, fmt="{:.2f}")
    report.add("(b) controller CPU while they connected (s)", proc.connect_cpu_s,
               fmt="{:.2f}")
    report.add("(a) heartbeat handling p99, decode + Fleet._handle (ms)", p99,
               target=f"< {HB_P99_TARGET_MS:g} ms", ok=p99 < HB_P99_TARGET_MS, fmt="{:.2f}")
    report.add("(a)   p50 (ms)", ms(percentile(inproc.handle, 50)), fmt="{:.2f}")
    report.add("(a)   max (ms)", ms(max(inproc.handle)), fmt="{:.2f}")
    report.add("(a)   decode p99 (ms)", ms(percentile(inproc.decode, 99)), fmt="{:.3f}")
    report.add("(a)   Fleet._handle p99 (ms)", ms(percentile(inproc.handle_only, 99)),
               fmt="{:.2f}")
    report.add("(a)   SQLite UPDATE p99 (ms)",
               ms(percentile(inproc.sqlite, 99)), fmt="{:.3f}")
    report.add("(a) in-process controller CPU (% of one core)",
               100.0 * inproc.cpu_s / inproc.window_s)
    report.note(f"(b) real `pfleet-controller` process (production mode); "
                f"{proc.heartbeats} heartbeats "
                f"sent in all; agents listed {proc.states}; tokens: {AGENTS} POST "
                f"agents/tokens/ in {proc.mint_s:.1f} s; the {AGENTS} agents (one child "
                f"process) used {proc.sim_cpu_s:.1f} s CPU; health probe failures "
                f"{proc.health_failures}")
    report.note(f"(a) INSTRUMENTED controller: the app in a thread of the benchmark process, "
                f"agent.protocol.decode, Fleet._handle and Store._agent_heartbeat wrapped by "
                f"timers (monkeypatch); {len(inproc.handle)} heartbeats in "
                f"{inproc.window_s:.0f} s; _handle includes the wait for its batch's commit")
    report.note(load_note())
    report.extra = {"process": {k: v for k, v in vars(proc).items() if k != "health"},
                    "in_process": {"samples": len(inproc.handle),
                                   "p50_ms": ms(percentile(inproc.handle, 50)),
                                   "p99_ms": p99, "cpu_s": inproc.cpu_s,
                                   "window_s": inproc.window_s}}
    publish(report)


# ================================================================ bench 8


def make_views(n: int, rng: random.Random) -> list[placement.AgentView]:
    views = []
    for i in range(n):
        cpu = rng.choice((4, 8, 16, 32, 64, 128)) * 1000
        mem = rng.choice((8, 16, 32, 64, 128, 256)) * 1024
        views.append(placement.AgentView(
            name=f"sim-{i:04d}", cpu_millicores=cpu, memory_mib=mem,
            gpus=rng.choice((0, 0, 0, 1, 2)), multi_worker=rng.random() < 0.2,
            labels={"zone": "abcd"[i % 4], "tier": rng.choice(("gold", "silver"))},
            suspect=rng.random() < 0.02, draining=rng.random() < 0.02,
            healthy=rng.random() >= 0.02,
            used_cpu=int(cpu * rng.random() * 0.6), used_memory=int(mem * rng.random() * 0.6)))
    return views


def make_requests(n: int, rng: random.Random) -> list[placement.Request]:
    return [placement.Request(rng.choice((100, 250, 500, 1000, 2000, 4000)),
                              rng.choice((64, 200, 500, 1000, 4000)),
                              1 if rng.random() < 0.03 else 0,
                              2 if rng.random() < 0.02 else 1) for _ in range(n)]


def time_choose(views: list[placement.AgentView], reqs: list[placement.Request],
                strategy: placement.Strategy, selector: dict[str, str]) -> tuple[list[float], int]:
    times = []
    placed = 0
    for req in reqs:
        t0 = time.perf_counter()
        view = placement.choose(req, views, strategy=strategy, selector=selector)
        times.append(time.perf_counter() - t0)
        if view is not None:
            view.take(req)
            placed += 1
    return times, placed


class CountingWS:
    """Stands in for a session's WebSocket: counts what the controller sends."""

    def __init__(self) -> None:
        self.sent = 0

    async def send_str(self, data: str) -> None:
        self.sent += 1


@dataclass
class RoundStats:
    seconds: float
    considered: int
    placed: int
    iterations: list[float]  # per job: choose() to the next, its group's start shared


def job_iterations(marks: list[float], end: float,
                   groups: list[tuple[float, float]]) -> list[float]:
    """Per job of a round: the time from its ``choose()`` to the next one (or the
    round's end), with each group start (assign in the store, runs sent: start time,
    seconds) taken out of the gap it fell in and shared by the jobs it served."""
    if not marks:
        return []
    gaps = [b - a for a, b in zip(marks, [*marks[1:], end], strict=True)]
    served_up_to = -1
    for started, spent in groups:
        at = bisect.bisect_right(marks, started) - 1
        if at < 0 or at == served_up_to:
            continue
        gaps[at] -= spent
        share = spent / (at - served_up_to)
        for i in range(served_up_to + 1, at + 1):
            gaps[i] += share
        served_up_to = at
    return gaps


async def insert_queued(store: Store, rng: random.Random, numbers: range) -> None:
    """QUEUED plugin jobs as ``JobService.submit_plugin`` records them (zip mode)."""
    for i in numbers:
        jid = f"queued-{i:05d}"
        spec = {"image": "busybox:bench", "command": ["true"], "env": [],
                "cpu_limit": rng.choice((100, 250, 500, 1000, 2000)),
                "memory_limit": rng.choice((64, 200, 500, 1000)), "gpu_limit": 0,
                "number_of_workers": 1,
                "mounts": [m.__dict__ for m in zipmode.plugin_mounts(jid)]}
        await store.insert_job(JobRow(
            id=f"{i:032x}", seq=0, name=jid, jid=jid, kind="plugin", state=State.QUEUED,
            attempt=1, agent=None, spec=spec, image="busybox:bench", cmd="true",
            message="queued"))


async def place_rounds(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    rng = random.Random(8)
    store = Store(workdir / "state" / "pfleet.sqlite3")
    await store.open()
    try:
        config = load_config({"PFLEET_STATE_DIR": str(workdir / "state"),
                              "STOREBASE_MOUNT": str(workdir / "storeBase"),
                              "PFLEET_HEARTBEAT_INTERVAL": str(HEARTBEAT)}, dev=True)
        fleet = Fleet(config, store)
        sockets = []
        for i in range(AGENTS):
            cpu = rng.choice((16, 32, 64, 128)) * 1000
            mem = rng.choice((64, 128, 256)) * 1024
            capacity = {"cpu_millicores": cpu, "memory_mib": mem, "gpus": 0}
            ws = CountingWS()
            sockets.append(ws)
            hello = p.Hello(version=1, agent=f"sim-{i:04d}", runtime="fake",
                            capabilities={"multi_worker": False}, capacity=capacity,
                            labels={"zone": "abcd"[i % 4]})
            fleet.sessions[hello.agent] = AgentSession(
                name=hello.agent, ws=ws, hello=hello,  # type: ignore[arg-type]
                heartbeat=p.Heartbeat(cpu_percent=1.0, memory_total_mib=mem,
                                      memory_available_mib=mem, disk_total_mib=1, disk_free_mib=1,
                                      gpus=0, runtime_ok=True, running=[], capacity=capacity))
        t0 = time.perf_counter()
        await insert_queued(store, rng, range(QUEUED_JOBS))
        insert_s = time.perf_counter() - t0

        parts = {"queued_and_usage": 0.0, "queued": 0.0, "choose": 0.0, "assign_many": 0.0}
        calls: dict[str, list[float]] = {"choose": [], "assign_many": []}
        marks: list[float] = []
        groups: list[tuple[float, float]] = []
        considered: list[int] = []

        def timed_async(key: str, fn: Any) -> Any:
            async def wrapper(*args: Any, **kwargs: Any) -> Any:
                t = time.perf_counter()
                try:
                    result = await fn(*args, **kwargs)
                finally:
                    spent = time.perf_counter() - t
                    parts[key] += spent
                    if key in calls:
                        calls[key].append(spent)
                if key in ("queued", "queued_and_usage"):
                    considered.append(len(result if key == "queued" else result[0]))
                return result
            return wrapper

        original_start = fleet._start

        async def timed_start(chosen: list[Any]) -> int:
            t = time.perf_counter()
            try:
                return await original_start(chosen)
            finally:
                groups.append((t, time.perf_counter() - t))

        original_choose = placement.choose

        def timed_choose(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            marks.append(t)
            try:
                return original_choose(*args, **kwargs)
            finally:
                spent = time.perf_counter() - t
                parts["choose"] += spent
                calls["choose"].append(spent)

        monkeypatch.setattr(placement, "choose", timed_choose)
        monkeypatch.setattr(store, "queued", timed_async("queued", store.queued))
        monkeypatch.setattr(store, "queued_and_usage",
                            timed_async("queued_and_usage", store.queued_and_usage))
        monkeypatch.setattr(store, "assign_many", timed_async("assign_many", store.assign_many))
        monkeypatch.setattr(fleet, "_start", timed_start)

        rounds: list[RoundStats] = []
        for _ in range(QUEUED_JOBS // 500 + 5):  # bounded; normally one round places all
            marks.clear()
            considered.clear()
            groups.clear()
            for session in fleet.sessions.values():  # their heartbeats: never suspect
                session.last_seen = time.monotonic()
            t0 = time.perf_counter()
            placed = await fleet.place_queued()
            end = time.perf_counter()
            iterations = job_iterations(marks, end, groups)
            rounds.append(RoundStats(end - t0, sum(considered), placed, iterations))
            if placed == 0:
                break
        left = len(await store._run(store._by_state, (State.QUEUED,), None, 1_000_000))
        sent = sum(ws.sent for ws in sockets)

        # A full fleet (every agent's capacity in use) with 1000 jobs waiting: the round
        # every ending job's kick then runs, placing nothing.
        await insert_queued(store, rng, range(QUEUED_JOBS, QUEUED_JOBS + 1000))
        full = {name: (int(s.capacity()["cpu_millicores"]), int(s.capacity()["memory_mib"]), 0)
                for name, s in fleet.sessions.items()}

        async def full_usage(limit: int) -> tuple[list[JobRow], dict[str, tuple[int, int, int]]]:
            return await store.queued(limit), full

        monkeypatch.setattr(store, "queued_and_usage", full_usage)
        for session in fleet.sessions.values():
            session.last_seen = time.monotonic()
        t0 = time.perf_counter()
        placed_full = await fleet.place_queued()
        full_s = time.perf_counter() - t0
        return {"insert_s": insert_s, "rounds": rounds, "parts": parts, "calls": calls,
                "left": left, "sent": sent, "full_round_s": full_s,
                "full_round_placed": placed_full}
    finally:
        await store.close()


@pytest.mark.bench
@pytest.mark.timeout(300)
def test_placement_500_agents_5000_jobs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(7)
    reqs = make_requests(QUEUED_JOBS, rng)
    pure: dict[str, tuple[list[float], int]] = {}
    for label, strategy, selector in (("spread", "spread", {}), ("binpack", "binpack", {}),
                                      ("spread + selector zone=a", "spread", {"zone": "a"})):
        views = make_views(AGENTS, random.Random(11))
        pure[label] = time_choose(views, reqs, strategy, selector)  # type: ignore[arg-type]

    (tmp_path / "storeBase").mkdir()
    result = asyncio.run(place_rounds(tmp_path, monkeypatch), debug=False)
    rounds: list[RoundStats] = result["rounds"]
    first = rounds[0]
    all_iterations = [t for r in rounds for t in r.iterations]
    placed = sum(r.placed for r in rounds)
    total_s = sum(r.seconds for r in rounds)
    if placed != QUEUED_JOBS or result["left"]:
        raise JobFailed(f"placed {placed} of {QUEUED_JOBS}; {result['left']} still queued")

    report = Report(8, f"placement, {AGENTS} agents, {QUEUED_JOBS} queued jobs")
    for label, (times, n_placed) in pure.items():
        p99 = ms(percentile(times, 99))
        headline = label == "spread"
        report.add(f"choose() p99, {label} (ms)", p99,
                   target=f"< {PLACE_P99_TARGET_MS:g} ms" if headline else "",
                   ok=(p99 < PLACE_P99_TARGET_MS) if headline else None, fmt="{:.3f}")
        report.add(f"  p50 (ms); {n_placed} placed", ms(percentile(times, 50)), fmt="{:.3f}")
    it99 = ms(percentile(all_iterations, 99))
    report.add("place_queued(): one job's iteration p99 (ms)", it99,
               target=f"< {PLACE_P99_TARGET_MS:g} ms", ok=it99 < PLACE_P99_TARGET_MS,
               fmt="{:.3f}")
    report.add("  per job = round 1 / jobs considered (ms)",
               ms(first.seconds / max(first.considered, 1)), fmt="{:.3f}")
    report.add(f"  round 1: {first.considered} jobs considered, {first.placed} placed (s)",
               first.seconds, fmt="{:.2f}")
    report.add(f"  all {len(rounds)} rounds, {placed} jobs placed (s)", total_s, fmt="{:.2f}")
    for key, seconds in result["parts"].items():
        report.add(f"    of which {key} (ms per job)", ms(seconds / max(placed, 1)),
                   fmt="{:.3f}")
    for key, times in result["calls"].items():
        report.add(f"    {key}() inside the rounds: p99 per call (ms)",
                   ms(percentile(times, 99)), fmt="{:.3f}")
    report.add(f"full fleet: a round over 1000 queued jobs, {result['full_round_placed']} "
               "placed (ms)", ms(result["full_round_s"]), fmt="{:.0f}")
    report.note("rounds: " + ", ".join(f"{r.considered} considered / {r.placed} placed in "
                                        f"{r.seconds:.2f} s" for r in rounds))
    report.note(f"a round pages through the whole queue ({QUEUE_PAGE} jobs per store call) "
                f"and assigns the choices among every {ASSIGN_GROUP} jobs it considers in "
                f"one store call; {QUEUED_JOBS} jobs inserted in {result['insert_s']:.1f} s; "
                f"{result['sent']} run messages sent; choose() over {AGENTS} views varied: "
                f"capacity 4-128 cores, usage 0-60 %, 2 % each suspect/draining/unhealthy")
    report.note(load_note())
    report.extra = {"rounds": [{"seconds": r.seconds, "considered": r.considered,
                                "placed": r.placed} for r in rounds],
                    "parts_s": result["parts"]}
    publish(report)


# ================================================================ bench 9


@dataclass
class JobTiming:
    total: float
    post: float
    gets: int


@dataclass
class DispatchRun:
    concurrency: int
    jobs: int
    wall_s: float
    timings: list[JobTiming]
    controller_cpu_s: float
    agents_cpu_s: float
    client_cpu_s: float

    @property
    def rate(self) -> float:
        return self.jobs / self.wall_s


@contextlib.contextmanager
def dispatch_storebase(workdir: Path) -> Iterator[Path]:
    """Bench 9's storeBase: a private tmpfs unless ``PFLEET_BENCH_FLEET_STOREBASE=disk``.

    Each job makes three directories in storeBase.  On this VM's ext4, after a test
    suite's churn, one ``mkdir`` took 0.19-0.37 ms of CPU (the allocator skips
    recently freed inodes one by one): up to a third of the controller's CPU per
    job, varying with the disk's history, not with pfleet.  tmpfs takes that out
    of the dispatch figure; the report gives both costs."""
    path = workdir / "storeBase"
    path.mkdir(parents=True, exist_ok=True)
    if DISPATCH_STOREBASE == "disk":
        yield path
        return
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1g,mode=0755", "pfleet-bench9",
                    str(path)], check=True, timeout=30)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False, timeout=60)


def mkdir_cost(parent: Path, n: int = 300) -> float:
    """CPU seconds of one ``mkdir`` under ``parent`` (the directories are removed)."""
    where = Path(tempfile.mkdtemp(dir=parent))
    try:
        t0 = time.process_time()
        for i in range(n):
            os.mkdir(where / f"d{i}")
        return (time.process_time() - t0) / n
    finally:
        shutil.rmtree(where)


def job_form(jid: str, descriptors: dict[str, Any], data: bytes) -> aiohttp.FormData:
    form = aiohttp.FormData()
    for key, value in {**descriptors, "jid": jid}.items():
        for item in value if isinstance(value, list) else [value]:
            form.add_field(key, str(item))
    form.add_field("data_file", data, filename="data.zip", content_type="application/zip")
    return form


async def one_job(http: aiohttp.ClientSession, base: str, jid: str,
                  descriptors: dict[str, Any], data: bytes) -> JobTiming:
    t0 = time.perf_counter()
    async with http.post(base + "pluginjobs/", data=job_form(jid, descriptors, data)) as r:
        text = await r.text()
        if r.status != 201:
            raise JobFailed(f"POST {jid}: {r.status} {text[:300]}")
    posted = time.perf_counter()
    for gets in range(1, int(60.0 / STATUS_POLL) + 1):
        async with http.get(f"{base}pluginjobs/{jid}/") as r:
            body = await r.json()
            if r.status != 200:
                raise JobFailed(f"GET {jid}: {r.status} {body}")
        status = body["compute"]["status"]
        if status == "finishedSuccessfully":
            return JobTiming(time.perf_counter() - t0, posted - t0, gets)
        if status in ("finishedWithError", "undefined"):
            raise JobFailed(f"job {jid} ended {status}: {body['compute']}")
        await asyncio.sleep(STATUS_POLL)
    raise JobFailed(f"job {jid} not finished after 60 s")


async def run_jobs(base: str, token: str, prefix: str, n: int, concurrency: int) -> tuple[
        list[JobTiming], float]:
    descriptors = plugin_descriptors(["true"], "busybox:bench", cpu_limit=100, memory_limit=64)
    data = tiny_zip()
    timings: list[JobTiming] = []
    jids = iter(range(n))
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout,
                                     headers={"Authorization": f"Bearer {token}"}) as http:

        async def worker() -> None:
            for i in jids:  # one iterator shared by every worker
                timings.append(await one_job(http, base, f"{prefix}-{i}", descriptors, data))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return timings, time.perf_counter() - t0


def dispatch_runs(workdir: Path, names: list[str]) -> tuple[list[DispatchRun], dict[str, Any]]:
    """Bench 9's measured runs, one per concurrency, against one controller."""
    ctl = start_controller(workdir)
    sim: SimFleet | None = None
    runs: list[DispatchRun] = []
    try:
        tokens, _ = mint_tokens(ctl, names)
        sim = SimFleet(workdir, fleet_url(ctl.base), sim_agents(names, tokens, big=True),
                       answer_runs=True, tag="dispatch")
        sim.wait_ready(len(names))
        token = ctl.token()
        for concurrency in CONCURRENCIES:
            asyncio.run(run_jobs(ctl.base, token, f"warm{concurrency}", 2 * concurrency,
                                 concurrency), debug=False)
            spy = PySpy(ctl.pid, f"bench9-c{concurrency}", 15)
            cpu0, sim0, me0 = cpu_seconds(ctl.pid), cpu_seconds(sim.pid), time.process_time()
            timings, wall = asyncio.run(run_jobs(ctl.base, token, f"c{concurrency}",
                                                 DISPATCH_JOBS, concurrency), debug=False)
            runs.append(DispatchRun(concurrency, len(timings), wall, timings,
                                    cpu_seconds(ctl.pid) - cpu0, cpu_seconds(sim.pid) - sim0,
                                    time.process_time() - me0))
            spy.wait()
        done = sim.stop()
    finally:
        if sim is not None:
            sim.kill()
        ctl.stop()
    return runs, done


@pytest.mark.bench
@pytest.mark.timeout(600)
def test_dispatch_capacity(tmp_path: Path) -> None:
    raise_fd_limit()
    names = [f"sim-{i}" for i in range(DISPATCH_AGENTS)]
    with dispatch_storebase(tmp_path) as storebase:
        mkdir_s = {"storeBase": mkdir_cost(storebase), "disk": mkdir_cost(tmp_path)}
        runs, done = dispatch_runs(tmp_path, names)
    expected_runs = sum(2 * c + DISPATCH_JOBS for c in CONCURRENCIES)
    counts = done["counts"]
    if counts["runs"] != expected_runs or counts["acks"] != 2 * expected_runs:
        raise JobFailed(f"the agents saw {counts['runs']} runs and {counts['acks']} acks, "
                        f"expected {expected_runs} and {2 * expected_runs}")

    report = Report(9, f"dispatch capacity, POST + status GETs until finished, "
                       f"{DISPATCH_AGENTS} simulated agents")
    for r in runs:
        totals = [t.total for t in r.timings]
        posts = [t.post for t in r.timings]
        report.add(f"c={r.concurrency}: jobs per second", r.rate,
                   target=f">= {DISPATCH_TARGET:g}/s", ok=r.rate >= DISPATCH_TARGET,
                   fmt="{:.0f}")
        report.add(f"c={r.concurrency}:   job latency p50 (ms)", ms(percentile(totals, 50)))
        report.add(f"c={r.concurrency}:   job latency p99 (ms)", ms(percentile(totals, 99)))
        report.add(f"c={r.concurrency}:   POST latency p50 (ms)", ms(percentile(posts, 50)))
        report.add(f"c={r.concurrency}:   POST latency p99 (ms)", ms(percentile(posts, 99)))
        report.add(f"c={r.concurrency}:   status GETs per job",
                   sum(t.gets for t in r.timings) / r.jobs, fmt="{:.2f}")
        report.add(f"c={r.concurrency}:   controller CPU (% of one core)",
                   100.0 * r.controller_cpu_s / r.wall_s, fmt="{:.0f}")
        report.add(f"c={r.concurrency}:   controller CPU per job (ms)",
                   ms(r.controller_cpu_s / r.jobs), fmt="{:.2f}")
        report.add(f"c={r.concurrency}:   client process CPU (% of one core)",
                   100.0 * r.client_cpu_s / r.wall_s, fmt="{:.0f}")
        report.add(f"c={r.concurrency}:   agents process CPU (% of one core)",
                   100.0 * r.agents_cpu_s / r.wall_s, fmt="{:.0f}")
    report.add("mkdir on storeBase, 3 per job (ms of CPU)", ms(mkdir_s["storeBase"]),
               fmt="{:.3f}")
    report.add("  on this run's disk, for comparison (ms of CPU)", ms(mkdir_s["disk"]),
               fmt="{:.3f}")
    report.note(f"storeBase on {'a private tmpfs' if DISPATCH_STOREBASE != 'disk' else 'disk'}"
                " (PFLEET_BENCH_FLEET_STOREBASE=tmpfs|disk)")
    report.note(f"{DISPATCH_JOBS} jobs per run after a warm-up of 2 x concurrency; status "
                f"polled every {ms(STATUS_POLL):.0f} ms; clients, agents and the controller "
                f"share the machine's {os.cpu_count()} cores")
    report.note(load_note())
    report.extra = {f"c{r.concurrency}": {"jobs": r.jobs, "wall_s": r.wall_s, "rate": r.rate,
                                          "controller_cpu_s": r.controller_cpu_s,
                                          "agents_cpu_s": r.agents_cpu_s,
                                          "client_cpu_s": r.client_cpu_s} for r in runs}
    report.extra["storebase"] = DISPATCH_STOREBASE
    report.extra["mkdir_s"] = mkdir_s
    publish(report)


if __name__ == "__main__":  # the simulated agents' child process
    asyncio.run(sim_fleet_main(json.loads(Path(sys.argv[1]).read_text())))
