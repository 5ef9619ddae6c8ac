"""Agent sessions: hello, heartbeats, dispatch, event ingestion, failure detection.

Agents dial in on ``/api/v1/fleet/connect`` with their own token.  One session per
agent name; a newer connection replaces an older one.  Messages of one session are
handled in order, so an agent that resends its outbox and then its inventory is
reconciled only after every resent event was applied.

Liveness (DESIGN §5): an agent whose last message is older than 3 heartbeat
intervals is *suspect* (no new placements); one disconnected for longer than the
lease loses its ASSIGNED/RUNNING jobs (LOST, reason in the message).  A link that
comes back within the lease changes nothing: running work is never killed because
a link dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from agent import protocol as p
from controller import placement
from controller.auth import decode_agent_token
from controller.config import Config
from controller.errors import Unauthorized
from controller.ids import new_id
from controller.states import TERMINAL, State
from controller.store import JobRow, Store

log = logging.getLogger("pfleet.controller.fleet")

SUSPECT_AFTER_MISSED = 3
HEARTBEAT_PERSIST_SECONDS = 30.0
LOGS_CACHE_SECONDS = 2.0
# a cached tail not refreshed for this long belongs to a job no longer polled (finished
# by a lease, deleted, ...): the watchdog drops it, so the cache stays as small as the
# set of running jobs someone is watching
LOGS_CACHE_FORGET = 60.0
LOGS_REQUEST_TIMEOUT = 5.0
# An agent that stops reading its link fills the socket buffers, and a send then waits
# for room: past this the link is cut, so the dispatcher (which sends every run
# message) is held at most this long by one agent.
SEND_TIMEOUT = 10.0
CLOSE_TIMEOUT = 5.0  # for the close handshake, likewise
RUNS_REMEMBERED_MAX = 10_000  # per link, for an agent that never sends its inventory
INVENTORY_MAX = 500_000  # attempts one agent may list (in parts) before its link is cut
QUEUE_PAGE = 1000  # queued jobs read at a time by a placement round
ASSIGN_GROUP = 64  # jobs a round considers between two store calls assigning its choices


@dataclass
class AgentSession:
    name: str
    ws: web.WebSocketResponse
    hello: p.Hello
    connected_at: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.monotonic)
    heartbeat: p.Heartbeat | None = None
    # answers awaited from the agent (logs, removals): request id -> (reply type, future)
    pending: dict[str, tuple[type[p.Message], asyncio.Future[Any]]] = field(
        default_factory=dict)
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    transport: asyncio.BaseTransport | None = None
    # (job, attempt) of the runs sent on this link before its inventory was reconciled
    # (None after): the agent may have listed its workloads before they arrived, and
    # they still will, in order; a second run could start again a job that ended
    runs_before_inventory: set[tuple[str, int]] | None = field(default_factory=set)
    # attempts listed by the parts of an inventory read so far (until its last part)
    inventory_seen: set[tuple[str, int]] = field(default_factory=set)

    async def send(self, message: p.Message) -> None:
        try:
            async with asyncio.timeout(SEND_TIMEOUT), self.send_lock:
                await self.ws.send_str(p.encode(message))
        except TimeoutError:
            log.warning("agent does not read its link, cutting it agent=%s", self.name)
            if self.transport is not None:
                self.transport.abort()
            raise ConnectionResetError(f"agent {self.name} does not read") from None
        except asyncio.CancelledError:
            if _cancelling():
                raise
            # aiohttp's writers share one drain future: a close_link that timed out
            # cancelled it under this send (the link is being cut)
            raise ConnectionResetError(f"agent {self.name} link cut") from None

    def capacity(self) -> dict[str, Any]:
        if self.heartbeat is not None and self.heartbeat.capacity:
            return self.heartbeat.capacity
        return self.hello.capacity


def _placement_capacity(hb: p.Heartbeat) -> tuple[Any, ...]:
    return tuple(hb.capacity.get(k) for k in ("cpu_millicores", "memory_mib", "gpus"))


def _cancelling() -> bool:
    """Whether the current task itself is being cancelled (not a future it awaited)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


