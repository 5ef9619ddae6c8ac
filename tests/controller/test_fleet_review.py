"""Fleet failure handling, placement and the admin API under the races an operator meets:
an agent coming back from suspect or unhealthy, a token revoked during the handshake, a
lease running out as its agent reconnects, runs in flight when the inventory is read,
a long queue, an undrain while ``pfleet agents drain --deadline`` waits.

A real controller on loopback; agents are raw protocol-level links (``dial``), so each
race is staged in a fixed order instead of hoped for.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType

from agent import protocol as p
from controller import cli
from controller import fleet as fleet_module
from controller.auth import issue_agent_token, issue_client_token
from controller.config import load_config
from controller.errors import ConfigError
from controller.fleet import QUEUE_PAGE
from controller.jobs import JOBS
from controller.states import State
from controller.store import JobRow, Store
from tests.conftest import make_config
from tests.controller.test_hostile_agent import (
    HUGE,
    Controller,
    dial,
    expect,
    heartbeat,
    hello,
    serving,
    token_for,
    until,
    wait_state,
)

LEASE = 1.0


@pytest.fixture
async def ctl(tmp_path: Path) -> AsyncIterator[Controller]:
    config = make_config(tmp_path, agent_lease=LEASE)  # suspect after 1.5 s of silence
    async with serving(config, tmp_path) as controller:
        yield controller


def admin_headers(ctl: Controller) -> dict[str, str]:
    return {"Authorization": f"Bearer {issue_client_token(ctl.config)}"}


async def add_job(store: Store, *, cpu: int = 100, gpus: int = 0) -> JobRow:
    jid = f"review-{uuid.uuid4().hex[:8]}"
    spec = {"image": "busybox", "command": ["true"], "env": [], "cpu_limit": cpu,
            "memory_limit": 64, "gpu_limit": gpus, "number_of_workers": 1, "mounts": []}
    return await store.insert_job(JobRow(
        id=uuid.uuid4().hex, seq=0, name=jid, jid=jid, kind="plugin", state=State.QUEUED,
        attempt=1, agent=None, spec=spec, image="busybox", cmd="true", message="queued"))


async def messages_until_ack(ws: aiohttp.ClientWebSocketResponse, seq: int) -> list[p.Message]:
    """Everything the controller sends up to the ack of event ``seq``."""
    seen: list[p.Message] = []
    for _ in range(100):
        msg = await ws.receive(timeout=10)
        assert msg.type is WSMsgType.TEXT, msg
        message = p.decode(msg.data)
        seen.append(message)
        if isinstance(message, p.Ack) and message.seq == seq:
            return seen
    raise AssertionError(f"no ack of event {seq}")


async def run_on(ctl: Controller, ws: aiohttp.ClientWebSocketResponse, count: int
                 ) -> list[JobRow]:
    """``count`` jobs placed on the agent of ``ws`` and reported running by it."""
    jobs = [await add_job(ctl.store) for _ in range(count)]
    ctl.fleet.kick()
    runs = [await expect(ws, p.Run) for _ in range(count)]
    for seq, run in enumerate(runs, start=1):
        await ws.send_str(p.encode(p.Event(seq=seq, job=run.spec.job, attempt=1,
                                           state="running")))
        await expect(ws, p.Ack)
    return [await wait_state(ctl.store, job.id, State.RUNNING) for job in jobs]


@pytest.mark.parametrize("why", ["suspect", "unhealthy"])
async def test_an_agent_placeable_again_gets_the_job_that_waited_for_it(
        ctl: Controller, http: aiohttp.ClientSession, why: str) -> None:
    ws = await dial(ctl, http, "mallory", HUGE)
    session = ctl.fleet.sessions["mallory"]
    if why == "suspect":  # three heartbeats missed
        await until(lambda: ctl.fleet.views({})["mallory"].suspect, "never went suspect")
    else:
        await ws.send_str(json.dumps(heartbeat(runtime_ok=False, problems=["engine down"])))
        await until(lambda: session.heartbeat is not None, "heartbeat not read")
    job = await add_job(ctl.store)
    assert await ctl.fleet.place_queued() == 0  # waits, as it should
    # The agent is well again; no job ends and no client submits: only it can say so.
    await ws.send_str(json.dumps(heartbeat()))
    run = await expect(ws, p.Run)
    assert run.spec.job == job.id
    await ws.close()


async def test_a_token_revoked_during_the_handshake_does_not_connect(
        ctl: Controller, http: aiohttp.ClientSession) -> None:
    ws = await http.ws_connect(ctl.url, headers={
        "Authorization": f"Bearer {await token_for(ctl, 'mallory')}"})
    # Past the token check, not yet registered: no session the revocation could close.
    async with http.delete(f"http://127.0.0.1:{ctl.server.port}/api/v1/agents/mallory/tokens/",
                           headers=admin_headers(ctl)) as resp:
        assert resp.status == 200, await resp.text()
    await ws.send_str(json.dumps(hello("mallory", HUGE)))
    msg = await ws.receive(timeout=10)
    assert msg.type is WSMsgType.CLOSE, msg
    assert ws.close_code == 4001  # what the agent's link treats as final
    await ws.close()
    await until(lambda: "mallory" not in ctl.fleet.sessions, "the refused link stayed")
    assert await add_job(ctl.store) and await ctl.fleet.place_queued() == 0


async def test_binpack_and_the_selector_from_the_environment_place_jobs(
        tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """PFLEET_PLACEMENT=binpack fills one agent first; PFLEET_AGENT_SELECTOR=zone=a
    leaves agents without that label alone, however idle."""
    env = load_config({"PFLEET_PLACEMENT": "binpack", "PFLEET_AGENT_SELECTOR": "zone=a"},
                      dev=True)
    config = make_config(tmp_path, placement=env.placement, agent_selector=env.agent_selector)
    async with serving(config, tmp_path) as ctl:
        links = [await dial(ctl, http, name, HUGE, labels={"zone": zone})
                 for name, zone in (("a1", "a"), ("a2", "a"), ("b1", "b"))]
        jobs = [await add_job(ctl.store, cpu=1000) for _ in range(3)]
        ctl.fleet.kick()
        placed = [await wait_state(ctl.store, job.id, State.ASSIGNED) for job in jobs]
        assert [job.agent for job in placed] == ["a2", "a2", "a2"]  # ties go to the last name
        for ws in links:
            await ws.close()


@pytest.mark.parametrize(("name", "value"), [("PFLEET_PLACEMENT", "random"),
                                             ("PFLEET_AGENT_SELECTOR", "zone")])
def test_a_bad_placement_setting_stops_the_start(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config({name: value}, dev=True)
    assert len(err.value.problems) == 1 and err.value.problems[0].startswith(name)


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer ", "Basic bWFsbG9yeTp4"])
async def test_a_connect_without_an_agent_token_is_refused(
        ctl: Controller, http: aiohttp.ClientSession, header: str | None) -> None:
    headers = {} if header is None else {"Authorization": header}
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await http.ws_connect(ctl.url, headers=headers)
    assert refused.value.status == 401
    async with http.get(ctl.url, headers=headers) as resp:  # what it is told, and why
        assert resp.status == 401 and "missing agent token" in await resp.text()
    assert ctl.fleet.sessions == {} and await ctl.store.agents() == []


@pytest.mark.parametrize("leaves_again", [False, True])
async def test_a_lease_running_out_as_its_agent_reconnects(
        ctl: Controller, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch,
        leaves_again: bool) -> None:
    for task in list(ctl.fleet._tasks):  # the lease is checked by this test alone
        if task.get_name() == "pfleet-watchdog":
            task.cancel()
    ws = await dial(ctl, http, "mallory", HUGE)
    jobs = await run_on(ctl, ws, 2)
    await ws.close()
    await until(lambda: "mallory" in ctl.fleet.disconnected_since, "disconnect not seen")
    await asyncio.sleep(LEASE + 0.1)

    # The lease check has read the agent's jobs; the agent reconnects before it marks them.
    entered, resume = asyncio.Event(), asyncio.Event()
    jobs_on_agent = ctl.store.jobs_on_agent

    async def held(agent: str, states: Any) -> list[JobRow]:
        rows = await jobs_on_agent(agent, states)
        entered.set()
        await resume.wait()
        return rows

    monkeypatch.setattr(ctl.store, "jobs_on_agent", held)
    check = asyncio.create_task(ctl.fleet.expire_leases())
    await asyncio.wait_for(entered.wait(), 10)
    ws = await dial(ctl, http, "mallory", HUGE)
    if leaves_again:
        await ws.close()
        await until(lambda: "mallory" in ctl.fleet.disconnected_since, "disconnect not seen")
    resume.set()
    assert await asyncio.wait_for(check, 10) == 0
    monkeypatch.undo()
    for job in jobs:  # it came back within reach: its jobs stand
        assert (await wait_state(ctl.store, job.id, State.RUNNING)).agent == "mallory"
    if not leaves_again:
        await ws.close()
        return
    # Gone again: the new absence has its own lease, which runs out in turn.
    assert "mallory" in ctl.fleet.disconnected_since
    await asyncio.sleep(LEASE + 0.1)
    assert await ctl.fleet.expire_leases() == 2
    for job in jobs:
        lost = await wait_state(ctl.store, job.id, State.LOST)
        assert lost.message.startswith("agent mallory lost: no contact for")


async def test_runs_in_flight_when_the_agent_lists_its_jobs_are_sent_once(
        ctl: Controller, http: aiohttp.ClientSession) -> None:
    job = await add_job(ctl.store)
    ws = await dial(ctl, http, "mallory", HUGE)
    assert (await expect(ws, p.Run)).spec.job == job.id  # placed at once, on connect
    # The agent listed its workloads before that run reached it (the link delivers it
    # next, in order): a second run could start the job again once the first ended.
    await ws.send_str(p.encode(p.Inventory(jobs=[])))
    await ws.send_str(p.encode(p.Event(seq=1, job=job.id, attempt=1, state="running")))
    sent = await messages_until_ack(ws, 1)
    assert not [m for m in sent if isinstance(m, p.Run)], sent
    await wait_state(ctl.store, job.id, State.RUNNING)
    await ws.close()


async def test_a_run_lost_with_its_link_is_sent_again_after_the_inventory(
        ctl: Controller, http: aiohttp.ClientSession) -> None:
    job = await add_job(ctl.store)
    ws = await dial(ctl, http, "mallory", HUGE)
    await expect(ws, p.Run)
    await ws.close()  # before the agent could take it on
    await until(lambda: "mallory" not in ctl.fleet.sessions, "disconnect not seen")
    ws = await dial(ctl, http, "mallory", HUGE)
    await ws.send_str(p.encode(p.Inventory(jobs=[])))
    assert (await expect(ws, p.Run)).spec.job == job.id
    await ws.close()


async def test_an_inventory_in_parts_is_reconciled_after_its_last_part(
        ctl: Controller, http: aiohttp.ClientSession) -> None:
    ws = await dial(ctl, http, "mallory", HUGE)
    kept, vanished = await run_on(ctl, ws, 2)
    await ws.close()
    await until(lambda: "mallory" not in ctl.fleet.sessions, "disconnect not seen")
    ws = await dial(ctl, http, "mallory", HUGE)
    # more attempts than one message may carry; the running job that is still there
    # comes in the last part, the other is in none
    unknown = [p.JobRef(uuid.uuid4().hex, 1, f"gone-{i}", "present")
               for i in range(2 * p.INVENTORY_PART)]
    parts = p.inventory_parts([*unknown, p.JobRef(kept.id, 1, kept.name, "running")])
    assert len(parts) == 3
    for part in parts[:-1]:
        await ws.send_str(p.encode(part))
    await ws.send_str(json.dumps(heartbeat()))  # read after those parts, in order
    await until(lambda: ctl.fleet.sessions["mallory"].heartbeat is not None, "not read")
    assert (await ctl.store.get(vanished.id)).state is State.RUNNING  # type: ignore[union-attr]
    await ws.send_str(p.encode(parts[-1]))
    lost = await wait_state(ctl.store, vanished.id, State.LOST)
    assert lost.message == "workload vanished from agent mallory"
    assert (await ctl.store.get(kept.id)).state is State.RUNNING  # type: ignore[union-attr]
    await ws.close()


async def test_an_agent_listing_without_end_is_cut_off(
        ctl: Controller, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fleet_module, "INVENTORY_MAX", 10)
    ws = await dial(ctl, http, "mallory", HUGE)
    refs = [p.JobRef(uuid.uuid4().hex, 1, f"n{i}", "present") for i in range(6)]
    await ws.send_str(p.encode(p.Inventory(jobs=refs, more=True)))
    await ws.send_str(p.encode(p.Inventory(jobs=refs, more=True)))  # 12 listed: too many
    msg = await ws.receive(timeout=10)
    assert msg.type is WSMsgType.CLOSE and msg.data == 1008, msg
    assert msg.extra == "inventory too large"
    await until(lambda: "mallory" not in ctl.fleet.sessions, "link not cut")


async def test_a_disconnected_agent_is_shown_as_it_was_last_heard(
        ctl: Controller, http: aiohttp.ClientSession) -> None:
    ws = await dial(ctl, http, "mallory", HUGE)
    await ws.send_str(json.dumps(heartbeat(cpu_percent=10.0)))  # stored: the first one
    await until(lambda: ctl.fleet.sessions["mallory"].heartbeat is not None, "not read")
    # the same health and capacity: not written to the store while connected
    await ws.send_str(json.dumps(heartbeat(cpu_percent=77.5)))
    await until(lambda: ctl.fleet.sessions["mallory"].heartbeat.cpu_percent == 77.5,  # type: ignore[union-attr]
                "second heartbeat not read")
    await ws.close()
    await until(lambda: "mallory" not in ctl.fleet.sessions, "disconnect not seen")
    url = f"http://127.0.0.1:{ctl.server.port}/api/v1/agents/"
    for _ in range(250):
        async with http.get(url, headers=admin_headers(ctl)) as resp:
            (agent,) = (await resp.json())["agents"]
        if agent["cpu_percent"] == 77.5:
            break
        await asyncio.sleep(0.02)
    assert agent["state"] == "disconnected"
    assert agent["cpu_percent"] == 77.5
    assert agent["last_seen_seconds_ago"] < 5


async def test_a_token_that_expires_while_connected_ends_the_link(
        ctl: Controller, http: aiohttp.ClientSession) -> None:
    token, jti = issue_agent_token(ctl.config, "mallory", ttl_seconds=2)
    await ctl.store.add_token(jti, "mallory")
    ws = await http.ws_connect(ctl.url, headers={"Authorization": f"Bearer {token}"})
    await ws.send_str(json.dumps(hello("mallory", HUGE)))
    assert isinstance(p.decode((await ws.receive(timeout=10)).data), p.Welcome)
    for _ in range(100):  # heartbeats keep it alive until the token runs out
        msg = await ws.receive(timeout=5)
        if msg.type is not WSMsgType.TEXT:
            break
    assert msg.type is WSMsgType.CLOSE and msg.data == 4001, msg
    assert msg.extra == "token expired"
    await until(lambda: "mallory" not in ctl.fleet.sessions, "link not ended")
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await http.ws_connect(ctl.url, headers={"Authorization": f"Bearer {token}"})
    assert refused.value.status == 401


async def test_jobs_behind_a_page_of_waiting_ones_are_placed(
        ctl: Controller, http: aiohttp.ClientSession) -> None:
    ws = await dial(ctl, http, "mallory", {**HUGE, "gpus": 1})
    gpu_job = await add_job(ctl.store, gpus=1)
    ctl.fleet.kick()
    assert (await expect(ws, p.Run)).spec.job == gpu_job.id  # the one GPU is taken
    for _ in range(QUEUE_PAGE):  # a batch of GPU jobs waits for it
        await add_job(ctl.store, gpus=1)
    cpu_job = await add_job(ctl.store)
    await ws.send_str(json.dumps(heartbeat()))  # not suspect after the inserts
    await until(lambda: not ctl.fleet.views({})["mallory"].suspect, "heartbeat not read")
    assert await ctl.fleet.place_queued() == 1
    assert (await ctl.store.get(cpu_job.id)).state is State.ASSIGNED  # type: ignore[union-attr]
    await ws.close()


async def test_drain_deadline_stops_waiting_when_undrained(
        ctl: Controller, http: aiohttp.ClientSession, capsys: pytest.CaptureFixture[str]
        ) -> None:
    ws = await dial(ctl, http, "mallory", HUGE)
    await run_on(ctl, ws, 1)
    base = f"http://127.0.0.1:{ctl.server.port}/api/v1/"
    args = ["--url", base, "--user", ctl.config.pfcon_user,
            "--password", ctl.config.pfcon_password, "agents", "drain", "mallory",
            "--deadline", "15"]
    drain = asyncio.create_task(asyncio.to_thread(cli.main, args))
    await until(lambda: "mallory" in ctl.fleet.draining, "drain not applied", tries=500)
    async with http.post(base + "agents/mallory/undrain/", headers=admin_headers(ctl)) as resp:
        assert resp.status == 200, await resp.text()
    assert await asyncio.wait_for(drain, 10) == 1
    err = capsys.readouterr().err
    assert "undrained while waiting, 1 job(s) active" in err, err
    await ws.close()


async def test_a_job_removed_as_its_round_assigns_it_gives_its_room_back(
        ctl: Controller, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch) -> None:
    """A round assigns its choices after making them: a job deleted in between is not
    started, and the job that had no room because of it gets the place."""
    ws = await dial(ctl, http, "mallory", {"cpu_millicores": 100, "memory_mib": 1000,
                                            "gpus": 0})
    deleted, waiting = await add_job(ctl.store), await add_job(ctl.store)
    assign_many = ctl.store.assign_many

    async def deleted_first(choices: list[tuple[str, int, str]]) -> list[bool]:
        if choices and choices[0][0] == deleted.id:
            await ctl.store.mark_removed(deleted.id)  # the client's DELETE got in first
        return await assign_many(choices)

    monkeypatch.setattr(ctl.store, "assign_many", deleted_first)
    assert await ctl.fleet.place_queued() == 0  # chose "deleted"; "waiting" had no room
    run = await expect(ws, p.Run)  # the round the lost assign asked for
    assert run.spec.job == waiting.id
    assert (await ctl.store.get(deleted.id)).state is State.CANCELED  # type: ignore[union-attr]
    await ws.close()


async def test_a_round_does_not_assign_to_an_agent_that_left_during_it(
        ctl: Controller, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch) -> None:
    ws = await dial(ctl, http, "mallory", HUGE)
    job = await add_job(ctl.store)
    choose = fleet_module.placement.choose

    def choose_then_disconnect(*args: Any, **kwargs: Any) -> Any:
        view = choose(*args, **kwargs)
        ctl.fleet.sessions.pop("mallory", None)  # its link closed while the round ran
        return view

    monkeypatch.setattr(fleet_module.placement, "choose", choose_then_disconnect)
    assert await ctl.fleet.place_queued() == 0
    stored = await ctl.store.get(job.id)
    assert stored is not None and stored.state is State.QUEUED and stored.agent is None
    await ws.close()


async def test_a_run_never_sent_because_its_agent_left_goes_to_another_agent(
        ctl: Controller, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent leaves between the assign and the send: nothing reached it, so the job
    is queued again at once (not LOST when the lease runs out) and placed elsewhere."""
    ws = await dial(ctl, http, "mallory", HUGE)
    assign_many = ctl.store.assign_many

    async def assign_then_disconnect(choices: list[tuple[str, int, str]]) -> list[bool]:
        assigned = await assign_many(choices)
        ctl.fleet.sessions.pop("mallory", None)  # its link closed as the commit went in
        return assigned

    monkeypatch.setattr(ctl.store, "assign_many", assign_then_disconnect)
    job = await add_job(ctl.store)
    assert await ctl.fleet.place_queued() == 0
    stored = await ctl.store.get(job.id)
    assert stored is not None and (stored.state, stored.agent, stored.attempt) == (
        State.QUEUED, None, 1)
    assert await ctl.store.attempt_agent(job.id, 1) is None
    monkeypatch.setattr(ctl.store, "assign_many", assign_many)
    other = await dial(ctl, http, "eve", HUGE)
    run = await expect(other, p.Run)
    assert (run.spec.job, run.spec.attempt) == (job.id, 1)
    assert (await wait_state(ctl.store, job.id, State.ASSIGNED)).agent == "eve"
    await other.close()
    await ws.close()


