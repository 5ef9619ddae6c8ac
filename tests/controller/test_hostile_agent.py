"""A compromised agent host, holding its own valid token, against the controller.

A real controller app on loopback; the hostile agent is a raw WebSocket speaking
(or abusing) ``agent.protocol``; a well-behaved fake agent shows the controller
stays healthy for everyone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType
from aiohttp.test_utils import TestServer

from agent import protocol as p
from controller import fleet as fleet_module
from controller.app import create_app
from controller.auth import issue_agent_token, issue_client_token
from controller.config import Config
from controller.fleet import FLEET, Fleet
from controller.states import State
from controller.store import STORE, JobRow, Store
from tests.conftest import make_config, start_fake_agent, stop_task

HUGE = {"cpu_millicores": 10**9, "memory_mib": 10**9, "gpus": 0}
NONE = {"cpu_millicores": 0, "memory_mib": 0, "gpus": 0}


@dataclass
class Controller:
    config: Config
    server: TestServer
    tmp_path: Path

    @property
    def fleet(self) -> Fleet:
        return self.server.app[FLEET]

    @property
    def store(self) -> Store:
        return self.server.app[STORE]

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.server.port}/api/v1/fleet/connect"


@contextlib.asynccontextmanager
async def serving(config: Config, tmp_path: Path) -> AsyncIterator[Controller]:
    """A controller app with ``config`` on a loopback port, closed at the end."""
    server = TestServer(create_app(config), host="127.0.0.1")
    await server.start_server()
    try:
        yield Controller(config, server, tmp_path)
    finally:
        await server.close()


@pytest.fixture
async def ctl(tmp_path: Path) -> AsyncIterator[Controller]:
    async with serving(make_config(tmp_path), tmp_path) as controller:
        yield controller


def hello(name: str, capacity: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    body = p.encode_dict(p.Hello(version=p.PROTOCOL_VERSION, agent=name, runtime="fake",
                                 capabilities={"multi_worker": True}, labels={},
                                 capacity=capacity))
    body.update(overrides)
    return body


def heartbeat(**overrides: Any) -> dict[str, Any]:
    body = p.encode_dict(p.Heartbeat(cpu_percent=1.0, memory_total_mib=1, memory_available_mib=1,
                                     disk_total_mib=1, disk_free_mib=1, gpus=0, runtime_ok=True,
                                     running=[]))
    body.update(overrides)
    return body


async def token_for(ctl: Controller, name: str) -> str:
    token, jti = issue_agent_token(ctl.config, name)
    await ctl.store.add_token(jti, name)
    return token


async def dial(ctl: Controller, http: aiohttp.ClientSession, name: str,
               capacity: dict[str, Any], **hello_overrides: Any
               ) -> aiohttp.ClientWebSocketResponse:
    """A hostile agent's link, past hello and welcome."""
    ws = await http.ws_connect(ctl.url, headers={
        "Authorization": f"Bearer {await token_for(ctl, name)}"})
    await ws.send_str(json.dumps(hello(name, capacity, **hello_overrides)))
    welcome = p.decode((await ws.receive(timeout=10)).data)
    assert isinstance(welcome, p.Welcome)
    return ws


async def expect(ws: aiohttp.ClientWebSocketResponse, kind: type[p.Message]) -> Any:
    """The next message of ``kind`` (others, e.g. run messages, are skipped)."""
    for _ in range(100):
        msg = await ws.receive(timeout=10)
        assert msg.type is WSMsgType.TEXT, msg
        message = p.decode(msg.data)
        if isinstance(message, kind):
            return message
    raise AssertionError(f"no {kind.type} message")


async def add_job(store: Store, *, cpu: int = 100, env: list[str] | None = None) -> JobRow:
    jid = f"hostile-{uuid.uuid4().hex[:8]}"
    spec = {"image": "busybox", "command": ["true"], "env": env or [], "cpu_limit": cpu,
            "memory_limit": 64, "gpu_limit": 0, "number_of_workers": 1, "mounts": []}
    return await store.insert_job(JobRow(
        id=uuid.uuid4().hex, seq=0, name=jid, jid=jid, kind="plugin", state=State.QUEUED,
        attempt=1, agent=None, spec=spec, image="busybox", cmd="true", message="queued"))