@dataclass
class Choice:
    """A placement round's decision: ``job`` goes to ``view``'s agent."""

    job: JobRow
    view: placement.AgentView
    req: placement.Request


@dataclass
class _CachedLogs:
    attempt: int
    fetched: float
    logs: str


def spec_for(job: JobRow, logs_tail: int) -> p.JobSpec:
    """The run message's spec for the job's current attempt."""
    s = job.spec
    return p.JobSpec(
        job=job.id, attempt=job.attempt, name=job.name, jid=job.jid, kind=job.kind,
        image=s.get("image", ""), command=list(s.get("command", [])),
        env=list(s.get("env", [])), cpu_limit=int(s.get("cpu_limit", 1000)),
        memory_limit=int(s.get("memory_limit", 300)), gpu_limit=int(s.get("gpu_limit", 0)),
        number_of_workers=int(s.get("number_of_workers", 1)),
        mounts=[p.Mount(**m) for m in s.get("mounts", [])], op=s.get("op"),
        logs_tail=logs_tail)


def request_of(job: JobRow) -> placement.Request:
    s = job.spec
    return placement.Request(int(s.get("cpu_limit", 0)), int(s.get("memory_limit", 0)),
                             int(s.get("gpu_limit", 0)), int(s.get("number_of_workers", 1)))


