"""The SLURM runtime: an agent on a login node submits one batch job per attempt.

What this module promises (see ``base.Runtime`` for the contract):

* Every SLURM command is an asyncio subprocess with a deadline
  (``agent.runtimes.slurm_cli``): a dead ``slurmctld`` makes ``probe()`` unhealthy
  with the reason and the other calls raise ``RuntimeUnavailable``; jobs are never
  failed because SLURM did not answer.
* A job is named after ``spec.name`` and its ``--comment`` names the agent, job and
  attempt, so ``list_ours()`` finds it again after an agent restart; ``start`` is
  idempotent on (name, attempt): the ``.jobid`` file, then ``squeue``, are asked
  before anything is submitted.
* State comes from ``squeue`` (slurmctld keeps finished jobs for ``MinJobAge``),
  then ``sacct``, then ``sacct -c`` (the jobcomp file, when accounting is off),
  then the result file the batch script leaves (``agent.runtimes.slurm_state``).
* ``changes()`` polls ``squeue`` for the jobs it watches at an adaptive pace: every
  ``FAST_POLL`` seconds just after a submission, ``ACTIVE_POLL`` while a job is
  pending or changed lately, ``STEADY_POLL`` otherwise; ``status()`` reuses an
  answer younger than ``SNAPSHOT_TTL``.
* Logs are the tail of the job's output file, which lives in the work directory
  (``PFLEET_SLURM_WORK_DIR``): the compute nodes must see it at the same path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from agent.protocol import JobSpec
from agent.runtimes.base import (
    Capabilities,
    Handle,
    JobRejected,
    JobStatus,
    Probe,
    Runtime,
    RuntimeUnavailable,
)
from agent.runtimes.keyed_locks import KeyedLocks
from agent.runtimes.slurm_cli import CommandResult, SlurmCli, SlurmCommandError
from agent.runtimes.slurm_config import SlurmSettings
from agent.runtimes.slurm_files import (
    make_dir,
    prepare_files,
    read_text,
    script_image,
    tail_bytes,
    tail_lines,
    unlink_all,
    write_text,
)
from agent.runtimes.slurm_script import (
    JobFiles,
    image_path,
    job_files,
    parse_comment,
    render_batch_script,
)
from agent.runtimes.slurm_state import (
    SACCT_FIELDS,
    SINFO_FORMAT,
    SQUEUE_FORMAT,
    SlurmJob,
    capacity,
    launch_failure,
    parse_result,
    parse_sacct,
    parse_sinfo,
    parse_squeue,
    result_status,
    to_status,
)

__all__ = ["SlurmRuntime", "SlurmSettings"]

log = logging.getLogger("pfleet.agent.slurm")

FAST_POLL = 0.05  # s between squeue calls for FAST_WINDOW s after a submission
FAST_WINDOW = 2.0  # sbatch -> RUNNING takes about 0.5 s on an idle cluster
ACTIVE_POLL = 0.25  # while a watched job is pending, or changed state within ACTIVE_WINDOW
ACTIVE_WINDOW = 10.0
STEADY_POLL = 2.0  # otherwise (the supervisor's own poll comes on top)
SNAPSHOT_TTL = 0.1  # s an squeue answer is reused by status()
PROBE_TIMEOUT = 5.0  # s sinfo may take in probe() (at most the command timeout)
SQUEUE_CHUNK = 500  # job ids per squeue call
TAIL_BYTES = 1 << 20  # most bytes read from the end of an output file for logs
FAILURE_TAIL_BYTES = 8192  # bytes read to explain a launcher failure

# sbatch complaints that a retry can cure (the controller is busy, down or unreachable).
TRANSIENT_MARKERS = ("unable to contact slurm controller", "socket timed out",
                     "temporarily unable", "zero bytes were transmitted",
                     "communication connection failure", "connection refused",
                     "slurm_receive_msg", "try again", "maxsubmit", "not responding")
# scancel complaints that mean "nothing left to cancel".
GONE_MARKERS = ("already completing or completed", "invalid job id", "job has finished")


@dataclass
class _Watched:
    job: str
    state: str
    changed_at: float


class SlurmRuntime(Runtime):
    """Runs each job attempt as one SLURM batch job (see the module docstring).

    Construction does no I/O (slurmctld may be down when the agent starts); it
    raises ``ValueError`` naming every bad setting.
    """

    name = "slurm"

    def __init__(self, settings: SlurmSettings, *, env: dict[str, str] | None = None) -> None:
        problems = settings.validate()
        if problems:
            raise ValueError("slurm runtime settings: " + "; ".join(problems))
        self.settings = settings
        self.cli = SlurmCli(settings.command_timeout, settings.max_concurrency, env)
        self._uid = os.getuid()
        self._watch: dict[str, _Watched] = {}  # SLURM job id -> what changes() last saw
        self._last_submit = 0.0
        self._wake = asyncio.Event()
        self._snapshot: tuple[float, frozenset[str], dict[str, SlurmJob]] | None = None
        self._accounting = True  # False once sacct said accounting storage is disabled
        self._capacity = (0, 0, 0)  # the last healthy probe's (CPU, memory, GPUs)
        self._start_locks = KeyedLocks()
        self._closed = False

    # ------------------------------------------------------------------ interface

    def capabilities(self) -> Capabilities:
        return Capabilities(multi_worker=True, hard_memory_limit=True, gpus=True)

    async def probe(self) -> Probe:
        """Capacity of the partitions jobs may go to, from ``sinfo``.  Unhealthy keeps
        the last capacity seen: jobs then wait for SLURM instead of being refused at
        submit for want of an agent that could ever run them."""
        probe = await self._probe()
        if probe.health == "healthy":
            self._capacity = (probe.cpu_millicores, probe.memory_mib, probe.gpus)
            return probe
        cpu, memory, gpus = self._capacity
        return Probe(probe.health, probe.reason, cpu_millicores=cpu, memory_mib=memory,
                     gpus=gpus)

    async def _probe(self) -> Probe:
        partitions = self.settings.partitions()
        argv = ["sinfo", "-h", "-N", "-o", SINFO_FORMAT]
        if partitions:
            argv += ["-p", ",".join(partitions)]
        try:
            await asyncio.to_thread(make_dir, self.settings.work_dir)
        except OSError as exc:
            return Probe("unhealthy", reason=f"work directory {self.settings.work_dir}: "
                                             f"{exc.strerror or exc}")
        try:
            result = await self.cli.run(argv, deadline=min(PROBE_TIMEOUT,
                                                           self.settings.command_timeout))
        except SlurmCommandError as exc:
            return Probe("unhealthy", reason=f"slurmctld does not answer: {exc}"
                         if exc.timed_out else str(exc))
        nodes = parse_sinfo(result.stdout)
        cpu, memory, gpus, usable = capacity(nodes, partitions)
        where = (f"partition(s) {', '.join(partitions)}" if partitions
                 else "the default partition")
        if not any(n.partition in partitions if partitions else n.default for n in nodes):
            reason = (f"SLURM has no {where}" if partitions else
                      "SLURM has no default partition: set PFLEET_SLURM_PARTITION")
            return Probe("unhealthy", reason=reason)
        if usable == 0:
            states = sorted({n.state for n in nodes})
            return Probe("unhealthy", reason=f"no usable node in {where} "
                                             f"(states: {', '.join(states)})")
        return Probe("healthy", cpu_millicores=cpu, memory_mib=memory, gpus=gpus)

    async def start(self, spec: JobSpec) -> Handle:
        if not spec.image:
            raise JobRejected("no image given")
        if spec.number_of_workers < 1:
            raise JobRejected(f"number_of_workers must be at least 1, "
                              f"not {spec.number_of_workers}")
        files = job_files(self.settings.work_dir, spec.name, spec.attempt)
        async with self._start_locks.hold(spec.name):  # one start per name at a time
            return await self._start_locked(spec, files)

    async def status(self, handles: list[Handle]) -> dict[str, JobStatus]:
        if not handles:
            return {}
        jobs = await self._squeue([h.native_id for h in handles])
        absent = [h.native_id for h in handles if h.native_id not in jobs]
        if absent:
            jobs.update(await self._history(absent))
        out: dict[str, JobStatus] = {}
        for handle in handles:
            out[handle.job] = await self._status_of(handle, jobs.get(handle.native_id))
        return out

    async def logs(self, handle: Handle, tail: int) -> str:
        if tail <= 0:
            return ""
        path = self._files(handle).output
        try:
            return await asyncio.to_thread(tail_lines, path, tail, TAIL_BYTES)
        except OSError:
            return ""

    async def cancel(self, handle: Handle, grace: float = 10.0) -> None:
        """``scancel``: SLURM sends SIGTERM, then SIGKILL after its ``KillWait`` (the
        cluster's setting, not ``grace``); the docker/podman launchers stop their
        container within ``STOP_GRACE_SECONDS``."""
        log.info("cancel jid=%s job=%s attempt=%d slurm_job=%s", handle.name, handle.job,
                 handle.attempt, handle.native_id)
        await self._scancel(handle.native_id)
        self._touch(handle.native_id)

    async def remove(self, handle: Handle, force: bool = True) -> None:
        if force:
            await self._scancel(handle.native_id)
        else:
            jobs = await self._squeue([handle.native_id])
            job = jobs.get(handle.native_id)
            if job is not None and not job.terminal:
                raise RuntimeUnavailable(f"SLURM job {handle.native_id} is still {job.state}")
        await asyncio.to_thread(unlink_all, self._files(handle).all())
        self._watch.pop(handle.native_id, None)
        log.info("removed jid=%s job=%s attempt=%d slurm_job=%s", handle.name, handle.job,
                 handle.attempt, handle.native_id)

    async def list_ours(self) -> list[Handle]:
        result = await self._cli(["squeue", "-h", "--states=all", "-u", str(self._uid),
                                  "-O", SQUEUE_FORMAT])
        handles = []
        for job in parse_squeue(result.stdout):
            fields = parse_comment(job.comment)
            if fields is None or fields["agent"] != self.settings.agent_name:
                continue
            handle = Handle(self.name, job.job_id, fields["job"], int(fields["attempt"]),
                            job.name, fields.get("kind", "plugin"))
            # A finished job whose files are gone was removed: SLURM merely remembers it.
            if job.terminal and not await asyncio.to_thread(
                    os.path.exists, self._files(handle).jobid):
                continue
            handles.append(handle)
        return sorted(handles, key=lambda h: (h.job, h.attempt))

    async def changes(self) -> AsyncIterator[str]:
        """Job ids whose SLURM state changed, from polling ``squeue`` at the pace the
        module docstring describes.  Ends (the supervisor restarts it) when squeue
        fails."""
        while not self._closed:
            if not self._watch:
                self._wake.clear()
                await self._wake.wait()
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval())
            self._wake.clear()
            ids = list(self._watch)
            jobs = await self._squeue(ids)
            now = time.monotonic()
            for job_id in ids:
                watched = self._watch.get(job_id)
                if watched is None:
                    continue
                job = jobs.get(job_id)
                state = job.state if job is not None else "GONE"
                if state != watched.state:
                    watched.state, watched.changed_at = state, now
                    if job is None or job.terminal:
                        # Nothing more to watch: the supervisor's status() reads the end.
                        self._watch.pop(job_id, None)
                    yield watched.job

    async def close(self) -> None:
        self._closed = True
        self._wake.set()

    # ------------------------------------------------------------------ internals

    async def _start_locked(self, spec: JobSpec, files: JobFiles) -> Handle:
        known = await asyncio.to_thread(read_text, files.jobid)
        if known.strip():
            return self._adopt(spec, known.strip(), "recorded")
        for job, fields in await self._ours_for(spec):
            attempt = int(fields["attempt"])
            if attempt == spec.attempt:
                await self._record_job_id(spec, files, job.job_id)
                return self._adopt(spec, job.job_id, "found in squeue")
            if attempt < spec.attempt and not job.terminal:
                log.info("cancelling older attempt jid=%s attempt=%s slurm_job=%s", spec.jid,
                         attempt, job.job_id)
                await self._scancel(job.job_id)
        if self.settings.launcher == "charliecloud":
            path = image_path(self.settings.image_dir, spec.image)
            if not await asyncio.to_thread(os.path.isdir, path):
                raise JobRejected(f"image not found: {spec.image} (no directory {path})")
        try:
            script = render_batch_script(spec, self.settings, files)
        except ValueError as exc:
            raise JobRejected(str(exc)) from exc
        try:
            await asyncio.to_thread(prepare_files, self.settings.work_dir, files, script)
        except OSError as exc:
            raise RuntimeUnavailable(f"cannot write {files.script}: "
                                     f"{exc.strerror or exc}") from exc
        result = await self._cli(["sbatch", "--parsable", files.script], check=False)
        if result.returncode != 0:
            text = result.error_text
            if any(m in text.lower() for m in TRANSIENT_MARKERS):
                raise RuntimeUnavailable(f"sbatch: {text}")
            await asyncio.to_thread(unlink_all, files.all())
            raise JobRejected(f"sbatch refused the job: {text}")
        job_id = result.stdout.strip().split(";")[0]
        if not job_id.isdigit():
            raise RuntimeUnavailable(f"sbatch printed no job id: {result.stdout.strip()!r}")
        await self._record_job_id(spec, files, job_id)
        self._last_submit = time.monotonic()
        log.info("submitted jid=%s job=%s attempt=%d slurm_job=%s launcher=%s", spec.jid,
                 spec.job, spec.attempt, job_id, self.settings.launcher)
        return self._adopt(spec, job_id, "")

    async def _record_job_id(self, spec: JobSpec, files: JobFiles, job_id: str) -> None:
        try:
            await asyncio.to_thread(write_text, files.jobid, job_id + "\n")
        except OSError as exc:
            # The job exists: report it anyway (the agent persists the handle); a
            # restarted agent still finds it by its comment in squeue.
            log.warning("cannot record the job id jid=%s slurm_job=%s path=%s error=%s",
                        spec.jid, job_id, files.jobid, exc.strerror or exc)

    def _adopt(self, spec: JobSpec, job_id: str, how: str) -> Handle:
        if how:
            log.info("adopted jid=%s attempt=%d slurm_job=%s (%s)", spec.jid, spec.attempt,
                     job_id, how)
        self._watch.setdefault(job_id, _Watched(spec.job, "PENDING", time.monotonic()))
        self._wake.set()
        return Handle(self.name, job_id, spec.job, spec.attempt, spec.name, spec.kind)

    async def _ours_for(self, spec: JobSpec) -> list[tuple[SlurmJob, dict[str, str]]]:
        """This agent's SLURM jobs (any attempt) of ``spec.job``, found by name."""
        result = await self._cli(["squeue", "-h", "--states=all", "-u", str(self._uid),
                                  f"--name={spec.name}", "-O", SQUEUE_FORMAT])
        found = []
        for slurm_job in parse_squeue(result.stdout):
            fields = parse_comment(slurm_job.comment)
            if (fields and fields["agent"] == self.settings.agent_name
                    and fields["job"] == spec.job):
                found.append((slurm_job, fields))
        return found

    async def _status_of(self, handle: Handle, job: SlurmJob | None) -> JobStatus:
        files = self._files(handle)
        if job is None:
            result = parse_result(await asyncio.to_thread(read_text, files.result))
            self._watch.pop(handle.native_id, None)
            if result is not None:
                return result_status(result)
            return JobStatus("missing", message=f"SLURM job {handle.native_id} is unknown to "
                             "squeue, sacct and the jobcomp file, and left no result")
        if not job.terminal:
            watched = self._watch.get(handle.native_id)
            if watched is None:  # re-attached after a restart: follow it from now on
                watched = self._watch[handle.native_id] = _Watched(handle.job, job.state,
                                                                   time.monotonic())
                self._wake.set()
            watched.state = job.state
            return to_status(job, launcher=self.settings.launcher,
                             limited=not self.settings.ignore_limits)
        self._watch.pop(handle.native_id, None)
        result = parse_result(await asyncio.to_thread(read_text, files.result))
        status = to_status(job, result, launcher=self.settings.launcher,
                           limited=not self.settings.ignore_limits)
        if status.exit_code and not status.oom:
            tail = await asyncio.to_thread(tail_bytes, files.output, FAILURE_TAIL_BYTES)
            image = script_image(await asyncio.to_thread(read_text, files.script))
            reason = launch_failure(self.settings.launcher, status.exit_code, tail, image)
            if reason is not None:
                log.warning("launch failed jid=%s slurm_job=%s reason=%s", handle.name,
                            handle.native_id, reason)
                return JobStatus("exited", exit_code=status.exit_code, message=reason,
                                 started_at=status.started_at,
                                 finished_at=status.finished_at,
                                 extra={**status.extra, "failed": True})
        return status

    async def _squeue(self, ids: list[str]) -> dict[str, SlurmJob]:
        """The jobs squeue knows among ``ids`` (finished ones too, for MinJobAge)."""
        wanted = frozenset(ids)
        snapshot = self._snapshot
        if (snapshot is not None and time.monotonic() - snapshot[0] <= SNAPSHOT_TTL
                and wanted <= snapshot[1]):
            return {i: j for i, j in snapshot[2].items() if i in wanted}
        taken = time.monotonic()
        jobs: dict[str, SlurmJob] = {}
        ordered = sorted(wanted, key=int)
        for start in range(0, len(ordered), SQUEUE_CHUNK):
            chunk = ordered[start:start + SQUEUE_CHUNK]
            result = await self._cli(["squeue", "-h", "--states=all", "-j", ",".join(chunk),
                                      "-O", SQUEUE_FORMAT], check=False)
            # One unknown id alone is an error; several unknown ids are just absent.
            if result.returncode != 0 and "invalid job id" not in result.error_text.lower():
                raise RuntimeUnavailable(f"squeue: {result.error_text}")
            jobs.update((j.job_id, j) for j in parse_squeue(result.stdout))
        self._snapshot = (taken, wanted, jobs)
        return {i: j for i, j in jobs.items() if i in wanted}

    async def _history(self, ids: list[str]) -> dict[str, SlurmJob]:
        """Jobs slurmctld has forgotten: accounting (sacct), else the jobcomp file."""
        found: dict[str, SlurmJob] = {}
        base = ["-X", "-n", "-P", "-j", ",".join(ids), "-o", SACCT_FIELDS]
        if self._accounting:
            result = await self._cli(["sacct", *base], check=False)
            if result.returncode == 0:
                found.update((j.job_id, j) for j in parse_sacct(result.stdout))
            elif "accounting storage is disabled" in result.error_text.lower():
                self._accounting = False
            else:
                log.warning("sacct failed error=%s", result.error_text)
        missing = [i for i in ids if i not in found]
        if missing:
            result = await self._cli(["sacct", "-c", *base], check=False)
            if result.returncode == 0:
                found.update((j.job_id, j) for j in parse_sacct(result.stdout, "jobcomp")
                             if j.job_id in missing)
        return found

    async def _scancel(self, job_id: str) -> None:
        result = await self._cli(["scancel", job_id], check=False)
        text = result.error_text.lower()
        if result.returncode != 0 and not any(m in text for m in GONE_MARKERS):
            raise RuntimeUnavailable(f"scancel {job_id}: {result.error_text}")

    async def _cli(self, argv: list[str], *, check: bool = True) -> CommandResult:
        try:
            return await self.cli.run(argv, check=check)
        except SlurmCommandError as exc:
            raise RuntimeUnavailable(str(exc)) from exc

    def _interval(self) -> float:
        now = time.monotonic()
        if now - self._last_submit < FAST_WINDOW:
            return FAST_POLL
        if any(w.state in ("PENDING", "CONFIGURING") or now - w.changed_at < ACTIVE_WINDOW
               for w in self._watch.values()):
            return ACTIVE_POLL
        return STEADY_POLL

    def _touch(self, job_id: str) -> None:
        watched = self._watch.get(job_id)
        if watched is not None:
            watched.changed_at = time.monotonic()
            self._wake.set()

    def _files(self, handle: Handle) -> JobFiles:
        return job_files(self.settings.work_dir, handle.name, handle.attempt)
