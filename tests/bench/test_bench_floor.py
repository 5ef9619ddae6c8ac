"""Bench 9f: the floor under bench 9 (dispatch capacity) on this machine.

What the parts of one bench-9 job cost when each is done alone, with nothing of
pfleet around it, so bench 9's controller CPU per job can be read against what
one process could ever reach here:

- **HTTP**: a bare aiohttp app in a child process (this module run as ``python -m
  tests.bench.test_bench_floor <port>``) whose POST reads (does not parse) the same
  multipart body as bench 9 and answers a small JSON, and whose GET answers a fixed
  status body, on the controller's event loop (uvloop); the same aiohttp client as
  bench 9, at concurrency 32.  Server CPU per request (``/proc/<pid>/stat``).
- **WebSocket**: the same child echoes each text frame of a run-sized message on
  8 connections (bench 9's 8 agents); server CPU per frame received and sent.  A
  bench-9 job moves 5 frames through the controller (run, running, exited, two
  acks): 2.5 round trips.
- **Staging**: ``zipmode.stage_zip_inputs`` of bench 9's one-file zip into a
  storeBase on this machine's disk (3 mkdir, a file, a rename, chmods), in this
  process, one thread.
- **Store**: the controller's ``Store`` (SQLite, its thread, group commit) taking
  job lifecycles (insert, assign, running, exited) from 32 concurrent callers.

The floor of one job = POST + g GETs + 2.5 WebSocket round trips + staging + store;
``1000 / floor`` is the most jobs per second one process at 100 % of a core could
carry if pfleet added nothing to these parts.  Printed for g = 1 (one status GET)
and g = 5 (about what bench 9's 10 ms polling makes at concurrency 32).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from controller.main import new_event_loop
from controller.states import State
from controller.storage import zipmode
from controller.store import JobRow, Store
from tests.bench.helpers import (
    JobFailed,
    Report,
    cpu_seconds,
    plugin_descriptors,
    publish,
    tiny_zip,
)
from tests.bench.test_bench_fleet import job_form
from tests.conftest import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
CONCURRENCY = 32
POSTS = 3000
GETS = 6000
WS_LINKS = 8
WS_FRAMES = 6000
JOBS = 2000
GETS_PER_JOB = (1, 5)

STATUS_BODY = json.dumps({"compute": {
    "jid": "floor-1", "image": "busybox:bench", "cmd": "true", "status": "finishedSuccessfully",
    "message": "exited", "timestamp": "2026-12-07T00:00:00.000000+00:00", "logs": ""}},
    indent=4).encode()
CREATED_BODY = json.dumps({"data": {"jid": "floor-1", "nfiles": 1, "timestamp": "",
                                    "path": "/storeBase/key-floor-1/incoming"},
                           "compute": json.loads(STATUS_BODY)["compute"]}, indent=4).encode()


# ------------------------------------------------------------------ the bare server


async def post_job(request: web.Request) -> web.Response:
    # The body is read, not parsed: aiohttp's own form parser (request.post()) costs
    # several times pfleet's whole POST (it spools file parts to temporary files).
    body = await request.read()
    if b'name="data_file"' not in body:
        raise web.HTTPBadRequest(text="no data_file part")
    return web.Response(body=CREATED_BODY, status=201, content_type="application/json")


async def get_status(request: web.Request) -> web.Response:
    return web.Response(body=STATUS_BODY, content_type="application/json")


async def echo(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for msg in ws:
        if msg.type == aiohttp.WSMsgType.TEXT:
            await ws.send_str(msg.data)
    return ws


def serve(port: int) -> None:
    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/api/v1/pluginjobs/", post_job)
    app.router.add_get("/api/v1/pluginjobs/{jid}/", get_status)
    app.router.add_get("/ws", echo)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None,
                loop=new_event_loop())  # the controller's loop (uvloop)


# ------------------------------------------------------------------ measurements


async def wait_listening(base: str) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(100):
            try:
                async with http.get(base + "api/v1/pluginjobs/x/") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.1)
    raise JobFailed("the bare aiohttp server did not answer within 10 s")


async def http_phase(base: str, pid: int, n: int, post: bool) -> float:
    """Server CPU seconds per request for ``n`` POSTs (or GETs) at CONCURRENCY."""
    descriptors = plugin_descriptors(["true"], "busybox:bench", cpu_limit=100, memory_limit=64)
    data = tiny_zip()
    left = iter(range(n))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONCURRENCY)) as http:

        async def worker() -> None:
            for i in left:
                if post:
                    ctx = http.post(base + "api/v1/pluginjobs/",
                                    data=job_form(f"floor-{i}", descriptors, data))
                else:
                    ctx = http.get(f"{base}api/v1/pluginjobs/floor-{i}/")
                async with ctx as r:
                    await r.read()
                    if r.status not in (200, 201):
                        raise JobFailed(f"bare server answered {r.status}")

        cpu0 = cpu_seconds(pid)
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        return (cpu_seconds(pid) - cpu0) / n


async def ws_phase(base: str, pid: int) -> float:
    """Server CPU seconds per echoed frame (one received, one sent)."""
    frame = json.dumps({"type": "run", "spec": {
        "job": uuid.uuid4().hex, "attempt": 1, "name": "floor-1", "jid": "floor-1",
        "kind": "plugin", "image": "busybox:bench", "command": ["true"], "env": [],
        "cpu_limit": 100, "memory_limit": 64, "gpu_limit": 0, "number_of_workers": 1,
        "mounts": [{"source": "key-floor-1/incoming", "target": "/share/incoming",
                    "read_only": True}], "op": None, "logs_tail": 16384}},
        separators=(",", ":"))
    per_link = WS_FRAMES // WS_LINKS
    async with aiohttp.ClientSession() as http:
        links = [await http.ws_connect(base.replace("http", "ws", 1) + "ws")
                 for _ in range(WS_LINKS)]

        async def talk(ws: aiohttp.ClientWebSocketResponse) -> None:
            for _ in range(per_link):
                await ws.send_str(frame)
                if (await ws.receive()).type != aiohttp.WSMsgType.TEXT:
                    raise JobFailed("the echo link closed")

        cpu0 = cpu_seconds(pid)
        await asyncio.gather(*(talk(ws) for ws in links))
        spent = cpu_seconds(pid) - cpu0
        for ws in links:
            await ws.close()
    return spent / (per_link * WS_LINKS)


def staging_cost(workdir: Path) -> float:
    """CPU seconds per job to stage bench 9's zip into key-<jid>/incoming."""
    storebase, spool = workdir / "storeBase", workdir / "spool"
    zipmode.prepare_upload_dirs(storebase, spool)
    data = tiny_zip()
    t0 = time.process_time()
    for i in range(JOBS):
        upload = zipmode.ZipUpload(storebase, spool, max_files=1000, max_bytes=1 << 30)
        upload.hold([data])
        zipmode.stage_zip_inputs(storebase, f"floor-{i}", upload)
    return (time.process_time() - t0) / JOBS