async def test_an_agent_whose_link_is_closing_gets_no_job(
        ctl: Controller, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch) -> None:
    """A close begun while the session handles a message leaves the session listed until
    that handling ends: a round must not assign to it (the run would only be requeued,
    and the requeue's round would choose it again)."""
    ws = await dial(ctl, http, "mallory", HUGE)
    session = ctl.fleet.sessions["mallory"]
    handling, release = asyncio.Event(), asyncio.Event()
    persist = ctl.fleet._persist_heartbeat

    async def held(*args: Any) -> None:
        handling.set()
        await release.wait()
        await persist(*args)

    monkeypatch.setattr(ctl.fleet, "_persist_heartbeat", held)
    await ws.send_str(json.dumps(heartbeat()))
    await asyncio.wait_for(handling.wait(), 10)
    closing = asyncio.create_task(ctl.fleet.close_link(session.ws, 4001, b"token revoked"))
    await until(lambda: session.ws.closed, "the close never began")
    assert ctl.fleet.sessions.get("mallory") is session
    assert not ctl.fleet.views({})["mallory"].connected
    job = await add_job(ctl.store)
    assert await ctl.fleet.place_queued() == 0
    stored = await ctl.store.get(job.id)
    assert stored is not None and (stored.state, stored.agent) == (State.QUEUED, None)
    release.set()
    await ws.close()
    await closing
    await until(lambda: "mallory" not in ctl.fleet.sessions, "the closed link stayed")


