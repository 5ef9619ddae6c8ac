"""pfcon's job semantics over the store: submit, idempotent re-POST, guards, status,
removal.  Shared by the v6 resources and (later) the legacy ``/jobs/`` API.

Each POST for one workload name is serialised by a lock, so two concurrent
submits of the same jid cannot both create a job (pfcon races here; we do not).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from aiohttp import web

from controller import compute, placement
from controller.config import Config
from controller.errors import BadRequest, Conflict, NotFound
from controller.fleet import Fleet, request_of
from controller.states import RERUN_STATUSES, State, pfcon_status
from controller.store import JobRow, Store

log = logging.getLogger("pfleet.controller.jobs")

GUARD_LABELS = {"copy": "copy", "plugin": "plugin", "upload": "upload"}


class JobService:
    def __init__(self, config: Config, store: Store, fleet: Fleet) -> None:
        self.config = config
        self.store = store
        self.fleet = fleet
        self._locks: dict[str, asyncio.Lock] = {}
        self._lock_users: dict[str, int] = {}

    @asynccontextmanager
    async def locked(self, name: str) -> AsyncIterator[None]:
        lock = self._locks.setdefault(name, asyncio.Lock())
        self._lock_users[name] = self._lock_users.get(name, 0) + 1
        try:
            async with lock:
                yield
        finally:
            self._lock_users[name] -= 1
            if not self._lock_users[name]:
                del self._lock_users[name], self._locks[name]

    # ------------------------------------------------------------------ views

    async def find(self, kind: str, jid: str) -> JobRow | None:
        return await self.store.get_live(compute.runtime_name(kind, jid))

    async def status(self, kind: str, jid: str) -> dict[str, Any]:
        job = await self.find(kind, jid)
        if job is None:
            raise NotFound(f"No such job: {compute.runtime_name(kind, jid)}")
        return compute.compute_object(job, self.fleet.logs_for(job))

    async def existing(self, kind: str, jid: str) -> tuple[JobRow | None, bool]:
        """The live job of this name and whether a new POST must start a new
        attempt of it (its pfcon status is finishedWithError or undefined)."""
        job = await self.find(kind, jid)
        if job is None:
            return None, False
        return job, pfcon_status(job.state) in RERUN_STATUSES

    async def check_fits(self, req: placement.Request) -> None:
        """Refuse at submit a job no known agent could ever run."""
        views = self.fleet.known_views_for_refusal(await self.store.agents())
        reason = placement.never_fits(req, views, self.fleet.selector)
        if reason:
            raise BadRequest(reason)

    async def guard_active_siblings(self, jid: str) -> None:
        """pfcon's delete guard: no copy, plugin or upload job may still be active."""
        for kind in ("copy", "plugin", "upload"):
            job = await self.find(kind, jid)
            if job is None:
                continue
            status = pfcon_status(job.state)
            if status in ("started", "notStarted"):
                raise Conflict(f"The {GUARD_LABELS[kind]} job is still active (status: "
                               f"{status}). All jobs must finish before scheduling a delete job.")

    # ---------------------------------------------------------------- writes

    async def create(self, *, kind: str, jid: str, spec: dict[str, Any], image: str,
                     cmd: str, rerun: JobRow | None) -> JobRow:
        """Record a new job (or a new attempt of ``rerun``) and wake the dispatcher."""
        if rerun is not None:
            old_attempt = rerun.attempt
            job = await self.store.restart_job(rerun.id, spec, image, cmd)
            await self.fleet.remove_workload(rerun, old_attempt)
        else:
            job = await self.store.insert_job(JobRow(
                id=uuid.uuid4().hex, seq=0, name=compute.runtime_name(kind, jid), jid=jid,
                kind=kind, state=State.QUEUED, attempt=1, agent=None, spec=spec, image=image,
                cmd=cmd, message="queued"))
        log.info("job submitted jid=%s name=%s kind=%s attempt=%s", jid, job.name, kind,
                 job.attempt)
        self.fleet.kick()
        return job

    async def remove(self, kind: str, jid: str) -> None:
        """A client's DELETE: hide the job and remove its workload (kills it if it
        still runs).  Missing jobs are fine; REMOVE_JOBS=false keeps everything."""
        if not self.config.remove_jobs:
            return
        name = compute.runtime_name(kind, jid)
        async with self.locked(name):
            job = await self.store.get_live(name)
            if job is None:
                return
            removed = await self.store.mark_removed(job.id)
            if removed is not None:
                await self.fleet.remove_workload(removed)
                self.fleet.kick()
            log.info("job removed jid=%s name=%s", jid, name)

    async def run_blocking(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    def spool_dir(self) -> Path:
        return self.config.state_dir / "uploads"

    @staticmethod
    def fits_request(spec: dict[str, Any]) -> placement.Request:
        return request_of(JobRow(id="", seq=0, name="", jid="", kind="", state=State.QUEUED,
                                 attempt=0, agent=None, spec=spec, image="", cmd=""))


JOBS = web.AppKey("pfleet.jobs", JobService)
