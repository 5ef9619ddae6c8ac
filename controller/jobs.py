"""pfcon's job semantics over the store: submit with its validation order, idempotent
re-POST, ordering guards, status, removal.  Shared by the v6 resources and the
legacy ``/jobs/`` API, so both behave identically.

Each POST for one workload name is serialised by a lock, so two concurrent
submits of the same jid cannot both create a job (pfcon races here; we do not).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from controller import compute, placement
from controller.config import Config
from controller.errors import ApiError, BadRequest, Conflict, NotFound
from controller.fleet import Fleet, request_of
from controller.ids import new_id
from controller.states import RERUN_STATUSES, TERMINAL, State, pfcon_status
from controller.storage import inline, modes, zipmode
from controller.storage.paths import StorageError, key_dir
from controller.store import JobRow, Store

log = logging.getLogger("pfleet.controller.jobs")

T = TypeVar("T")

BAD_REQUEST_GENERIC = ("The browser (or proxy) sent a request that this server could not "
                       "understand.")
ENV_RULE = 'env: must be a list of "key=value" strings'
NO_COPY = ("No copy job found. A copy job must complete successfully before scheduling a "
           "plugin job.")
COPY_NOT_DONE = ("Copy job has not completed successfully (status: {status}). Run the copy "
                 "job first.")
DELETE_WAIT = 10.0  # seconds a DELETE waits for the agent to remove the workload, as pfcon does
NO_PLUGIN = ("No plugin job found. A plugin job must complete before scheduling an upload "
             "job.")
PLUGIN_NOT_DONE = ("Plugin job has not completed yet (status: {status}). The plugin job must "
                   "finish before uploading.")
DELETE_ANSWER_WAIT = 0.5  # seconds a delete POST waits for its job to end
SIBLING_ACTIVE = ("The {kind} job is still active (status: {status}). All jobs must finish "
                  "before scheduling a delete job.")


class JobService:
    def __init__(self, config: Config, store: Store, fleet: Fleet) -> None:
        self.config = config
        self.store = store
        self.fleet = fleet
        self._locks: dict[str, asyncio.Lock] = {}
        self._lock_users: dict[str, int] = {}
        self._inline_gate = inline.InlineGate(config.storebase_mount)

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

    async def run_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
        except StorageError as exc:
            raise ApiError(str(exc), exc.status) from None

    def _stage_inline(self, storebase: Path, jid: str,
                      upload: zipmode.ZipUpload) -> dict[str, Any] | None:
        """``zipmode.stage_small_upload`` on the loop, timed for the gate."""
        started = time.monotonic()
        try:
            return zipmode.stage_small_upload(storebase, jid, upload)
        except StorageError as exc:
            raise ApiError(str(exc), exc.status) from None
        finally:
            self._inline_gate.record(time.monotonic() - started)

    def new_upload(self) -> zipmode.ZipUpload:
        """A ``data_file`` receiver for this controller's limits."""
        config = self.config
        return zipmode.ZipUpload(config.storebase_mount, config.state_dir / "uploads",
                                 max_files=config.max_files,
                                 max_bytes=config.max_upload_mb << 20)

    # ------------------------------------------------------------------ views

    async def find(self, kind: str, jid: str) -> JobRow | None:
        return await self.store.get_live(compute.runtime_name(kind, jid))

    async def status(self, kind: str, jid: str) -> dict[str, Any]:
        job = await self.find(kind, jid)
        if job is None:
            raise NotFound(f"No such job: {compute.runtime_name(kind, jid)}")
        return compute.compute_object(job, self.fleet.logs_for(job))

    def current(self, job: JobRow) -> dict[str, Any]:
        return compute.compute_object(job, self.fleet.logs_for(job))

    async def existing(self, kind: str, jid: str) -> tuple[JobRow | None, bool]:
        """The live job of this name and whether a new POST must start a new
        attempt of it (its pfcon status is finishedWithError or undefined)."""
        job = await self.find(kind, jid)
        if job is None:
            return None, False
        return job, pfcon_status(job.state) in RERUN_STATUSES

    async def check_fits(self, spec: dict[str, Any]) -> None:
        """Refuse at submit a job no known agent could ever run."""
        req = request_of(JobRow(id="", seq=0, name="", jid="", kind="", state=State.QUEUED,
                                attempt=0, agent=None, spec=spec, image="", cmd=""))
        reason = placement.never_fits(req, self.fleet.known_views(), self.fleet.selector)
        if reason:
            raise BadRequest(reason)

    # ---------------------------------------------------------------- submits

    async def submit_plugin(self, fields: dict[str, Any], upload: zipmode.ZipUpload | None, *,
                            legacy: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
        """pfcon-api.md §1.5; returns (data, compute) for the 201 answer."""
        config = self.config
        storage = config.storage_env
        input_dirs = fields.get("input_dirs") or []
        output_dir = fields.get("output_dir")
        # Validation, first failure wins (pfcon's order).
        if config.innetwork:
            if (storage == "filesystem" or legacy) and not input_dirs:
                raise BadRequest("input_dirs: field is required")
            if not output_dir:
                raise BadRequest("output_dir: field is required")
        elif upload is None:
            raise BadRequest(BAD_REQUEST_GENERIC)
        if not fields["entrypoint"]:
            raise BadRequest("entrypoint: cannot be empty")
        if any("=" not in e for e in fields["env"]):
            raise BadRequest(ENV_RULE)
        jid = fields["jid"]
        storebase = config.storebase_mount
        input_dir = output_rel = None
        if config.innetwork:
            try:
                output_rel = modes.checked(storebase, output_dir or "", "output_dir")
                input_dirs = [modes.checked(storebase, d, "input_dirs") for d in input_dirs]
            except StorageError as exc:
                raise BadRequest(str(exc)) from None
            input_dir = input_dirs[0] if input_dirs else None
        async with self.locked(jid):
            existing, rerun = await self.existing("plugin", jid)
            if existing is not None and not rerun:
                return {}, self.current(existing)
            if not legacy and storage in ("fslink", "swift") and config.innetwork:
                await self._guard_copy(jid)
            command = compute.plugin_command(fields["entrypoint"], fields["args"],
                                             fields["args_path_flags"], fields["type"])
            mounts = (modes.plugin_mounts(storage, jid, input_dir, output_rel)
                      if config.innetwork else zipmode.plugin_mounts(jid))
            spec = {"image": fields["image"], "command": command, "env": fields["env"],
                    "cpu_limit": fields["cpu_limit"], "memory_limit": fields["memory_limit"],
                    "gpu_limit": fields["gpu_limit"],
                    "number_of_workers": fields["number_of_workers"],
                    "mounts": [m.__dict__ for m in mounts]}
            await self.check_fits(spec)
            data = await self._plugin_data(jid, upload, input_dir)
            job = await self.create(kind="plugin", jid=jid, spec=spec, image=fields["image"],
                                    cmd=compute.command_string(command), rerun=existing)
            return data, compute.compute_object(job, "")

    async def _plugin_data(self, jid: str, upload: zipmode.ZipUpload | None,
                           input_dir: str | None) -> dict[str, Any]:
        config = self.config
        storebase = config.storebase_mount
        if not config.innetwork:
            assert upload is not None
            if self._inline_gate.is_open() and upload.can_stage_inline():
                data = self._stage_inline(storebase, jid, upload)
                if data is not None:
                    return data
            return await self.run_blocking(zipmode.stage_zip_inputs, storebase, jid, upload)
        if config.storage_env == "filesystem":
            rel = input_dir or ""
            nfiles = await self.run_blocking(modes.count_input_files, storebase, rel)
            return modes.data_object(jid, nfiles, storebase / rel)
        if config.storage_env == "swift":
            await self.run_blocking(modes.prepare_swift_outputs, storebase, jid)
        return {}

    async def _guard_copy(self, jid: str) -> None:
        copy = await self.find("copy", jid)
        if copy is None:
            raise Conflict(NO_COPY)
        status = pfcon_status(copy.state)
        if status != "finishedSuccessfully":
            raise Conflict(COPY_NOT_DONE.format(status=status))

    async def submit_copy(self, fields: dict[str, Any]) -> dict[str, Any]:
        """pfcon-api.md §1.6 (for in-network fslink and swift)."""
        config = self.config
        jid = fields["jid"]
        try:
            output_dir = modes.checked(config.storebase_mount, fields["output_dir"], "output_dir")
            input_dirs = [modes.checked(config.storebase_mount, d, "input_dirs")
                          for d in fields["input_dirs"]]
        except StorageError as exc:
            raise BadRequest(str(exc)) from None
        name = compute.runtime_name("copy", jid)
        async with self.locked(name):
            existing, rerun = await self.existing("copy", jid)
            if existing is not None and not rerun:
                return self.current(existing)
            op = modes.copy_op(config, jid, input_dirs, output_dir)
            spec = self._op_spec(op, ["copy", *input_dirs], fields)
            await self.check_fits(spec)
            params = {"jid": jid, "storage_env": config.storage_env, "input_dirs": input_dirs,
                      "output_dir": output_dir}
            await self.run_blocking(lambda: modes.write_params(
                config.storebase_mount, jid, "job_params.json", params, create=True))
            job = await self.create(kind="copy", jid=jid, spec=spec, image="",
                                    cmd=compute.command_string(spec["command"]), rerun=existing)
            return compute.compute_object(job, "")

    async def submit_upload(self, fields: dict[str, Any]) -> dict[str, Any]:
        """pfcon-api.md §1.7 (for in-network swift)."""
        config = self.config
        jid = fields["jid"]
        job_output_path = fields["job_output_path"].lstrip("/")
        plugin = await self.find("plugin", jid)
        if plugin is None:
            raise Conflict(NO_PLUGIN)
        status = pfcon_status(plugin.state)
        if status not in ("finishedSuccessfully", "finishedWithError"):
            raise Conflict(PLUGIN_NOT_DONE.format(status=status))
        name = compute.runtime_name("upload", jid)
        async with self.locked(name):
            existing, rerun = await self.existing("upload", jid)
            if existing is not None and not rerun:
                return self.current(existing)
            op = modes.upload_op(config, jid, job_output_path)
            spec = self._op_spec(op, ["upload", job_output_path], fields)
            await self.check_fits(spec)
            params = {"jid": jid, "job_output_path": job_output_path,
                      "storage_env": config.storage_env}
            await self.run_blocking(lambda: modes.write_params(
                config.storebase_mount, jid, "upload_params.json", params, create=False))
            job = await self.create(kind="upload", jid=jid, spec=spec, image="",
                                    cmd=compute.command_string(spec["command"]), rerun=existing)
            return compute.compute_object(job, "")

    async def submit_delete(self, fields: dict[str, Any]) -> dict[str, Any]:
        """pfcon-api.md §1.8: remove ``key-<jid>`` once every sibling job ended."""
        jid = fields["jid"]
        key = key_dir(self.config.storebase_mount, jid)
        if not await self.run_blocking(key.is_dir):
            return compute.skipped_object(jid, "deleteSkipped")
        for kind in ("copy", "plugin", "upload"):
            job = await self.find(kind, jid)
            status = pfcon_status(job.state) if job is not None else ""
            if status in ("started", "notStarted"):
                raise Conflict(SIBLING_ACTIVE.format(kind=kind, status=status))
        async with self.locked(compute.runtime_name("delete", jid)):
            existing, rerun = await self.existing("delete", jid)
            if existing is not None and not rerun:
                return self.current(existing)
            spec = self._op_spec(modes.delete_op(jid), ["delete", key.name], fields)
            await self.check_fits(spec)
            job = await self.create(kind="delete", jid=jid, spec=spec, image="",
                                    cmd=compute.command_string(spec["command"]), rerun=existing)
        # Removing a directory is usually done in well under a second: answer with the
        # final state when it is, sparing the client a round of polling.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(DELETE_ANSWER_WAIT):
                job = await self.wait_final("delete", jid)
        return compute.compute_object(job, "" if not job.terminal else job.logs)

    @staticmethod
    def _op_spec(op: dict[str, Any], command: list[str], fields: dict[str, Any]) -> dict[str, Any]:
        return {"image": "", "command": command, "env": [], "cpu_limit": fields["cpu_limit"],
                "memory_limit": fields["memory_limit"], "gpu_limit": 0,
                "number_of_workers": 1, "mounts": [], "op": op}

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
                id=new_id(), seq=0, name=compute.runtime_name(kind, jid), jid=jid,
                kind=kind, state=State.QUEUED, attempt=1, agent=None, spec=spec, image=image,
                cmd=cmd, message="queued"))
        log.info("job submitted jid=%s name=%s kind=%s attempt=%s", jid, job.name, kind,
                 job.attempt)
        self.fleet.kick()
        return job

    async def remove(self, kind: str, jid: str) -> bool:
        """A client's DELETE: hide the job and remove its workload (kills it if it
        still runs).  Returns whether a job existed; REMOVE_JOBS=false keeps all."""
        name = compute.runtime_name(kind, jid)
        async with self.locked(name):
            job = await self.store.get_live(name)
            if job is None:
                return False
            if not self.config.remove_jobs:
                return True
            removed = await self.store.mark_removed(job.id)
            if removed is not None:
                try:
                    await self.fleet.remove_workload(removed, wait=DELETE_WAIT)
                except (TimeoutError, ConnectionResetError) as exc:
                    # the agent finishes it later, or its reconcile does
                    log.warning("job removal not confirmed jid=%s name=%s reason=%s", jid,
                                name, exc or "timeout")
                self.fleet.kick()
            log.info("job removed jid=%s name=%s", jid, name)
            return True

    async def wait_final(self, kind: str, jid: str) -> JobRow:
        """Wait until the job of this name reaches a final state (the legacy API's
        synchronous steps); callers bound it with ``asyncio.timeout``."""
        while True:
            job = await self.find(kind, jid)
            if job is None:
                raise NotFound(f"No such job: {compute.runtime_name(kind, jid)}")
            if job.state in TERMINAL:
                return job
            await self.fleet.wait_for_change(job.id, 1.0)


JOBS = web.AppKey("pfleet.jobs", JobService)