def slow_run_of(session: Any, job_id: str, started: asyncio.Event) -> None:
    """Make the link's send of ``job_id``'s run wait (a full socket buffer does)."""
    real_send = session.ws.send_str

    async def slow_send(text: str, *args: Any, **kwargs: Any) -> None:
        if '"type":"run"' in text and job_id in text:
            started.set()
            await asyncio.sleep(0.3)
        await real_send(text, *args, **kwargs)

    session.ws.send_str = slow_send


async def runs_and_removes(ws: aiohttp.ClientWebSocketResponse, jobs: dict[str, str]
                           ) -> list[tuple[str, str]]:
    """What the agent gets until the link is quiet for a second: (type, job label)."""
    seen: list[tuple[str, str]] = []
    for _ in range(20):
        try:
            msg = await ws.receive(timeout=1.0)
        except TimeoutError:
            return seen
        message = p.decode(msg.data)
        if isinstance(message, p.Run):
            seen.append(("run", jobs[message.spec.job]))
        elif isinstance(message, p.Remove):
            seen.append(("remove", jobs[message.job]))
            if message.request:
                await ws.send_str(p.encode(p.RemoveReply(request=message.request)))
    raise AssertionError(f"the link never went quiet: {seen}")


async def test_a_job_deleted_while_its_round_sends_runs_is_never_started(
        ctl: Controller, http: aiohttp.ClientSession) -> None:
    """A round assigns a group, then sends its runs one by one: a DELETE of a job whose
    run is still to go must stop that run (a Remove before it would be forgotten by
    the agent, and the run would start the deleted job)."""
    ws = await dial(ctl, http, "mallory", HUGE)
    first, second = await add_job(ctl.store), await add_job(ctl.store)
    sending_first = asyncio.Event()
    slow_run_of(ctl.fleet.sessions["mallory"], first.id, sending_first)

    async def client_delete() -> bool:
        await sending_first.wait()
        return await ctl.server.app[JOBS].remove("plugin", second.jid)

    delete = asyncio.create_task(client_delete())
    assert await ctl.fleet.place_queued() == 1
    assert await delete
    assert await runs_and_removes(ws, {first.id: "first", second.id: "second"}) == [
        ("run", "first")]
    gone = await ctl.store.get(second.id)
    assert gone is not None and gone.removed and gone.state is State.CANCELED
    await ws.close()