async def store_cost(workdir: Path) -> float:
    """CPU seconds per job lifecycle through the real Store, 32 callers at once."""
    store = Store(workdir / "state" / "floor.sqlite3")
    await store.open()
    spec = {"image": "busybox:bench", "command": ["true"], "env": [], "cpu_limit": 100,
            "memory_limit": 64, "gpu_limit": 0, "number_of_workers": 1,
            "mounts": [m.__dict__ for m in zipmode.plugin_mounts("floor")]}
    left = iter(range(JOBS))

    async def caller() -> None:
        for i in left:
            job = await store.insert_job(JobRow(
                id=uuid.uuid4().hex, seq=0, name=f"pl-floor-{i}", jid=f"floor-{i}",
                kind="plugin", state=State.QUEUED, attempt=1, agent=None, spec=spec,
                image="busybox:bench", cmd="true", message="queued"))
            if not await store.assign(job.id, 1, "sim-0"):
                raise JobFailed("assign refused")
            await store.apply_event(job.id, 1, State.RUNNING, agent="sim-0",
                                    message="running")
            if await store.apply_event(job.id, 1, State.COMPLETE, agent="sim-0",
                                       message="exited", exit_code=0) is None:
                raise JobFailed("exited event refused")

    try:
        t0 = time.process_time()
        await asyncio.gather(*(caller() for _ in range(CONCURRENCY)))
        return (time.process_time() - t0) / JOBS
    finally:
        await store.close()


@pytest.mark.bench
@pytest.mark.timeout(600)
def test_dispatch_floor(tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}/"
    with (tmp_path / "bare-server.log").open("ab") as log:
        server = subprocess.Popen([sys.executable, "-m", "tests.bench.test_bench_floor",
                                   str(port)], cwd=REPO_ROOT, stdout=log, stderr=log)
    try:
        asyncio.run(wait_listening(base))
        post = asyncio.run(http_phase(base, server.pid, POSTS, post=True))
        get = asyncio.run(http_phase(base, server.pid, GETS, post=False))
        ws = asyncio.run(ws_phase(base, server.pid))
    finally:
        server.terminate()  # by PID: the server this test started
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
    with tempfile.TemporaryDirectory(dir=tmp_path) as scratch:
        staging = staging_cost(Path(scratch))
    store = asyncio.run(store_cost(tmp_path))

    report = Report(9, "floor: one bench-9 job's parts, each alone (bare aiohttp, "
                       "stage_zip_inputs, Store)")
    report.add("POST multipart, bare aiohttp (ms CPU)", post * 1e3, fmt="{:.3f}")
    report.add("GET status, bare aiohttp (ms CPU)", get * 1e3, fmt="{:.3f}")
    report.add("WebSocket frame in + out (ms CPU)", ws * 1e3, fmt="{:.3f}")
    report.add("staging the zip in storeBase (ms CPU)", staging * 1e3, fmt="{:.3f}")
    report.add("store: insert, assign, 2 events (ms CPU)", store * 1e3, fmt="{:.3f}")
    for gets in GETS_PER_JOB:
        floor = post + gets * get + 2.5 * ws + staging + store
        report.add(f"floor per job with {gets} GET(s) (ms CPU)", floor * 1e3, fmt="{:.2f}")
        report.add("  jobs/s on one core at that floor", 1.0 / floor, fmt="{:.0f}")
    report.note("compare bench 9's 'controller CPU per job' and its 'status GETs per job'")
    report.extra = {"post_s": post, "get_s": get, "ws_frame_s": ws, "staging_s": staging,
                    "store_s": store}
    publish(report)


if __name__ == "__main__":  # the bare server's child process
    serve(int(sys.argv[1]))