async def wait_state(store: Store, job_id: str, state: State) -> JobRow:
    for _ in range(250):
        job = await store.get(job_id)
        assert job is not None
        if job.state is state:
            return job
        await asyncio.sleep(0.02)
    raise AssertionError(f"job {job_id} stayed {job.state}, expected {state}")


async def until(check: Callable[[], bool], failure: str, tries: int = 250) -> None:
    """Wait (bounded: ``tries`` x 20 ms) until ``check()`` holds."""
    for _ in range(tries):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(failure)


async def queue_runs_it_will_not_read(ctl: Controller) -> None:
    """Run messages of ~8 MiB in all for an agent that never reads them."""
    for _ in range(32):
        await add_job(ctl.store, env=["PAD=" + "x" * (256 << 10)])
    ctl.fleet.kick()


async def assert_a_good_agent_gets_work(ctl: Controller) -> None:
    """The dispatcher still places jobs: a well-behaved agent runs the next one."""
    _agent, _runtime, good = await start_fake_agent(ctl.config, ctl.server, ctl.tmp_path)
    try:
        job = await add_job(ctl.store)
        ctl.fleet.kick()
        assert (await wait_state(ctl.store, job.id, State.COMPLETE)).agent == "fake1"
    finally:
        await stop_task(good)


async def test_events_for_jobs_it_does_not_run_change_nothing(
        ctl: Controller, http: aiohttp.ClientSession) -> None:
    _agent, _runtime, good = await start_fake_agent(ctl.config, ctl.server, ctl.tmp_path)
    try:
        elsewhere = await add_job(ctl.store, cpu=100, env=["PFLEET_FAKE_RUN_FOR=60"])
        ctl.fleet.kick()
        await wait_state(ctl.store, elsewhere.id, State.RUNNING)
        never_placed = await add_job(ctl.store, cpu=10**12)  # fits no agent: stays QUEUED
        ws = await dial(ctl, http, "mallory", NONE)
        events = [(elsewhere, "exited", 1), (elsewhere, "lost", 1), (elsewhere, "failed", 1),
                  (never_placed, "running", 1), (never_placed, "exited", 1)]
        for seq, (job, state, attempt) in enumerate(events, start=1):
            await ws.send_str(json.dumps({"type": "event", "seq": seq, "job": job.id,
                                          "attempt": attempt, "state": state,
                                          "exit_code": 0, "logs": "forged"}))
            assert (await expect(ws, p.Ack)).seq == seq  # refused, yet acked: no resends
        after = await ctl.store.get(elsewhere.id)
        assert after is not None
        assert (after.state, after.agent, after.logs) == (State.RUNNING, "fake1", "")
        still = await ctl.store.get(never_placed.id)
        assert still is not None
        assert (still.state, still.agent, still.logs) == (State.QUEUED, None, "")
        await ws.close()
    finally:
        await stop_task(good)


async def test_link_dropped_right_after_hello_leaves_no_session(
        ctl: Controller, http: aiohttp.ClientSession) -> None:
    for attempt in range(5):
        ws = await http.ws_connect(ctl.url, headers={
            "Authorization": f"Bearer {await token_for(ctl, 'mallory')}"})
        await ws.send_str(json.dumps(hello("mallory", HUGE)))
        ws._writer.transport.abort()  # gone before the welcome can be sent
        await until(lambda: "mallory" not in ctl.fleet.sessions
                    and "mallory" in ctl.fleet.disconnected_since,
                    f"a dead link stayed a session (try {attempt})")
    # Jobs are not placed on the dead link: the next agent gets them.
    await assert_a_good_agent_gets_work(ctl)


