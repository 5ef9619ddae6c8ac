"""The agent's job supervisor: starts attempts, watches them, reports what happens.

Durability: before anything is started, the attempt's spec is written to
``<state>/jobs/<job>.json``; the runtime's handle and whether ``running`` was
reported are added as they become known.  The file is removed only after the
final event is in the outbox.  So after a ``kill -9`` the agent knows every
attempt it took on, finds its workloads again (``Runtime.list_ours``), starts the
ones that never got going (starts are idempotent per attempt) and reports the ones
that ended while it was down.

Built-in operations (copy/upload/delete) run as child processes of the agent with
the job's limits (``agent.op_runner``) instead of in a runtime.  The worker's pid
and start time are persisted with the attempt before it is waited for, so after a
restart the agent reports the result the worker left, waits for a worker that is
still running, or runs the (idempotent) operation again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import protocol as p
from agent.durable import DurableWriter
from agent.fstree import first_link
from agent.op_runner import ChildRef, OpRunner
from agent.outbox import Outbox
from agent.runtimes.base import Handle, JobRejected, JobStatus, Runtime, RuntimeUnavailable

log = logging.getLogger("pfleet.agent.supervisor")

START_RETRY_SECONDS = 5.0
BUILTIN = "builtin"
FINISHED_KEPT = 4096  # handles of ended attempts remembered for their removal


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class Tracked:
    spec: p.JobSpec
    handle: Handle | None = None
    running_reported: bool = False
    started_at: str = ""
    op_child: ChildRef | None = None  # the worker process of a built-in operation

    def to_json(self) -> str:
        return json.dumps({"spec": p.encode_dict(p.Run(spec=self.spec))["spec"],
                           "handle": self.handle.to_dict() if self.handle else None,
                           "running_reported": self.running_reported,
                           "started_at": self.started_at,
                           "op_child": self.op_child.to_dict() if self.op_child else None})

    @classmethod
    def from_json(cls, text: str) -> Tracked:
        data = json.loads(text)
        if not isinstance(data, dict) or not isinstance(data.get("spec"), dict):
            raise ValueError("not a job record (an object with a spec object)")
        handle = Handle.from_dict(data["handle"]) if data.get("handle") else None
        return cls(p.JobSpec.from_dict(data["spec"]), handle,
                   bool(data.get("running_reported")), str(data.get("started_at", "")),
                   ChildRef.from_dict(data.get("op_child")))


class Supervisor:
    def __init__(self, runtime: Runtime, outbox: Outbox, state_dir: Path,
                 storebase_mount: Path, *, poll_interval: float = 5.0,
                 remove_jobs: bool = True) -> None:
        self.runtime = runtime
        self.outbox = outbox
        self.jobs_dir = state_dir / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.storebase_mount = storebase_mount
        self.poll_interval = poll_interval
        self.remove_jobs = remove_jobs
        self.op_runner = OpRunner(state_dir / "ops", storebase_mount)
        self._records = DurableWriter("jobs")
        self.active: dict[str, Tracked] = {}
        # Ended attempts' handles, so removing one needs no listing of the runtime
        # (after a restart the listing is the fallback).
        self._finished: collections.OrderedDict[tuple[str, int], Handle] = \
            collections.OrderedDict()
        self.on_event: Callable[[], None] = lambda: None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._check_lock = asyncio.Lock()
        self._wake = asyncio.Event()

    # ------------------------------------------------------------ lifecycle

    async def startup(self) -> None:
        """Load the attempts taken on before a restart and re-attach to them."""
        for path in sorted(self.jobs_dir.glob("*.json")):
            try:
                tracked = Tracked.from_json(path.read_text())
                if tracked.spec.job != path.stem:  # finishing would delete another file
                    raise ValueError(f"record of job {tracked.spec.job!r}")
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                log.error("dropping unreadable job record path=%s error=%s", path, exc)
                path.unlink(missing_ok=True)
                continue
            self.active[tracked.spec.job] = tracked
        for tmp in self.jobs_dir.glob("*.tmp"):
            tmp.unlink(missing_ok=True)
        self.op_runner.prune(t.spec for t in self.active.values() if t.spec.op is not None)
        if not self.active:
            return
        try:
            found = {h.job: h for h in await self.runtime.list_ours()}
        except RuntimeUnavailable as exc:
            log.warning("runtime unavailable at startup, will retry error=%s", exc)
            found = {}
        for tracked in list(self.active.values()):
            spec = tracked.spec
            handle = found.get(spec.job)
            if spec.op is not None:
                self._spawn(self._run_op(tracked), f"op-{spec.name}")
            elif (handle is not None and handle.attempt == spec.attempt
                  and tracked.running_reported):
                tracked.handle = handle
                log.info("re-attached jid=%s name=%s attempt=%s", spec.jid, spec.name,
                         spec.attempt)
            elif tracked.running_reported and tracked.handle is not None:
                # It ran, and is not listed (gone, or the runtime is down): starting
                # it would run it twice; polling its recorded handle says what it is.
                log.info("re-attached by its recorded handle jid=%s name=%s attempt=%s",
                         spec.jid, spec.name, spec.attempt)
            else:
                # Never reported running: it may never have been created, or created
                # but not started.  start() is idempotent per attempt, so it finishes
                # the job of the killed agent without ever starting a workload twice.
                self._spawn(self._start(tracked), f"start-{spec.name}")
        self._wake.set()

    async def run_forever(self) -> None:
        """Poll the runtime, and react at once to the changes it pushes."""
        self._spawn(self._watch_changes(), "changes")
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_interval)
            self._wake.clear()
            await self.check()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.op_runner.close()
        await asyncio.to_thread(self._records.close)

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=f"pfleet-agent-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------- commands

    async def run(self, spec: p.JobSpec) -> None:
        """Take on an attempt.  Idempotent: an attempt already taken is ignored; an
        older attempt of the same job is removed first."""
        current = self.active.get(spec.job)
        if current is not None:
            if current.spec.attempt >= spec.attempt:
                return
            await self._drop(current, remove_workload=True)
        tracked = Tracked(spec)
        self.active[spec.job] = tracked
        error = self._persist(tracked)
        if error is not None:  # a job it could not find again after a restart
            await self._finish(tracked, p.Event(
                seq=0, job=spec.job, attempt=spec.attempt, state="failed",
                message=f"the agent cannot record the job: {error.strerror or error}",
                finished_at=now_rfc3339()))
            return
        if spec.op is not None:
            self._spawn(self._run_op(tracked), f"op-{spec.name}")
        else:
            self._spawn(self._start(tracked), f"start-{spec.name}")

    async def remove(self, job: str, attempt: int, name: str) -> None:
        """Remove the workload of an attempt (killing it if it still runs)."""
        tracked = self.active.get(job)
        if tracked is not None and tracked.spec.attempt == attempt:
            await self._drop(tracked, remove_workload=True)
            return
        if not self.remove_jobs:
            return
        known = self._finished.pop((job, attempt), None)
        if known is not None:
            if known.runtime == BUILTIN:
                return  # an operation leaves no workload behind
            try:
                await self.runtime.remove(known, force=True)
                log.info("removed workload name=%s attempt=%s", known.name, attempt)
            except RuntimeUnavailable as exc:
                log.warning("remove failed, runtime unavailable name=%s error=%s", name, exc)
            return
        try:
            for handle in await self.runtime.list_ours():
                if handle.job == job and handle.attempt == attempt:
                    await self.runtime.remove(handle, force=True)
                    log.info("removed workload name=%s attempt=%s", handle.name, attempt)
        except RuntimeUnavailable as exc:
            log.warning("remove failed, runtime unavailable name=%s error=%s", name, exc)

    async def cancel(self, job: str, attempt: int) -> None:
        tracked = self.active.get(job)
        if tracked is not None and tracked.spec.attempt == attempt and tracked.spec.op:
            self.op_runner.kill(tracked.spec, tracked.op_child)  # reported as exited 137
        elif tracked is not None and tracked.spec.attempt == attempt and tracked.handle:
            await self.runtime.cancel(tracked.handle)
            self._wake.set()

    async def logs(self, job: str, attempt: int, tail: int) -> str:
        tracked = self.active.get(job)
        handle = tracked.handle if tracked and tracked.spec.attempt == attempt else None
        if handle is None or handle.runtime == BUILTIN:
            return ""
        try:
            return await self.runtime.logs(handle, tail)
        except RuntimeUnavailable:
            return ""

    async def inventory(self) -> list[p.JobRef]:
        """Every attempt this agent holds: tracked, awaiting an ack, or a finished
        workload still present on the runtime."""
        refs: dict[tuple[str, int], p.JobRef] = {}
        with contextlib.suppress(RuntimeUnavailable):
            for h in await self.runtime.list_ours():
                refs[(h.job, h.attempt)] = p.JobRef(h.job, h.attempt, h.name, "present")
        for job, attempt in self.outbox.pending_jobs():
            refs.setdefault((job, attempt), p.JobRef(job, attempt, "", "reporting"))
        for t in self.active.values():
            state = "running" if t.running_reported else "pending"
            refs[(t.spec.job, t.spec.attempt)] = p.JobRef(t.spec.job, t.spec.attempt,
                                                          t.spec.name, state)
        return list(refs.values())

    def running_jobs(self) -> list[str]:
        return [job for job, t in self.active.items() if t.running_reported]

    # ------------------------------------------------------------- internals

    async def _start(self, tracked: Tracked) -> None:
        spec = tracked.spec
        refusal = await asyncio.to_thread(self._mount_through_link, spec)
        if refusal is not None:
            log.warning("job rejected jid=%s name=%s reason=%s", spec.jid, spec.name, refusal)
            await self._finish(tracked, p.Event(seq=0, job=spec.job, attempt=spec.attempt,
                                                state="failed", message=refusal,
                                                finished_at=now_rfc3339()))
            return
        while self.active.get(spec.job) is tracked:
            try:
                handle = await self.runtime.start(spec)
            except JobRejected as exc:
                log.warning("job rejected jid=%s name=%s reason=%s", spec.jid, spec.name, exc)
                await self._finish(tracked, p.Event(seq=0, job=spec.job, attempt=spec.attempt,
                                                    state="failed", message=str(exc),
                                                    finished_at=now_rfc3339()))
                return
            except RuntimeUnavailable as exc:
                log.warning("runtime unavailable, retrying start jid=%s error=%s", spec.jid, exc)
                await asyncio.sleep(START_RETRY_SECONDS)
                continue
            if self.active.get(spec.job) is not tracked:  # removed while starting
                with contextlib.suppress(RuntimeUnavailable):
                    await self.runtime.remove(handle, force=True)
                return
            tracked.handle = handle
            self._persist(tracked)
            log.info("job started jid=%s name=%s attempt=%s", spec.jid, spec.name, spec.attempt)
            await self.check([tracked])
            return

    async def _run_op(self, tracked: Tracked) -> None:
        """Run a built-in operation in its worker process, or resume it after a restart
        (``tracked.op_child``), and report it like a container: running, then exited."""
        spec = tracked.spec
        assert spec.op is not None
        if self.active.get(spec.job) is not tracked:
            self.op_runner.forget(spec)
            return  # removed before it got going
        tracked.handle = Handle(BUILTIN, spec.name, spec.job, spec.attempt, spec.name, spec.kind)
        if not tracked.running_reported:
            tracked.started_at = now_rfc3339()
            self._report(p.Event(seq=0, job=spec.job, attempt=spec.attempt, state="running",
                                 started_at=tracked.started_at))
            tracked.running_reported = True
            self._persist(tracked)

        def started(child: ChildRef) -> None:
            tracked.op_child = child
            if self.active.get(spec.job) is tracked:
                error = self._persist(tracked)  # before waiting: a restart must find it
                if error is not None:
                    raise error  # not run unrecorded: a restart would run a second one
            else:
                self.op_runner.kill(spec, child)

        try:
            result = await self.op_runner.run(spec, child=tracked.op_child, on_started=started)
        except OSError as exc:
            log.error("operation could not start jid=%s name=%s error=%s", spec.jid, spec.name,
                      exc)
            if self.active.get(spec.job) is tracked:
                await self._finish(tracked, p.Event(
                    seq=0, job=spec.job, attempt=spec.attempt, state="failed",
                    message=f"could not start the operation: {exc.strerror or exc}",
                    finished_at=now_rfc3339()))
            self.op_runner.forget(spec)
            return
        if self.active.get(spec.job) is not tracked:  # removed while it ran
            self.op_runner.forget(spec)
            return
        if result.exit_code:
            log.warning("operation failed jid=%s name=%s exit_code=%s message=%s", spec.jid,
                        spec.name, result.exit_code, result.message)
        await self._finish(tracked, p.Event(
            seq=0, job=spec.job, attempt=spec.attempt, state="exited",
            exit_code=result.exit_code, oom=result.oom,
            started_at=tracked.started_at or now_rfc3339(), finished_at=now_rfc3339(),
            logs=result.log, message=result.message))
        self.op_runner.forget(spec)

    async def check(self, only: list[Tracked] | None = None) -> None:
        """Ask the runtime about tracked workloads and report every change."""
        async with self._check_lock:
            targets = [t for t in (only or list(self.active.values()))
                       if t.handle is not None and t.handle.runtime != BUILTIN]
            if not targets:
                return
            try:
                statuses = await self.runtime.status([t.handle for t in targets
                                                      if t.handle is not None])
            except RuntimeUnavailable as exc:
                log.warning("status poll failed error=%s", exc)
                return
            for tracked in targets:
                status = statuses.get(tracked.spec.job)
                if status is not None and self.active.get(tracked.spec.job) is tracked:
                    await self._observe(tracked, status)

    async def _observe(self, tracked: Tracked, status: JobStatus) -> None:
        spec = tracked.spec
        if status.state == "exited" and status.extra.get("failed"):
            # Ended without an exit status (it never started: bad image, ...): reported
            # like a refused start, with the runtime's reason.
            await self._finish(tracked, p.Event(
                seq=0, job=spec.job, attempt=spec.attempt, state="failed",
                message=status.message, finished_at=status.finished_at or now_rfc3339()))
            return
        if status.state in ("running", "exited") and not tracked.running_reported:
            tracked.started_at = status.started_at or now_rfc3339()
            self._report(p.Event(seq=0, job=spec.job, attempt=spec.attempt, state="running",
                                 started_at=tracked.started_at))
            tracked.running_reported = True
            self._persist(tracked)
        if status.state == "exited":
            assert tracked.handle is not None
            try:
                logs = await self.runtime.logs(tracked.handle, spec.logs_tail)
            except RuntimeUnavailable:
                logs = ""
            exit_code = status.exit_code
            if status.extra.get("dead") and not exit_code:
                exit_code = 255  # a dead container never ended well, whatever it reports
            await self._finish(tracked, p.Event(
                seq=0, job=spec.job, attempt=spec.attempt, state="exited",
                exit_code=exit_code, oom=status.oom,
                started_at=status.started_at or tracked.started_at,
                finished_at=status.finished_at or now_rfc3339(), logs=logs,
                message=status.message))
        elif status.state == "missing":
            await self._finish(tracked, p.Event(
                seq=0, job=spec.job, attempt=spec.attempt, state="lost",
                message=f"workload {spec.name} disappeared from the runtime"))
        elif status.state == "unknown":
            log.warning("unmapped workload state jid=%s name=%s message=%s", spec.jid,
                        spec.name, status.message)

    async def _finish(self, tracked: Tracked, event: p.Event) -> None:
        """Report a final event, then forget the attempt (the event is durable first)."""
        self._report(event)
        if self.active.get(tracked.spec.job) is tracked:
            del self.active[tracked.spec.job]
        if tracked.handle is not None:
            self._finished[(tracked.spec.job, tracked.spec.attempt)] = tracked.handle
            while len(self._finished) > FINISHED_KEPT:
                self._finished.popitem(last=False)
        self._unrecord(tracked.spec.job)
        log.info("job ended jid=%s name=%s attempt=%s state=%s exit_code=%s", tracked.spec.jid,
                 tracked.spec.name, tracked.spec.attempt, event.state, event.exit_code)

    async def _drop(self, tracked: Tracked, *, remove_workload: bool) -> None:
        if self.active.get(tracked.spec.job) is tracked:
            del self.active[tracked.spec.job]
        self._unrecord(tracked.spec.job)
        handle = tracked.handle
        if tracked.spec.op is not None:
            self.op_runner.kill(tracked.spec, tracked.op_child)  # its task then forgets it
        if remove_workload and handle is not None and handle.runtime != BUILTIN:
            try:
                await self.runtime.remove(handle, force=True)
            except RuntimeUnavailable as exc:
                log.warning("remove failed name=%s error=%s", tracked.spec.name, exc)
        self._report(p.Event(seq=0, job=tracked.spec.job, attempt=tracked.spec.attempt,
                             state="removed"))

    def _report(self, event: p.Event) -> None:
        self.outbox.enqueue(event)
        self.on_event()

    async def _watch_changes(self) -> None:
        while True:
            try:
                async for job in self.runtime.changes():
                    tracked = self.active.get(job)
                    if tracked is not None:
                        self._spawn(self.check([tracked]), f"check-{job}")
            except RuntimeUnavailable as exc:
                log.info("runtime event stream ended error=%s", exc)
            await asyncio.sleep(self.poll_interval)

    def _mount_through_link(self, spec: p.JobSpec) -> str | None:
        """Why a mount of ``spec`` must not be made: a symbolic link on the way to its
        source, which the engine would follow out of the storeBase (pfcon followed
        it)."""
        for mount in spec.mounts:
            link = first_link(self.storebase_mount, mount.source)
            if link is not None:
                return (f"refusing to mount {mount.source!r} at {mount.target}: "
                        f"{link!r} is a symbolic link")
        return None

    def _record_path(self, job: str) -> Path:
        return self.jobs_dir / f"{job}.json"

    def _persist(self, tracked: Tracked) -> OSError | None:
        """Write the attempt's record; on failure (a full disk) the older record stays,
        which a restart copes with (starts are idempotent), and the failure is returned."""
        try:
            self._records.replace(self._record_path(tracked.spec.job),
                                  tracked.to_json().encode())
        except OSError as exc:
            log.error("cannot write job record, the older one stays path=%s error=%s",
                      self._record_path(tracked.spec.job), exc)
            return exc
        return None

    def _unrecord(self, job: str) -> None:
        try:
            self._record_path(job).unlink(missing_ok=True)
        except OSError as exc:  # a read-only state disk: reporting goes on
            log.error("cannot delete job record path=%s error=%s", self._record_path(job), exc)