class Fleet:
    """The controller's side of every agent connection, and the dispatcher."""

    def __init__(self, config: Config, store: Store) -> None:
        self.config = config
        self.store = store
        self.sessions: dict[str, AgentSession] = {}
        # every agent link (also those still before hello) -> its transport, to cut it
        self.sockets: weakref.WeakKeyDictionary[
            web.WebSocketResponse, asyncio.BaseTransport | None] = weakref.WeakKeyDictionary()
        self.disconnected_since: dict[str, float] = {}
        self.strategy: placement.Strategy = (
            "binpack" if config.placement == "binpack" else "spread")
        self.selector: dict[str, str] = dict(config.agent_selector)
        self.draining: set[str] = set()
        self._kick = asyncio.Event()
        self._logs: dict[str, _CachedLogs] = {}
        self._logs_refreshing: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._changed: dict[str, asyncio.Event] = {}
        self._known: dict[str, placement.AgentView] = {}
        self._persisted_heartbeat: dict[str, tuple[Any, float]] = {}
        # Jobs a placement round assigned whose run it has not sent yet (id ->
        # attempt): a DELETE meanwhile takes its job out (no run then, and nothing to
        # remove), and a reconnecting agent's reconcile leaves them to the round.
        self._unsent: dict[str, int] = {}

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        agents = await self.store.agents()
        self.draining = {a.name for a in agents if a.draining}
        for row in agents:
            hello = row.hello or {}
            self._remember(row.name, hello, (row.heartbeat or {}).get("capacity")
                           or hello.get("capacity") or {})
        now = time.monotonic()
        for name in await self.store.agents_with_active_jobs():
            self.disconnected_since.setdefault(name, now)
        self._spawn(self._dispatch_loop(), "dispatch")
        self._spawn(self._watchdog_loop(), "watchdog")
        self.kick()

    async def stop(self) -> None:
        for ws in list(self.sockets):
            await self.close_link(ws, WSCloseCode.GOING_AWAY, b"controller shutting down")
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=f"pfleet-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def kick(self) -> None:
        """Ask the dispatcher to look at the queue again."""
        self._kick.set()

    # ------------------------------------------------------------ connection

    async def handle_connect(self, request: web.Request) -> web.StreamResponse:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme != "Bearer" or not token:
            raise Unauthorized("missing agent token")
        claims = decode_agent_token(self.config, token)
        name, jti = claims.name, claims.jti
        if not await self.store.token_valid(jti, name):
            raise Unauthorized(f"agent token for {name!r} is unknown or revoked")
        ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=32 << 20)
        await ws.prepare(request)
        self.sockets[ws] = request.transport
        try:
            hello = await self._read_hello(ws, name)
        except (p.ProtocolError, TimeoutError) as exc:
            log.warning("agent refused agent=%s reason=%s", name, exc)
            await self.close_link(ws, WSCloseCode.POLICY_VIOLATION, str(exc)[:120].encode())
            return ws
        session = AgentSession(name=name, ws=ws, hello=hello, transport=request.transport)
        old = self.sessions.get(name)
        if old is not None:
            await self.close_link(old.ws, WSCloseCode.POLICY_VIOLATION, b"replaced")
        self.sessions[name] = session
        expiry: asyncio.Task[None] | None = None
        # From here on a failure (the link dropping before welcome) must unregister
        # the session: a stale one would be given jobs and never lose its lease.
        try:
            self.disconnected_since.pop(name, None)
            # A revocation while the agent was saying hello found no session to close:
            # check again, now that a later revocation will find this one.
            if not await self.store.token_valid(jti, name):
                log.warning("agent refused agent=%s reason=token revoked", name)
                await self.close_link(ws, 4001, b"token revoked")
                return ws
            hello_dict = p.encode_dict(hello)
            await self.store.agent_seen(name, hello.found_by or "configured", hello_dict)
            self._remember(name, hello_dict, hello.capacity)
            await session.send(p.Welcome(version=p.PROTOCOL_VERSION,
                                         heartbeat_interval=self.config.heartbeat_interval))
            log.info("agent connected agent=%s runtime=%s found_by=%s", name, hello.runtime,
                     hello.found_by)
            self.kick()
            if claims.expires_at is not None:
                expiry = asyncio.get_running_loop().create_task(
                    self._close_at_expiry(session, claims.expires_at))
            await self._session_loop(session)
        except ConnectionResetError:
            pass
        finally:
            if expiry is not None:
                expiry.cancel()
            gone = self.sessions.get(name) is session
            if gone:
                del self.sessions[name]
                self.disconnected_since[name] = time.monotonic()
                log.info("agent disconnected agent=%s", name)
            for _kind, fut in session.pending.values():
                if not fut.done():
                    fut.set_exception(ConnectionResetError(f"agent {name} disconnected"))
            if gone:
                await self._keep_last_contact(session)
        return ws

    async def _close_at_expiry(self, session: AgentSession, expires_at: float) -> None:
        """An agent token is checked at connect; one that expires while its link is up
        ends the link then (the agent cannot connect again with it)."""
        await asyncio.sleep(max(0.0, expires_at - time.time()))
        log.warning("agent token expired, closing its link agent=%s", session.name)
        await self.close_link(session.ws, 4001, b"token expired")

    async def _keep_last_contact(self, session: AgentSession) -> None:
        """Store what a departing agent said last, and when: the store holds only the
        heartbeats that changed something, up to HEARTBEAT_PERSIST_SECONDS old, and
        ``pfleet agents`` shows a disconnected agent from it."""
        self._persisted_heartbeat.pop(session.name, None)
        if session.heartbeat is None:
            return
        seen_at = time.time() - (time.monotonic() - session.last_seen)
        try:
            await self.store.agent_heartbeat(session.name, p.encode_dict(session.heartbeat),
                                             seen_at=seen_at)
        except Exception as exc:  # the store closing at shutdown: only the display is older
            log.warning("could not store the last heartbeat agent=%s error=%s",
                        session.name, exc)

    async def close_link(self, ws: web.WebSocketResponse, code: int, message: bytes) -> None:
        """Close an agent's link; one that does not read, or does not answer the close,
        is cut: it must not hold a revocation, a replacement or the shutdown."""
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await ws.close(code=code, message=message)
        except (TimeoutError, asyncio.CancelledError):
            if _cancelling():
                raise
            # timed out, or a send that timed out cancelled the drain future it shares
            transport = self.sockets.get(ws)
            log.warning("agent link did not close in time, cut it")
            if transport is not None:
                transport.abort()

    async def _read_hello(self, ws: web.WebSocketResponse, name: str) -> p.Hello:
        msg = await ws.receive(timeout=15.0)
        if msg.type != WSMsgType.TEXT:
            raise p.ProtocolError("expected hello")
        hello = p.decode(msg.data)
        if not isinstance(hello, p.Hello):
            raise p.ProtocolError(f"expected hello, got {hello.type}")
        if hello.agent != name:
            raise p.ProtocolError(f"token is for agent {name!r}, hello names {hello.agent!r}")
        if hello.version != p.PROTOCOL_VERSION:
            raise p.ProtocolError(f"protocol version {hello.version} not supported "
                                  f"(controller speaks {p.PROTOCOL_VERSION})")
        return hello

    async def _session_loop(self, session: AgentSession) -> None:
        async for msg in session.ws:
            if msg.type != WSMsgType.TEXT:
                log.warning("bad message agent=%s error=not a text frame (%s)", session.name,
                            msg.type.name)
                continue
            if self._suspect(session):
                self.kick()  # placeable again: jobs may have waited for it
            session.last_seen = time.monotonic()
            try:
                message = p.decode(msg.data)
            except p.ProtocolError as exc:
                log.warning("bad message agent=%s error=%s", session.name, exc)
                continue
            try:
                await self._handle(session, message)
            except ConnectionResetError:
                return
            except Exception:  # keep the session alive: one bad message must not drop it
                log.exception("failed to handle message agent=%s type=%s", session.name,
                              message.type)

    async def _handle(self, session: AgentSession, message: p.Message) -> None:
        if isinstance(message, p.Heartbeat):
            before = session.heartbeat
            session.heartbeat = message
            if before is None or (message.runtime_ok and not before.runtime_ok) or \
                    _placement_capacity(message) != _placement_capacity(before):
                self.kick()  # healthy again, or room changed: jobs may have waited for it
            await self._persist_heartbeat(session, message)
        elif isinstance(message, p.Event):
            await self._on_event(session, message)
        elif isinstance(message, p.Inventory):
            await self._reconcile(session, message)
        elif isinstance(message, (p.LogsReply, p.RemoveReply)):
            kind, fut = session.pending.get(message.request, (None, None))
            if fut is None or kind is not type(message):
                log.info("reply to no request of this agent agent=%s type=%s",
                         session.name, message.type)
            elif not fut.done():
                fut.set_result(message)
        else:
            log.warning("unexpected message agent=%s type=%s", session.name, message.type)

    # ---------------------------------------------------------------- events

    async def _persist_heartbeat(self, session: AgentSession, hb: p.Heartbeat) -> None:
        """Write a heartbeat to the store only when what it says about the agent's
        health or capacity changed, or every HEARTBEAT_PERSIST_SECONDS (last seen);
        500 agents beating every 5 s would otherwise be 100 writes a second."""
        key = (hb.runtime_ok, tuple(hb.problems), tuple(sorted(hb.capacity.items())),
               len(hb.running))
        previous = self._persisted_heartbeat.get(session.name)
        now = time.monotonic()
        if previous is not None and previous[0] == key and \
                now - previous[1] < HEARTBEAT_PERSIST_SECONDS:
            return
        self._persisted_heartbeat[session.name] = (key, now)
        await self.store.agent_heartbeat(session.name, p.encode_dict(hb))
        if hb.capacity:
            self._remember(session.name, p.encode_dict(session.hello), hb.capacity)

    async def _on_event(self, session: AgentSession, ev: p.Event) -> None:
        values: dict[str, Any] = {}
        if ev.started_at:
            values["started_at"] = ev.started_at
        if ev.finished_at:
            values["finished_at"] = ev.finished_at
        if ev.logs is not None:
            values["logs"] = ev.logs
        state: State | None
        if ev.state == "running":
            state, values["message"] = State.RUNNING, "running"
        elif ev.state == "exited":
            values["exit_code"] = ev.exit_code
            if ev.oom:
                state, values["message"] = State.EXECUTOR_ERROR, "OOMKilled"
            elif ev.exit_code == 0:
                state, values["message"] = State.COMPLETE, "exited"
            else:
                state, values["message"] = State.EXECUTOR_ERROR, f"exited {ev.exit_code}"
                reason = ev.message.strip().splitlines()[-1] if ev.message.strip() else ""
                if reason and reason not in ("exited", "dead"):
                    values["message"] += f": {reason[:300]}"  # e.g. why a copy failed
        elif ev.state == "failed":
            state, values["message"] = State.SYSTEM_ERROR, ev.message or "could not start"
        elif ev.state == "lost":
            state = State.LOST
            values["message"] = ev.message or f"workload vanished from agent {session.name}"
        else:  # removed: the workload is gone on request; nothing to record
            state = None
        if state is not None:
            # only the agent the job is placed on may move it (an agent's token
            # says who it is, not which jobs it runs)
            job = await self.store.apply_event(ev.job, ev.attempt, state,
                                               agent=session.name, **values)
            if job is None:
                log.debug("event fenced off agent=%s job=%s attempt=%s state=%s",
                          session.name, ev.job, ev.attempt, ev.state)
            else:
                log.info("job state jid=%s name=%s attempt=%s state=%s message=%r agent=%s",
                         job.jid, job.name, job.attempt, job.state, job.message, session.name)
                self._notify(job.id)
                if job.state in TERMINAL:
                    self._logs.pop(job.id, None)
                    self.kick()
        await session.send(p.Ack(seq=ev.seq))

    async def _reconcile(self, session: AgentSession, inventory: p.Inventory) -> None:
        """Bring the agent's workloads and the store back in line after a (re)connect.

        A large inventory comes in parts (``more``): stale workloads are removed as each
        part is read; what the agent no longer holds is known only after the last one.
        """
        seen = session.inventory_seen
        if len(seen) + len(inventory.jobs) > INVENTORY_MAX:
            log.warning("agent lists more than %d attempts, cutting its link agent=%s",
                        INVENTORY_MAX, session.name)
            await self.close_link(session.ws, WSCloseCode.POLICY_VIOLATION,
                                  b"inventory too large")
            raise ConnectionResetError(f"agent {session.name} inventory too large")
        known = await self.store.get_many(list({ref.job for ref in inventory.jobs}))
        strangers: list[p.JobRef] = []
        for index, ref in enumerate(inventory.jobs):
            if index % 512 == 511:
                await asyncio.sleep(0)  # a part of thousands must not hold the loop
            seen.add((ref.job, ref.attempt))
            job = known.get(ref.job)
            if job is None:
                strangers.append(ref)
                continue
            stale = (job.removed or job.attempt != ref.attempt or job.agent != session.name
                     or job.state in (State.LOST, State.CANCELED))
            if stale and (job.removed or self.config.remove_jobs or job.attempt != ref.attempt):
                await session.send(p.Remove(job=ref.job, attempt=ref.attempt, name=ref.name))
        if strangers:  # one line: an agent may hold thousands
            log.warning("agent has %d workload(s) the store does not know; leaving them "
                        "agent=%s names=%s", len(strangers), session.name,
                        ",".join(ref.name for ref in strangers[:5])
                        + (",..." if len(strangers) > 5 else ""))
        if inventory.more:
            return
        session.inventory_seen = set()
        for job in await self.store.jobs_on_agent(session.name, (State.ASSIGNED, State.RUNNING)):
            if (job.id, job.attempt) in seen:
                continue
            if job.state is State.ASSIGNED:
                if (job.id, job.attempt) not in (session.runs_before_inventory or ()) \
                        and self._unsent.get(job.id) != job.attempt:  # the round sends those
                    await session.send(p.Run(spec=spec_for(job, self.config.job_logs_tail)))
            else:
                await self.store.apply_event(
                    job.id, job.attempt, State.LOST,
                    message=f"workload vanished from agent {session.name}")
                self._notify(job.id)
                self.kick()
        session.runs_before_inventory = None

    # -------------------------------------------------------------- dispatch

    async def _dispatch_loop(self) -> None:
        while True:
            await self._kick.wait()
            self._kick.clear()
            try:
                await self.place_queued()
            except Exception:
                log.exception("placement round failed")
                await asyncio.sleep(1.0)

    def views(self, usage: dict[str, tuple[int, int, int]]) -> dict[str, placement.AgentView]:
        now = time.monotonic()
        out: dict[str, placement.AgentView] = {}
        for name, s in self.sessions.items():
            cap = s.capacity()
            hb = s.heartbeat
            used = usage.get(name, (0, 0, 0))
            out[name] = placement.AgentView(
                name=name, cpu_millicores=int(cap.get("cpu_millicores", 0)),
                memory_mib=int(cap.get("memory_mib", 0)), gpus=int(cap.get("gpus", 0)),
                multi_worker=bool(s.hello.capabilities.get("multi_worker", False)),
                # a link whose close has begun stays listed until its reader ends:
                # a run for it would only come back to the queue
                labels=dict(s.hello.labels), connected=not s.ws.closed,
                suspect=self._suspect(s, now),
                draining=name in self.draining,
                healthy=hb.runtime_ok if hb is not None else True,
                used_cpu=used[0], used_memory=used[1], used_gpus=used[2])
        return out

    def _suspect(self, session: AgentSession, now: float | None = None) -> bool:
        silent = (time.monotonic() if now is None else now) - session.last_seen
        return silent > SUSPECT_AFTER_MISSED * self.config.heartbeat_interval

    async def place_queued(self) -> int:
        """One placement round over the queue, oldest first; returns jobs placed.

        Choices are assigned in the store a group at a time (one store call and one
        commit for the choices among ``ASSIGN_GROUP`` jobs considered, not one each),
        then their runs sent."""
        queued, usage = await self.store.queued_and_usage(QUEUE_PAGE)
        if not queued or not self.sessions:
            return 0
        views = self.views(usage)
        placed = 0
        no_room: set[placement.Request] = set()  # capacity only shrinks during a round
        chosen: list[Choice] = []
        index = -1
        async for job in self._whole_queue(queued):
            index += 1
            if index % ASSIGN_GROUP == ASSIGN_GROUP - 1:
                if chosen:
                    placed += await self._start(chosen)
                    chosen = []
                await asyncio.sleep(0)  # a long queue must not hold the loop
            req = request_of(job)
            if req in no_room:
                continue
            view = placement.choose(req, views.values(), strategy=self.strategy,
                                    selector=self.selector)
            while view is not None and view.name not in self.sessions:
                del views[view.name]  # its agent left during the round: look again
                view = placement.choose(req, views.values(), strategy=self.strategy,
                                        selector=self.selector)
            if view is None:
                no_room.add(req)
                continue
            view.take(req)
            chosen.append(Choice(job, view, req))
        return placed + await self._start(chosen)

    async def _start(self, chosen: list[Choice]) -> int:
        """Assign a group of choices (one store call), then send their runs."""
        live = []
        for choice in chosen:
            if choice.view.name in self.sessions:
                live.append(choice)
            else:  # the agent left during the round: its jobs wait for the next one
                choice.view.give_back(choice.req)
                self.kick()
        if not live:
            return 0
        assigned = await self.store.assign_many(
            [(c.job.id, c.job.attempt, c.view.name) for c in live])
        started = []
        for choice, ok in zip(live, assigned, strict=True):
            if ok:
                started.append(choice)
                self._unsent[choice.job.id] = choice.job.attempt
            else:  # the job moved on meanwhile (removed): its room is free again
                choice.view.give_back(choice.req)
                self.kick()
        placed = 0
        try:
            for choice in started:
                job = choice.job
                if self._unsent.pop(job.id, None) != job.attempt:
                    continue  # deleted while the runs before it went out: never sent
                placed += await self._send_run(job, choice.view.name)
        finally:  # cancelled: what was not sent is left to the reconcile or the lease
            for choice in started:
                if self._unsent.get(choice.job.id) == choice.job.attempt:
                    del self._unsent[choice.job.id]
        return placed

    async def _send_run(self, job: JobRow, name: str) -> bool:
        """Send the run of a job just assigned to ``name``.  False when its agent left
        before anything was sent: the job is queued again for another agent."""
        session = self.sessions.get(name)
        if session is None or session.ws.closed:
            # Nothing of it reached any agent, so nothing can run twice: it goes back
            # to the queue now instead of waiting for the lease to make it LOST.
            if await self.store.requeue(job.id, job.attempt, "queued"):
                log.warning("run not sent, agent gone, job queued again jid=%s agent=%s",
                            job.jid, name)
                self._notify(job.id)
                self.kick()
            return False
        log.info("job placed jid=%s name=%s attempt=%s agent=%s", job.jid, job.name,
                 job.attempt, name)
        try:
            await session.send(p.Run(spec=spec_for(job, self.config.job_logs_tail)))
            sent = session.runs_before_inventory
            if sent is not None and len(sent) < RUNS_REMEMBERED_MAX:
                sent.add((job.id, job.attempt))
        except ConnectionResetError:
            # Perhaps sent (a write that timed out or was cut may have gone out): it
            # stays ASSIGNED; the reconnect's reconcile resends it if the agent does
            # not list it, or the lease marks it LOST.
            log.warning("run perhaps not sent, agent link down jid=%s agent=%s", job.jid,
                        name)
        except Exception:  # the rest of the group still goes out
            log.exception("run not sent jid=%s agent=%s", job.jid, name)
        return True

    async def _whole_queue(self, first: list[JobRow]) -> AsyncIterator[JobRow]:
        """The queue from its first page on, a page at a time: the jobs behind a page
        may fit where its jobs do not (GPU jobs waiting must not hold back the rest),
        and one round must place all it can (no kick may come for hours)."""
        page = first
        while page:
            for job in page:
                yield job
            if len(page) < QUEUE_PAGE:
                return
            page = await self.store.queued(QUEUE_PAGE, after=page[-1].seq)

    def known_views(self) -> list[placement.AgentView]:
        """What every agent ever seen (connected or not) offers, for ``never_fits``;
        kept in memory so a submit never reads the whole agents table."""
        return list(self._known.values())

    def forget(self, name: str) -> None:
        """Drop what is kept in memory of a decommissioned agent (not connected): it no
        longer counts as a place a job could ever fit, nor waits for a lease."""
        self._known.pop(name, None)
        self.draining.discard(name)
        self.disconnected_since.pop(name, None)
        self._persisted_heartbeat.pop(name, None)

    def _remember(self, name: str, hello: dict[str, Any], capacity: dict[str, Any]) -> None:
        self._known[name] = placement.AgentView(
            name=name, cpu_millicores=int(capacity.get("cpu_millicores", 0)),
            memory_mib=int(capacity.get("memory_mib", 0)), gpus=int(capacity.get("gpus", 0)),
            multi_worker=bool((hello.get("capabilities") or {}).get("multi_worker")),
            labels=dict(hello.get("labels") or {}))

    # ------------------------------------------------------------ watchers

    def _notify(self, job_id: str) -> None:
        event = self._changed.pop(job_id, None)
        if event is not None:
            event.set()

    async def wait_for_change(self, job_id: str, at_most: float) -> None:
        """Return when the job's state changes, or after ``at_most`` seconds."""
        event = self._changed.setdefault(job_id, asyncio.Event())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), at_most)

    # ------------------------------------------------------- removals, logs

    async def remove_workload(self, job: JobRow, attempt: int | None = None, *,
                              wait: float = 0.0) -> None:
        """Ask the agent that ran ``attempt`` (default: current) to remove it, and
        wait up to ``wait`` seconds for it to be done (pfcon removes the container
        before answering a DELETE).  When the agent is offline, or slower, the
        reconcile at its reconnect or the agent itself finishes the job."""
        attempt = job.attempt if attempt is None else attempt
        if self._unsent.get(job.id) == attempt:
            del self._unsent[job.id]  # its round had not sent the run: it never will
            return
        agent = job.agent if attempt == job.attempt else await self.store.attempt_agent(
            job.id, attempt)
        session = self.sessions.get(agent) if agent else None
        if session is None:
            return
        if wait <= 0:
            with contextlib.suppress(ConnectionResetError):
                await session.send(p.Remove(job=job.id, attempt=attempt, name=job.name))
            return
        await self._ask(session, p.Remove(job=job.id, attempt=attempt, name=job.name,
                                          request=new_id()), wait)

    async def _ask(self, session: AgentSession, message: p.Remove | p.LogsRequest,
                   within: float) -> p.Message:
        """Send a request and wait for the agent's reply to it.  Raises TimeoutError,
        or ConnectionResetError when the link closes meanwhile."""
        fut: asyncio.Future[p.Message] = asyncio.get_running_loop().create_future()
        reply = p.LogsReply if isinstance(message, p.LogsRequest) else p.RemoveReply
        session.pending[message.request] = (reply, fut)
        try:
            await session.send(message)
            return await asyncio.wait_for(fut, within)
        finally:
            session.pending.pop(message.request, None)

    def logs_for(self, job: JobRow) -> str:
        """Logs to show for a job now, never waiting on an agent: the final tail of a
        finished job, or the last fetched tail of a running one (refreshed in the
        background when older than a couple of seconds)."""
        if job.state is not State.RUNNING:
            return job.logs
        cached = self._logs.get(job.id)
        fresh = (cached is not None and cached.attempt == job.attempt
                 and time.monotonic() - cached.fetched < LOGS_CACHE_SECONDS)
        if not fresh and job.id not in self._logs_refreshing and job.agent in self.sessions:
            self._logs_refreshing.add(job.id)
            self._spawn(self._refresh_logs(job), f"logs-{job.id}")
        if cached is not None and cached.attempt == job.attempt:
            return cached.logs
        return job.logs

    async def fetch_logs(self, job: JobRow) -> str:
        session = self.sessions.get(job.agent or "")
        if session is None:
            return job.logs
        reply = await self._ask(session, p.LogsRequest(
            request=new_id(), job=job.id, attempt=job.attempt,
            tail=self.config.job_logs_tail), LOGS_REQUEST_TIMEOUT)
        assert isinstance(reply, p.LogsReply)
        return reply.logs

    async def _refresh_logs(self, job: JobRow) -> None:
        try:
            logs = await self.fetch_logs(job)
            self._logs[job.id] = _CachedLogs(job.attempt, time.monotonic(), logs)
        except (TimeoutError, ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self._logs_refreshing.discard(job.id)

    # -------------------------------------------------------------- watchdog

    async def _watchdog_loop(self) -> None:
        interval = max(0.5, min(self.config.heartbeat_interval, 5.0))
        while True:
            await asyncio.sleep(interval)
            self.forget_stale_logs()
            try:
                await self.expire_leases()
            except Exception:
                log.exception("lease check failed")

    def forget_stale_logs(self, now: float | None = None) -> int:
        """Drop cached log tails not refreshed for LOGS_CACHE_FORGET; returns how many."""
        cutoff = (time.monotonic() if now is None else now) - LOGS_CACHE_FORGET
        stale = [job_id for job_id, cached in self._logs.items() if cached.fetched < cutoff]
        for job_id in stale:
            del self._logs[job_id]
        return len(stale)

    async def expire_leases(self) -> int:
        """Mark the jobs of agents gone longer than the lease LOST; returns how many."""
        now = time.monotonic()
        lost = 0
        for name, since in list(self.disconnected_since.items()):
            if name in self.sessions or now - since < self.config.agent_lease:
                continue
            for job in await self.store.jobs_on_agent(name, (State.ASSIGNED, State.RUNNING)):
                if self.disconnected_since.get(name) != since:
                    break  # it came back meanwhile (and maybe left again): not this lease
                if await self.store.apply_event(
                        job.id, job.attempt, State.LOST,
                        message=f"agent {name} lost: no contact for "
                                f"{int(self.config.agent_lease)} s"):
                    lost += 1
                    self._notify(job.id)
                    log.warning("job lost jid=%s name=%s agent=%s", job.jid, job.name, name)
            if self.disconnected_since.get(name) == since:
                del self.disconnected_since[name]
        if lost:
            self.kick()
        return lost


FLEET = web.AppKey("pfleet.fleet", Fleet)