BAD_FRAMES: list[str | bytes] = [
    b"\x00\x01binary",
    "not json",
    "[" * 100_000 + "]" * 100_000,  # RecursionError inside json.loads
    json.dumps(heartbeat(problems=json.loads("[" * 600 + "]" * 600))),  # breaks asdict
    "[" + "{}," * 600_000 + "{}]",  # ~1.8 MB frame of 600,000 values
    json.dumps(["x"] * 300_000),
    '{"type": "heartbeat", "cpu_percent": NaN}',
    json.dumps(heartbeat(cpu_percent=12345.5)).replace("12345.5", "1e999"),  # inf
    json.dumps(heartbeat(capacity={"cpu_millicores": "lots"})),  # placement reads ints
    json.dumps(heartbeat(capacity={"memory_mib": [1]})),
    json.dumps({"type": "event", "seq": 10**30, "job": "x", "attempt": 1, "state": "running"}),
    json.dumps({"type": "event", "seq": 1, "job": "x", "attempt": -10**20, "state": "lost"}),
    json.dumps({"type": "event", "seq": "1", "job": 5, "attempt": None, "state": 1}),
    json.dumps({"type": "event", "seq": 1}),
    json.dumps({"type": "inventory", "jobs": [{"job": {"x": 1}}, 5]}),
    json.dumps({"type": "inventory", "jobs": "all"}),
    json.dumps({"type": "hello", "version": "1"}),
    json.dumps({"type": "run", "spec": []}),
    json.dumps({"type": "welcome", "version": 1, "heartbeat_interval": 1.0}),
    json.dumps({"type": "bogus"}),
    json.dumps([1, 2, 3]),
    json.dumps({"type": "logs_reply", "request": "never-asked", "logs": "x"}),
    json.dumps({"type": "remove_reply", "request": 7}),
]


async def test_bad_messages_are_dropped_and_the_link_stays_up(
        ctl: Controller, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture) -> None:
    ws = await dial(ctl, http, "mallory", NONE)
    for frame in BAD_FRAMES:
        if isinstance(frame, bytes):
            await ws.send_bytes(frame)
        else:
            await ws.send_str(frame)
    # Still served in order: the bad frames were refused one by one, not the link.
    await ws.send_str(json.dumps({"type": "event", "seq": 42, "job": "none", "attempt": 1,
                                  "state": "running"}))
    assert (await expect(ws, p.Ack)).seq == 42
    bad = [r for r in caplog.records if r.getMessage().startswith("bad message agent=mallory")]
    assert len(bad) == len(BAD_FRAMES) - 2  # all but a welcome and a reply to no request
    assert any(r.getMessage() == "unexpected message agent=mallory type=welcome"
               for r in caplog.records)
    assert not [r for r in caplog.records if r.exc_info]  # no stack traces
    assert ctl.fleet.sessions["mallory"].heartbeat is None  # no bad heartbeat was kept
    await assert_a_good_agent_gets_work(ctl)  # placement still works for everyone
    await ws.close()


@pytest.mark.parametrize("overrides", [
    {"capacity": {"cpu_millicores": "lots", "memory_mib": 1, "gpus": 0}},
    {"capacity": {"cpu_millicores": 1e999}},
    {"labels": {"site": ["a"]}},
    {"agent": "fake1"},  # another agent's name
    {"capabilities": {"x": json.loads("[" * 40 + "]" * 40)}},
])
async def test_a_bad_hello_is_refused(ctl: Controller, http: aiohttp.ClientSession,
                                      overrides: dict[str, Any]) -> None:
    ws = await http.ws_connect(ctl.url, headers={
        "Authorization": f"Bearer {await token_for(ctl, 'mallory')}"})
    await ws.send_str(json.dumps({**hello("mallory", HUGE), **overrides}))
    msg = await ws.receive(timeout=10)
    await ws.close()
    assert msg.type is WSMsgType.CLOSE
    assert ws.close_code == aiohttp.WSCloseCode.POLICY_VIOLATION
    assert "mallory" not in ctl.fleet.sessions and "fake1" not in ctl.fleet.sessions
    assert await ctl.store.agents() == []


async def test_a_reply_of_the_wrong_kind_does_not_answer_a_request(
        ctl: Controller, http: aiohttp.ClientSession) -> None:
    ws = await dial(ctl, http, "mallory", HUGE)
    job = await add_job(ctl.store)
    ctl.fleet.kick()
    run = await expect(ws, p.Run)
    await ws.send_str(p.encode(p.Event(seq=1, job=run.spec.job, attempt=1, state="running")))
    await expect(ws, p.Ack)
    running = await wait_state(ctl.store, job.id, State.RUNNING)
    fetch = asyncio.create_task(ctl.fleet.fetch_logs(running))
    request = await expect(ws, p.LogsRequest)
    await ws.send_str(p.encode(p.RemoveReply(request=request.request)))
    await ws.send_str(p.encode(p.LogsReply(request=request.request, logs="the real logs")))
    assert await fetch == "the real logs"
    await ws.close()


