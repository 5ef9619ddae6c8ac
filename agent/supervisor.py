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

Removal on request (the controller's Remove) is durable too: a small marker
``<state>/jobs/removing/<job>.<attempt>.json`` is written before the job record is
deleted, and deleted only once the workload is gone and ``removed`` is in the
outbox.  A ``kill -9`` or an engine that is down in between therefore leaves a
marker, not a workload nothing points at: the agent retries it on every poll and
after a restart.  A separate marker (not a flag in the job record) because a newer
attempt of the same job takes over ``jobs/<job>.json`` while the older one may
still await its removal.  Unreadable records are moved to ``jobs/damaged/`` for an
operator (the newest ``DAMAGED_KEPT``), not deleted.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import protocol as p
from agent.durable import DurableWriter
from agent.fstree import first_link
from agent.op_runner import ChildRef, OpRunner
from agent.outbox import Outbox
from agent.removals import PendingRemovals, Removal
from agent.runtimes.base import Handle, JobRejected, JobStatus, Runtime, RuntimeUnavailable

log = logging.getLogger("pfleet.agent.supervisor")

START_RETRY_SECONDS = 5.0
BUILTIN = "builtin"
FINISHED_KEPT = 4096  # handles of ended attempts remembered for their removal
DAMAGED_KEPT = 32  # unreadable records kept in jobs/damaged/ for an operator
STRAYS_NAMED = 20  # workloads without a record named in the startup log line


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
        self.removing_dir = self.jobs_dir / "removing"  # made at its first marker
        self.damaged_dir = self.jobs_dir / "damaged"
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
        # Attempts that ended here or were removed on request (the last FINISHED_KEPT):
        # a run of one again is a duplicate, never a new start (a run that crossed a
        # removal or a reconcile on the way here).
        self._over: collections.OrderedDict[tuple[str, int], None] = collections.OrderedDict()
        self.on_event: Callable[[], None] = lambda: None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._check_lock = asyncio.Lock()
        self._removals = PendingRemovals(self.removing_dir, self._records, self._set_aside)
        self._removals_lock = asyncio.Lock()
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
                self._set_aside(path, exc)
                continue
            self.active[tracked.spec.job] = tracked
        self._load_removals()
        for tmp in [*self.jobs_dir.glob("*.tmp"), *self.removing_dir.glob("*.tmp")]:
            tmp.unlink(missing_ok=True)
        self.op_runner.prune(t.spec for t in self.active.values() if t.spec.op is not None)
        try:
            listed: list[Handle] = await self.runtime.list_ours()
        except RuntimeUnavailable as exc:
            log.warning("runtime unavailable at startup, will retry error=%s", exc)
            listed = []
        self._log_strays(listed)
        if self._removals:
            self._spawn(self.finish_removals(), "removals")
        found = {h.job: h for h in listed
                 if h.job in self.active and h.attempt == self.active[h.job].spec.attempt}
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
            if self._removals:  # the engine may answer again
                await self.finish_removals()

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
        if (spec.job, spec.attempt) in self._removals or (spec.job, spec.attempt) in self._over:
            return  # removed on request, or already ended here: never started again
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
        self._is_over(job, attempt)
        tracked = self.active.get(job)
        if tracked is not None and tracked.spec.attempt == attempt:
            await self._drop(tracked, remove_workload=True)
            return
        pending = self._removals.get((job, attempt))
        if pending is not None:  # asked again: try now rather than at the next poll
            if await self._remove_workload(pending):
                self._settle(pending)
            return
        if not self.remove_jobs:
            return
        known = self._finished.pop((job, attempt), None)
        if known is not None and known.runtime == BUILTIN:
            return  # an operation leaves no workload behind
        # No record points at an ended attempt any more: only a failure is written
        # down (a kill -9 meanwhile leaves it to the controller's reconcile, which
        # sends Remove again for a deleted job's workload in the inventory).
        removal = Removal(job, attempt, name, known, report=False)
        if not await self._remove_workload(removal) and removal.key not in self._removals:
            self._removals.remember(removal)

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
                removal = self._removals.get((spec.job, spec.attempt))
                if removal is None:
                    removal = Removal(spec.job, spec.attempt, spec.name, handle, report=False)
                elif removal.handle is None:
                    removal.handle = handle
                    self._removals.remember(removal)
                if await self._remove_workload(removal):
                    self._settle(removal)
                elif removal.key not in self._removals:
                    self._removals.remember(removal)
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
        self._is_over(tracked.spec.job, tracked.spec.attempt)
        if self.active.get(tracked.spec.job) is tracked:
            del self.active[tracked.spec.job]
        if tracked.handle is not None:
            self._finished[(tracked.spec.job, tracked.spec.attempt)] = tracked.handle
            while len(self._finished) > FINISHED_KEPT:
                self._finished.popitem(last=False)
        self._unrecord(tracked.spec.job)
        log.info("job ended jid=%s name=%s attempt=%s state=%s exit_code=%s", tracked.spec.jid,
                 tracked.spec.name, tracked.spec.attempt, event.state, event.exit_code)

    def _is_over(self, job: str, attempt: int) -> None:
        self._over[(job, attempt)] = None
        while len(self._over) > FINISHED_KEPT:
            self._over.popitem(last=False)

    async def _drop(self, tracked: Tracked, *, remove_workload: bool) -> None:
        spec = tracked.spec
        if self.active.get(spec.job) is tracked:
            del self.active[spec.job]
        removal = None
        if remove_workload and spec.op is None:
            # Written before the record goes: see the module docstring.
            removal = Removal(spec.job, spec.attempt, spec.name, tracked.handle, report=True)
            self._removals.remember(removal)
        self._unrecord(spec.job)
        if spec.op is not None:
            self.op_runner.kill(spec, tracked.op_child)  # its task then forgets it
        if removal is None:
            self._report(p.Event(seq=0, job=spec.job, attempt=spec.attempt, state="removed"))
        elif await self._remove_workload(removal):
            self._settle(removal)

    # ------------------------------------------------------------- removals

    async def finish_removals(self) -> None:
        """Retry the removals the runtime could not do yet (or a restart interrupted)."""
        async with self._removals_lock:
            for removal in list(self._removals.values()):
                if self._removals.get(removal.key) is removal \
                        and await self._remove_workload(removal):
                    self._settle(removal)

    async def _remove_workload(self, removal: Removal) -> bool:
        """Remove the workload (found by listing when no handle is known); False when
        the runtime cannot be asked now."""
        try:
            if removal.handle is None:
                for handle in await self.runtime.list_ours():
                    if (handle.job, handle.attempt) == removal.key:
                        await self.runtime.remove(handle, force=True)
            elif removal.handle.runtime != BUILTIN:
                await self.runtime.remove(removal.handle, force=True)
        except RuntimeUnavailable as exc:
            removal.failures += 1
            log.log(logging.WARNING if removal.failures == 1 else logging.DEBUG,
                    "remove failed, retried while the runtime is unavailable name=%s "
                    "attempt=%s error=%s", removal.name, removal.attempt, exc)
            return False
        log.info("removed workload name=%s attempt=%s", removal.name, removal.attempt)
        return True

    def _settle(self, removal: Removal) -> None:
        """The workload is gone: report ``removed`` (once), then forget the marker."""
        if self._removals.get(removal.key) is not removal:
            return  # never written down, or settled meanwhile by a concurrent removal
        del self._removals[removal.key]
        if removal.report and not (removal.restored and self._removed_queued(removal)):
            self._report(p.Event(seq=0, job=removal.job, attempt=removal.attempt,
                                 state="removed"))
        # After the event is in the outbox, with no await in between: a kill -9 here
        # leaves a marker whose `removed` is already queued (``_removed_queued``).
        self._removals.unmark(removal)

    def _removed_queued(self, removal: Removal) -> bool:
        return any(e.job == removal.job and e.attempt == removal.attempt
                   and e.state == "removed" for e in self.outbox.pending())

    def _load_removals(self) -> None:
        for removal in self._removals.load():
            tracked = self.active.get(removal.job)
            if tracked is not None and tracked.spec.attempt == removal.attempt:
                # Killed between the marker and the record's deletion: finish that.
                del self.active[removal.job]
                self._unrecord(removal.job)

    def _log_strays(self, listed: list[Handle]) -> None:
        """Name the workloads no record points at.  They are left alone: an ended
        attempt's workload stays until the controller removes it (kept for good with
        REMOVE_JOBS=false), and only the controller knows which jobs were deleted;
        its reconcile on connect sends Remove for those in the inventory."""
        known = set(self._removals) | {(t.spec.job, t.spec.attempt)
                                       for t in self.active.values()}
        strays = sorted(h.name for h in listed if (h.job, h.attempt) not in known)
        if strays:
            more = len(strays) - STRAYS_NAMED
            log.info("workloads without a job record, left to the controller's reconcile "
                     "count=%d names=%s%s", len(strays), ",".join(strays[:STRAYS_NAMED]),
                     f" (and {more} more)" if more > 0 else "")

    def _set_aside(self, path: Path, error: Exception) -> None:
        """Move an unreadable record out of the way for an operator, keeping only the
        newest ``DAMAGED_KEPT`` (names start with the UTC time they were set aside)."""
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        target = self.damaged_dir / f"{stamp}-{path.parent.name}-{path.name}"
        try:
            self.damaged_dir.mkdir(exist_ok=True)
            os.replace(path, target)
        except OSError as exc:
            log.error("dropping unreadable record, cannot set it aside path=%s error=%s "
                      "move_error=%s", path, error, exc)
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
            return
        log.error("set aside unreadable record path=%s moved_to=%s error=%s", path, target,
                  error)
        with contextlib.suppress(OSError):
            for old in sorted(self.damaged_dir.iterdir())[:-DAMAGED_KEPT]:
                old.unlink(missing_ok=True)

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
