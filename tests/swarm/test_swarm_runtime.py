"""SwarmRuntime against a real single-node swarm (``tests.support.swarm``): the service
it creates, the task lifecycle, exit codes, OOM, a missing image, logs, cancel,
removal, listing and the probe.  Every wait is bounded (0.2 s polls)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import docker.errors
import pytest

from agent.protocol import JobSpec, Mount
from agent.runtimes.base import LABEL_AGENT, Handle, JobRejected, JobStatus
from agent.runtimes.docker_config import DockerSettings
from agent.runtimes.swarm import SwarmRuntime, service_name
from tests.support.engines import BUSYBOX_IMAGE, Engine

POLL = 0.2
MakeRuntime = Callable[..., SwarmRuntime]


def job_spec(command: list[str], *, attempt: int = 1, name: str | None = None,
             **fields: Any) -> JobSpec:
    name = name or f"sw-{uuid.uuid4().hex[:10]}"
    return JobSpec(job=fields.pop("job", f"job-{name}"), attempt=attempt, name=name, jid=name,
                   kind="plugin", image=fields.pop("image", BUSYBOX_IMAGE), command=command,
                   **fields)


async def wait_state(runtime: SwarmRuntime, handle: Handle, *states: str,
                     within: float = 60.0) -> JobStatus:
    status = JobStatus("unknown")
    for _ in range(int(within / POLL)):
        status = (await runtime.status([handle]))[handle.job]
        if status.state in states:
            return status
        await asyncio.sleep(POLL)
    raise AssertionError(f"{handle.name} never reached {states}; last status {status}")


def _remove_services(engine: Engine, agent: str) -> None:
    client = engine.client()
    try:
        for service in client.api.services(filters={"label": f"{LABEL_AGENT}={agent}"}):
            with contextlib.suppress(docker.errors.NotFound):
                client.api.remove_service(service["ID"])
    finally:
        client.close()


@pytest.fixture
async def runtimes(swarm_engine: Engine, storebase: Path) -> AsyncIterator[MakeRuntime]:
    made: list[SwarmRuntime] = []

    def make(**overrides: Any) -> SwarmRuntime:
        values: dict[str, Any] = {"base_url": swarm_engine.url,
                                  "agent_name": f"sw-{uuid.uuid4().hex[:8]}",
                                  "storebase": str(storebase)}
        values.update(overrides)
        runtime = SwarmRuntime(DockerSettings(**values))
        made.append(runtime)
        return runtime

    yield make
    for runtime in made:
        await runtime.close()
        await asyncio.to_thread(_remove_services, swarm_engine, runtime.settings.agent_name)


async def test_a_service_runs_the_job_with_mounts_limits_and_labels(
        swarm_engine: Engine, runtimes: MakeRuntime, storebase: Path) -> None:
    runtime = runtimes(job_labels={"team": "imaging"}, container_user="1234:5678",
                       shm_size_mib=96)
    key = storebase / "key-svc"
    (key / "incoming").mkdir(parents=True)
    (key / "outgoing").mkdir()
    (key / "outgoing").chmod(0o777)
    (key / "incoming" / "in.txt").write_text("input\n")
    spec = job_spec(["sh", "-c", "id -u; id -G; cat /share/incoming/in.txt; "
                     "touch /share/incoming/x 2>/dev/null || echo ro; "
                     "df -m /dev/shm | tail -1; echo out > /share/outgoing/out.txt; echo bye"],
                    mounts=[Mount("key-svc/incoming", "/share/incoming", True),
                            Mount("key-svc/outgoing", "/share/outgoing", False)],
                    cpu_limit=500, memory_limit=64)
    handle = await runtime.start(spec)
    assert (handle.runtime, handle.job, handle.name) == ("swarm", spec.job, spec.name)

    client = swarm_engine.client()
    try:
        service = client.api.inspect_service(handle.native_id)
    finally:
        client.close()
    task = service["Spec"]["TaskTemplate"]
    assert service["Spec"]["Name"] == spec.name
    assert service["Spec"]["Labels"]["team"] == "imaging"
    assert service["Spec"]["Labels"]["org.chrisproject.pfleet.job"] == spec.job
    assert task["RestartPolicy"]["Condition"] == "none"
    assert task["Resources"]["Limits"] == {"NanoCPUs": 500_000_000, "MemoryBytes": 64 << 20}
    assert task["ContainerSpec"]["Command"] == spec.command
    assert task["ContainerSpec"]["User"] == "1234:5678"

    done = await wait_state(runtime, handle, "exited")
    assert (done.exit_code, done.oom, done.message) == (0, False, "exited")
    logs = await runtime.logs(handle, 100)
    lines = logs.splitlines()
    assert lines[:4] == ["1234", "5678", "input", "ro"] and lines[-1] == "bye"
    assert lines[4].split()[1] == "96"  # /dev/shm is SHM_SIZE MiB
    assert await runtime.logs(handle, 1) == "bye\n"
    assert (key / "outgoing" / "out.txt").read_text() == "out\n"

    assert await runtime.list_ours() == [handle]
    await runtime.remove(handle)
    assert (await runtime.status([handle]))[handle.job].state == "missing"
    await runtime.remove(handle)  # already gone: fine
    assert await runtime.list_ours() == []


async def test_exit_code_and_oom(runtimes: MakeRuntime) -> None:
    runtime = runtimes()
    failing = await runtime.start(job_spec(["sh", "-c", "echo failing >&2; exit 3"]))
    oom = await runtime.start(job_spec(["sh", "-c", "x=a; while true; do x=$x$x$x$x; done"],
                                       memory_limit=16))
    done = await wait_state(runtime, failing, "exited")
    assert (done.exit_code, done.oom) == (3, False)
    assert await runtime.logs(failing, 5) == "failing\n"
    killed = await wait_state(runtime, oom, "exited")
    assert (killed.exit_code, killed.oom, killed.message) == (137, True, "OOMKilled")


async def test_a_missing_image_is_a_start_failure(runtimes: MakeRuntime) -> None:
    runtime = runtimes()
    handle = await runtime.start(job_spec(["true"], image="localhost/pfleet-test/absent:0"))
    status = await wait_state(runtime, handle, "exited")
    assert status.extra.get("failed") is True
    assert "could not start" in status.message and "absent" in status.message


async def test_start_is_idempotent_and_replaces_older_attempts(runtimes: MakeRuntime) -> None:
    runtime = runtimes()
    spec = job_spec(["sleep", "30"])
    first = await runtime.start(spec)
    assert await runtime.start(spec) == first
    second = await runtime.start(job_spec(["true"], name=spec.name, job=spec.job, attempt=2))
    assert second.native_id != first.native_id
    with pytest.raises(JobRejected, match="newer"):
        await runtime.start(spec)
    assert [h.attempt for h in await runtime.list_ours()] == [2]


async def test_cancel_stops_it_without_calling_it_oom(runtimes: MakeRuntime) -> None:
    runtime = runtimes()
    # PID 1 ignores SIGTERM unless it traps it; this one does, so no grace period passes.
    handle = await runtime.start(job_spec(["sh", "-c", "trap 'exit 143' TERM; sleep 30 & wait"],
                                          memory_limit=64))
    await wait_state(runtime, handle, "running")
    await runtime.cancel(handle, grace=1)
    done = await wait_state(runtime, handle, "exited")
    assert done.oom is False


async def test_refusals_before_any_service(runtimes: MakeRuntime) -> None:
    runtime = runtimes()
    with pytest.raises(JobRejected, match="GPU"):
        await runtime.start(job_spec(["true"], gpu_limit=1))
    with pytest.raises(JobRejected, match="number_of_workers"):
        await runtime.start(job_spec(["true"], number_of_workers=2))
    assert await runtime.list_ours() == []


async def test_probe_and_long_names(runtimes: MakeRuntime, swarm_engine: Engine) -> None:
    runtime = runtimes()
    probe = await runtime.probe()
    assert probe.health == "healthy" and probe.cpu_millicores >= 1000 and probe.memory_mib > 0
    long_name = "j" * 100
    handle = await runtime.start(job_spec(["true"], name=long_name))
    assert (await runtime.list_ours())[0].name == long_name
    assert len(service_name(long_name)) == 63
    await wait_state(runtime, handle, "exited")


async def test_probe_says_when_the_engine_is_not_a_swarm_manager(
        docker_engine: Engine, storebase: Path) -> None:
    runtime = SwarmRuntime(DockerSettings(base_url=docker_engine.url, storebase=str(storebase)))
    try:
        probe = await runtime.probe()
    finally:
        await runtime.close()
    assert probe.health == "unhealthy" and "not a swarm manager" in probe.reason