async def test_an_agent_reconnecting_while_its_round_sends_runs_gets_each_once(
        ctl: Controller, http: aiohttp.ClientSession) -> None:
    """The new link's reconcile must leave the runs the round has not sent yet to the
    round: a second run of a job that ended would start it again."""
    ws = await dial(ctl, http, "mallory", HUGE)
    await ws.send_str(p.encode(p.Inventory(jobs=[])))
    first, second = await add_job(ctl.store), await add_job(ctl.store)
    sending_first = asyncio.Event()
    slow_run_of(ctl.fleet.sessions["mallory"], first.id, sending_first)

    async def reconnect() -> aiohttp.ClientWebSocketResponse:
        await sending_first.wait()
        again = await dial(ctl, http, "mallory", HUGE)  # replaces the first link
        await again.send_str(p.encode(p.Inventory(jobs=[])))
        return again

    new_link = asyncio.create_task(reconnect())
    await ctl.fleet.place_queued()
    again = await new_link
    # "first" went out on the old link as it was replaced; the new link's inventory
    # does not list it, so its reconcile sends it again.  "second" was not sent yet:
    # the round sends it, on the new link, and the reconcile must not.
    assert sorted(await runs_and_removes(again, {first.id: "first", second.id: "second"})
                  ) == [("run", "first"), ("run", "second")]
    await again.close()
    await ws.close()
