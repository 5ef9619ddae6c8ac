"""The SLURM runtime against a real one-node SLURM (``slurm_cluster``), without a
controller: submission, idempotent starts, state and reasons, logs, cancel,
removal, re-attachment by a second runtime instance, and a hung slurmctld."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from agent.protocol import JobSpec, Mount
from agent.runtimes.base import Handle, JobRejected, JobStatus, RuntimeUnavailable
from agent.runtimes.slurm import SlurmRuntime
from agent.runtimes.slurm_config import SlurmSettings
from tests.support.slurm import SlurmCluster

KEY_MOUNTS = [Mount("key-{jid}/incoming", "/share/incoming", True),
              Mount("key-{jid}/outgoing", "/share/outgoing", False)]


def make_runtime(cluster: SlurmCluster, tmp_path: Path, **overrides: object) -> SlurmRuntime:
    settings = SlurmSettings(**{
        "agent_name": "rt-test", "work_dir": str(tmp_path / "work"),
        "storebase": str(tmp_path / "storeBase"), "launcher": "none",
        "command_timeout": 10.0, **overrides})  # type: ignore[arg-type]
    return SlurmRuntime(settings, env={**os.environ, **cluster.env})


def spec_for(tmp_path: Path, jid: str, script: str, attempt: int = 1,
             **fields: object) -> JobSpec:
    key = tmp_path / "storeBase" / f"key-{jid}"
    (key / "incoming").mkdir(parents=True, exist_ok=True)
    (key / "outgoing").mkdir(parents=True, exist_ok=True)
    (key / "incoming" / "in.txt").write_text(f"input of {jid}\n")
    mounts = [Mount(m.source.format(jid=jid), m.target, m.read_only) for m in KEY_MOUNTS]
    return JobSpec(job=f"job-{jid}", attempt=attempt, name=jid, jid=jid, kind="plugin",
                   image="localhost/pfleet-test/busybox:1",
                   command=["sh", "-c", script, "plugin", "/share/incoming", "/share/outgoing"],
                   env=["GREETING=hello there"], cpu_limit=500, memory_limit=64,
                   mounts=mounts, **fields)  # type: ignore[arg-type]


async def wait_state(runtime: SlurmRuntime, handle: Handle, states: tuple[str, ...],
                     within: float = 30.0) -> JobStatus:
    deadline = time.monotonic() + within
    status = JobStatus("unknown")
    while time.monotonic() < deadline:
        status = (await runtime.status([handle]))[handle.job]
        if status.state in states:
            return status
        await asyncio.sleep(0.1)
    raise AssertionError(f"{handle.name} never reached {states}: {status}")


async def test_job_runs_logs_and_is_found_again_after_a_restart(
        slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    runtime = make_runtime(slurm_cluster, tmp_path)
    probe = await runtime.probe()
    assert probe.health == "healthy", probe.reason
    assert (probe.cpu_millicores, probe.memory_mib) == (16_000, 16_000)

    spec = spec_for(tmp_path, "rt-ok", 'cat "$1/in.txt"; echo "$GREETING" > "$2/out.txt"; '
                                       'echo done')
    handle = await runtime.start(spec)
    assert handle.runtime == "slurm" and handle.native_id.isdigit()
    assert await runtime.start(spec) == handle  # same attempt: the same SLURM job
    status = await wait_state(runtime, handle, ("exited",))
    assert (status.exit_code, status.oom, status.message) == (0, False, "exited")
    assert status.started_at.endswith("Z") and status.finished_at.endswith("Z")
    # The "none" launcher rewrote /share/... to the storeBase paths on the node.
    out = tmp_path / "storeBase" / "key-rt-ok" / "outgoing" / "out.txt"
    assert out.read_text() == "hello there\n"
    assert await runtime.logs(handle, 10) == "input of rt-ok\ndone\n"
    assert await runtime.logs(handle, 1) == "done\n"

    # A new runtime (the agent restarted) finds the job by its comment, and a start
    # of the same attempt adopts it: through the .jobid file, or squeue without it.
    again = make_runtime(slurm_cluster, tmp_path)
    assert handle in await again.list_ours()
    assert await again.start(spec) == handle
    (tmp_path / "work" / "rt-ok.1.jobid").unlink()
    assert await again.start(spec) == handle
    assert slurm_cluster.job_state(handle.native_id) == "COMPLETED"

    await again.remove(handle)
    assert not list((tmp_path / "work").glob("rt-ok.1.*"))
    assert handle not in await again.list_ours()  # SLURM still remembers it; we do not
    await again.remove(handle)  # removing twice is fine
    await runtime.close()
    await again.close()


async def test_exit_codes_cancel_and_refusals(slurm_cluster: SlurmCluster,
                                              tmp_path: Path) -> None:
    runtime = make_runtime(slurm_cluster, tmp_path)
    failing = await runtime.start(spec_for(tmp_path, "rt-fail", "echo oops >&2; exit 3"))
    slow = await runtime.start(spec_for(tmp_path, "rt-slow", "echo started; sleep 60"))
    status = await wait_state(runtime, failing, ("exited",))
    assert (status.exit_code, status.message) == (3, "exited")
    assert status.extra["slurm_state"] == "FAILED"
    assert "oops" in await runtime.logs(failing, 5)

    await wait_state(runtime, slow, ("running",))
    await runtime.cancel(slow)
    await runtime.cancel(slow)  # twice is fine
    status = await wait_state(runtime, slow, ("exited",))
    assert status.exit_code == 143 and status.message.startswith("CANCELLED")

    # A job no status can find is missing; an unknown partition is refused by sbatch.
    ghost = Handle("slurm", "999999", "job-ghost", 1, "ghost")
    assert (await runtime.status([ghost]))["job-ghost"].state == "missing"
    with pytest.raises(JobRejected, match=r"sbatch refused the job: .*[Pp]artition"):
        await make_runtime(slurm_cluster, tmp_path, partition="nope").start(
            spec_for(tmp_path, "rt-nopart", "true"))
    assert not list((tmp_path / "work").glob("rt-nopart.*"))  # nothing left behind
    with pytest.raises(JobRejected, match="image not found"):
        await make_runtime(slurm_cluster, tmp_path, launcher="charliecloud",
                           image_dir=str(tmp_path / "images")).start(
            spec_for(tmp_path, "rt-noimage", "true"))
    assert not list((tmp_path / "work").glob("rt-noimage.*"))
    await runtime.close()


async def test_changes_follow_a_job_and_a_new_attempt_replaces_the_old(
        slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    runtime = make_runtime(slurm_cluster, tmp_path)
    seen: list[str] = []

    async def follow() -> None:
        async for job in runtime.changes():
            seen.append(job)

    watcher = asyncio.create_task(follow())
    try:
        first = await runtime.start(spec_for(tmp_path, "rt-attempts", "sleep 60"))
        await wait_state(runtime, first, ("running",))
        # Attempt 2 of the same job: the old SLURM job is cancelled, a new one submitted.
        second = await runtime.start(spec_for(tmp_path, "rt-attempts", "echo two",
                                              attempt=2))
        assert second.native_id != first.native_id
        status = await wait_state(runtime, second, ("exited",))
        assert status.exit_code == 0
        assert (await wait_state(runtime, first, ("exited",))).message.startswith("CANCELLED")
        for _ in range(50):
            if "job-rt-attempts" in seen:
                break
            await asyncio.sleep(0.1)
        assert "job-rt-attempts" in seen
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        await runtime.close()


async def test_hung_slurmctld_makes_probe_unhealthy_and_calls_unavailable(
        slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    runtime = make_runtime(slurm_cluster, tmp_path, command_timeout=1.5)
    handle = await runtime.start(spec_for(tmp_path, "rt-hung", "sleep 3; echo survived"))
    await wait_state(runtime, handle, ("running",))
    slurm_cluster.pause_controller()
    try:
        probe = await runtime.probe()
        assert probe.health == "unhealthy"
        assert "slurmctld does not answer" in probe.reason and "sinfo" in probe.reason
        with pytest.raises(RuntimeUnavailable, match="squeue did not answer"):
            await runtime.status([handle])
        with pytest.raises(RuntimeUnavailable):
            await runtime.start(spec_for(tmp_path, "rt-hung-2", "true"))
    finally:
        slurm_cluster.resume_controller()
    assert (await runtime.probe()).health == "healthy"
    status = await wait_state(runtime, handle, ("exited",))
    assert status.exit_code == 0  # the job ran on while nobody could ask about it
    assert await runtime.logs(handle, 1) == "survived\n"
    await runtime.close()
