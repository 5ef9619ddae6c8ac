"""A real runtime with no backend: its workloads are timers whose behaviour comes
from the job's environment, so the controller, placement and resilience can be
tested (and benchmarked) without an engine.

    PFLEET_FAKE_RUN_FOR=<seconds>     how long the workload "runs" (default 0)
    PFLEET_FAKE_EXIT_CODE=<n>         its exit code (default 0)
    PFLEET_FAKE_OOM=1                 it ends OOM-killed (exit 137)
    PFLEET_FAKE_START_ERROR=<text>    start() rejects it with this message
    PFLEET_FAKE_LOGS=<text>           what its logs say
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from agent.protocol import JobSpec
from agent.runtimes.base import Capabilities, Handle, JobRejected, JobStatus, Probe, Runtime


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class _Workload:
    spec: JobSpec
    started: float
    run_for: float
    exit_code: int
    oom: bool
    logs: str
    cancelled: bool = False


class FakeRuntime(Runtime):
    name = "fake"

    def __init__(self, cpu_millicores: int = 64_000, memory_mib: int = 256_000,
                 gpus: int = 0) -> None:
        self._cpu, self._mem, self._gpus = cpu_millicores, memory_mib, gpus
        self._workloads: dict[str, _Workload] = {}
        self._changes: asyncio.Queue[str] = asyncio.Queue()
        self.healthy = True

    def capabilities(self) -> Capabilities:
        return Capabilities(multi_worker=True, hard_memory_limit=True, gpus=True)

    async def probe(self) -> Probe:
        if not self.healthy:
            return Probe("unhealthy", "fake runtime switched off")
        return Probe("healthy", cpu_millicores=self._cpu, memory_mib=self._mem, gpus=self._gpus)

    async def start(self, spec: JobSpec) -> Handle:
        env = dict(e.split("=", 1) for e in spec.env if "=" in e)
        if env.get("PFLEET_FAKE_START_ERROR"):
            raise JobRejected(env["PFLEET_FAKE_START_ERROR"])
        current = self._workloads.get(spec.name)
        if current is None or int(current.spec.attempt) != spec.attempt:
            oom = env.get("PFLEET_FAKE_OOM") == "1"
            self._workloads[spec.name] = _Workload(
                spec=spec, started=time.time(), run_for=float(env.get("PFLEET_FAKE_RUN_FOR", 0)),
                exit_code=137 if oom else int(env.get("PFLEET_FAKE_EXIT_CODE", 0)), oom=oom,
                logs=env.get("PFLEET_FAKE_LOGS", ""))
            asyncio.get_running_loop().call_later(
                self._workloads[spec.name].run_for, self._changes.put_nowait, spec.job)
        return self._handle(self._workloads[spec.name])

    def _handle(self, w: _Workload) -> Handle:
        return Handle("fake", w.spec.name, w.spec.job, w.spec.attempt, w.spec.name, w.spec.kind)

    async def status(self, handles: list[Handle]) -> dict[str, JobStatus]:
        now = time.time()
        out: dict[str, JobStatus] = {}
        for h in handles:
            w = self._workloads.get(h.name)
            if w is None or w.spec.attempt != h.attempt:
                out[h.job] = JobStatus("missing")
            elif w.cancelled or now >= w.started + w.run_for:
                code = 137 if w.cancelled else w.exit_code
                out[h.job] = JobStatus("exited", exit_code=code, oom=w.oom,
                                       started_at=_iso(w.started),
                                       finished_at=_iso(w.started + w.run_for))
            else:
                out[h.job] = JobStatus("running", started_at=_iso(w.started))
        return out

    async def logs(self, handle: Handle, tail: int) -> str:
        w = self._workloads.get(handle.name)
        if w is None or not w.logs:
            return ""
        lines = w.logs.splitlines(keepends=True)
        return "".join(lines[-tail:]) if tail else ""

    async def cancel(self, handle: Handle, grace: float = 10.0) -> None:
        w = self._workloads.get(handle.name)
        if w is not None:
            w.cancelled = True
            self._changes.put_nowait(handle.job)

    async def remove(self, handle: Handle, force: bool = True) -> None:
        w = self._workloads.get(handle.name)
        if w is not None and w.spec.attempt == handle.attempt:
            del self._workloads[handle.name]

    async def list_ours(self) -> list[Handle]:
        return [self._handle(w) for w in self._workloads.values()]

    async def changes(self) -> AsyncIterator[str]:
        while True:
            yield await self._changes.get()