def small_window(addr_info: Any) -> socket.socket:
    """A client socket with a tiny receive window: once its reader stops, the
    controller's socket buffers fill up quickly."""
    family, kind, proto, _name, _addr = addr_info
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return sock


async def test_an_agent_that_stops_reading_is_cut_off(
        ctl: Controller, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fleet_module, "SEND_TIMEOUT", 1.0)
    connector = aiohttp.TCPConnector(socket_factory=small_window)
    async with aiohttp.ClientSession(connector=connector) as http:
        ws = await dial(ctl, http, "mallory", HUGE)
        await queue_runs_it_will_not_read(ctl)
        await until(lambda: "mallory" not in ctl.fleet.sessions,
                    "a link nobody reads held the dispatcher", tries=500)
        await assert_a_good_agent_gets_work(ctl)
        ws._writer.transport.abort()


async def test_revoking_an_agent_that_does_not_read_cuts_its_link(
        ctl: Controller, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fleet_module, "SEND_TIMEOUT", 120.0)  # only the close may cut it
    monkeypatch.setattr(fleet_module, "CLOSE_TIMEOUT", 1.0)
    connector = aiohttp.TCPConnector(socket_factory=small_window)
    async with aiohttp.ClientSession(connector=connector) as http:
        ws = await dial(ctl, http, "mallory", HUGE)
        await queue_runs_it_will_not_read(ctl)
        session = ctl.fleet.sessions["mallory"]
        # a send waits for room: the dispatcher is held
        await until(session.send_lock.locked, "the controller's buffers never filled up",
                    tries=500)
        async with http.delete(
                f"http://127.0.0.1:{ctl.server.port}/api/v1/agents/mallory/tokens/",
                headers={"Authorization": f"Bearer {issue_client_token(ctl.config)}"},
                timeout=aiohttp.ClientTimeout(total=30)) as resp:
            assert resp.status == 200, await resp.text()
        await until(lambda: "mallory" not in ctl.fleet.sessions,
                    "the revoked agent kept its session")
        await assert_a_good_agent_gets_work(ctl)
        ws._writer.transport.abort()


def test_decode_limits_refuse_abuse_and_keep_real_messages() -> None:
    # Logs count as one value, whatever they hold (brackets, commas, quotes, backslashes).
    logs = 'a, b [c] {d} "e" \\" \\\\\n' * 100_000  # 400,000 separators in all
    assert p.decode(p.encode(p.LogsReply(request="r", logs=logs))) == p.LogsReply("r", logs)
    for many in ("[" + "{}," * 130_000 + "{}]", json.dumps(["a"] * 130_000),
                 json.dumps({"type": "logs_reply", "request": "r", "logs": "x" * 300_000,
                             "extra": [0] * 250_001})):
        with pytest.raises(p.ProtocolError, match="JSON values"):
            p.decode(many)
    inventory = p.Inventory(jobs=[p.JobRef(f"j{i}", 1, f"n{i}", "running")
                                  for i in range(20_000)])
    assert p.decode(p.encode(inventory)) == inventory
    ok = json.loads("[" * 30 + "]" * 30)
    assert p.decode(json.dumps({**hello("h", HUGE), "capabilities": {"x": ok}}))
    for text in ("[" * 100_000, json.dumps({**hello("h", HUGE), "capabilities": {"x": [ok]}}),
                 json.dumps(heartbeat(problems=[1e999])), '{"type": "ack", "seq": Infinity}',
                 json.dumps({"type": "ack", "seq": 1 << 63}), b"[" + b"0," * 600_000 + b"0]"):
        with pytest.raises(p.ProtocolError):
            p.decode(text)
    assert p.decode(json.dumps({"type": "ack", "seq": (1 << 63) - 1})) == p.Ack((1 << 63) - 1)
