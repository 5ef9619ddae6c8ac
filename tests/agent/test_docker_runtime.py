"""DockerRuntime against real engines: the private dockerd and podman service of the suite.

Every test names its containers uniquely and runs its runtime under an agent name of its
own; the ``runtimes`` fixture (storeBase: conftest's ``storebase``) closes each runtime and
removes every container carrying that agent's label.  Every wait is bounded (status is
polled in 0.1 s steps).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest

from agent.protocol import JobSpec, Mount
from agent.runtimes.base import (
    LABEL_AGENT,
    LABEL_ATTEMPT,
    LABEL_JID,
    LABEL_JOB,
    LABEL_JOB_TYPE,
    Handle,
    JobRejected,
    JobStatus,
    RuntimeUnavailable,
)
from agent.runtimes.docker import DockerRuntime, DockerSettings
from tests.support.engines import BUSYBOX_IMAGE, Engine

POLL = 0.1
MakeRuntime = Callable[..., DockerRuntime]


def job_spec(
    command: list[str], *, attempt: int = 1, name: str | None = None, **fields: Any
) -> JobSpec:
    name = name or f"pfleet-t-{uuid.uuid4().hex[:12]}"
    return JobSpec(
        job=f"job-{name}",
        attempt=attempt,
        name=name,
        jid=name,
        kind="plugin",
        image=fields.pop("image", BUSYBOX_IMAGE),
        command=command,
        **fields,
    )


async def wait_state(
    runtime: DockerRuntime, handle: Handle, *states: str, within: float = 30.0
) -> JobStatus:
    status = JobStatus("unknown")
    for _ in range(int(within / POLL)):
        status = (await runtime.status([handle]))[handle.job]
        if status.state in states:
            return status
        await asyncio.sleep(POLL)
    raise AssertionError(f"{handle.name} never reached {states}; last status {status}")


def _containers(engine: Engine, **filters: str) -> list[dict[str, Any]]:
    client = engine.client()
    try:
        return client.api.containers(all=True, filters=filters)
    finally:
        client.close()


def _remove_containers(engine: Engine, **filters: str) -> None:
    client = engine.client()
    try:
        for row in client.api.containers(all=True, filters=filters):
            with contextlib.suppress(docker.errors.NotFound):
                client.api.remove_container(row["Id"], force=True)
    finally:
        client.close()


def _threads(prefix: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(prefix) and t.is_alive()]


async def _no_threads(prefix: str, within: float = 5.0) -> bool:
    for _ in range(int(within / POLL)):
        if not _threads(prefix):
            return True
        await asyncio.sleep(POLL)
    return False


@pytest.fixture
async def runtimes(storebase: Path) -> AsyncIterator[MakeRuntime]:
    """Make runtimes for an engine; all are closed and their containers removed after."""
    made: list[tuple[DockerRuntime, Engine]] = []

    def make(engine: Engine, **overrides: Any) -> DockerRuntime:
        values: dict[str, Any] = {
            "base_url": engine.url,
            "engine": engine.kind,
            "agent_name": f"test-{uuid.uuid4().hex[:8]}",
            "storebase": str(storebase),
        }
        values.update(overrides)
        runtime = DockerRuntime(DockerSettings(**values))
        made.append((runtime, engine))
        return runtime

    yield make
    for runtime, engine in made:
        await runtime.close()
        await asyncio.to_thread(
            _remove_containers, engine, label=f"{LABEL_AGENT}={runtime.settings.agent_name}"
        )


# --------------------------------------------------------------------- lifecycle


async def test_lifecycle_runs_a_job_with_mounts(
    container_engine: Engine, runtimes: MakeRuntime, storebase: Path
) -> None:
    runtime = runtimes(container_engine)
    key = storebase / "key-lifecycle"
    (key / "incoming").mkdir(parents=True)
    (key / "outgoing").mkdir()
    (key / "incoming" / "in.txt").write_text("input\n")
    spec = job_spec(
        [
            "sh",
            "-c",
            "echo hello; cat /share/incoming/in.txt; "
            "touch /share/incoming/x 2>/dev/null || echo ro; "
            "echo out > /share/outgoing/out.txt; sleep 1; echo bye",
        ],
        mounts=[
            Mount("key-lifecycle/incoming", "/share/incoming", True),
            Mount("key-lifecycle/outgoing", "/share/outgoing", False),
        ],
    )

    handle = await runtime.start(spec)

    assert (handle.runtime, handle.job, handle.attempt, handle.name, handle.kind) == (
        container_engine.kind,
        spec.job,
        1,
        spec.name,
        "plugin",
    )
    running = await wait_state(runtime, handle, "running", "exited")
    assert running.state == "running" and running.started_at and not running.finished_at
    done = await wait_state(runtime, handle, "exited")
    assert (done.exit_code, done.oom) == (0, False)
    assert done.started_at.startswith("20") and done.finished_at.startswith("20")
    assert await runtime.logs(handle, 1) == "bye\n"
    assert await runtime.logs(handle, 100) == "hello\ninput\nro\nbye\n"
    assert (key / "outgoing" / "out.txt").read_text() == "out\n"
    assert not (key / "incoming" / "x").exists()

    await runtime.remove(handle)
    assert (await runtime.status([handle]))[handle.job].state == "missing"
    assert await runtime.logs(handle, 10) == ""


async def test_exit_code_is_reported(container_engine: Engine, runtimes: MakeRuntime) -> None:
    runtime = runtimes(container_engine)
    handle = await runtime.start(job_spec(["sh", "-c", "echo failing >&2; exit 3"]))
    done = await wait_state(runtime, handle, "exited")
    assert (done.exit_code, done.oom) == (3, False)
    assert await runtime.logs(handle, 5) == "failing\n"  # stderr is in the logs too


async def test_memory_limit_is_hard_and_ends_in_oom(
    container_engine: Engine, runtimes: MakeRuntime
) -> None:
    runtime = runtimes(container_engine)
    handle = await runtime.start(
        job_spec(["sh", "-c", "x=a; while true; do x=$x$x$x$x; done"], memory_limit=16)
    )
    done = await wait_state(runtime, handle, "exited")
    assert (done.exit_code, done.oom) == (137, True)


async def test_cancel_stops_the_job_without_calling_it_oom(
    container_engine: Engine, runtimes: MakeRuntime
) -> None:
    runtime = runtimes(container_engine)
    handle = await runtime.start(job_spec(["sleep", "30"], memory_limit=64))
    await wait_state(runtime, handle, "running")
    await runtime.cancel(handle, grace=1)
    done = await wait_state(runtime, handle, "exited", within=10)
    assert done.oom is False and done.exit_code is not None and done.exit_code != 0
    await runtime.cancel(handle, grace=1)  # already ended: fine


async def test_gone_containers_are_not_errors(
    container_engine: Engine, runtimes: MakeRuntime
) -> None:
    runtime = runtimes(container_engine)
    ghost = Handle(container_engine.kind, "0" * 64, "job-ghost", 1, "pfleet-t-ghost")
    await runtime.remove(ghost)
    await runtime.cancel(ghost, grace=0)
    assert await runtime.logs(ghost, 10) == ""
    assert await runtime.status([ghost]) == {
        "job-ghost": JobStatus("missing", message="container not found")
    }


# ------------------------------------------------------------------- idempotence


async def test_start_is_idempotent_per_attempt(
    container_engine: Engine, runtimes: MakeRuntime
) -> None:
    runtime = runtimes(container_engine)
    spec = job_spec(["sleep", "30"])
    client = container_engine.client()
    try:
        foreign = client.containers.create(BUSYBOX_IMAGE, ["sleep", "30"], name=spec.name)
        first = await runtime.start(spec)  # a foreign container of that name is replaced
        assert first.native_id != foreign.id
        with pytest.raises(docker.errors.NotFound):
            client.containers.get(foreign.id)

        again = await runtime.start(spec)
        assert again == first

        newer = await runtime.start(dataclasses.replace(spec, attempt=2))
        assert newer.native_id != first.native_id and newer.attempt == 2
        assert (await runtime.status([first]))[spec.job].state == "missing"
        assert (await wait_state(runtime, newer, "running")).state == "running"

        with pytest.raises(JobRejected, match="newer"):
            await runtime.start(spec)  # a late start of attempt 1 leaves attempt 2 alone
        assert [r["Id"] for r in _containers(container_engine, name=spec.name)] == [newer.native_id]
    finally:
        client.close()


async def test_a_created_container_of_this_attempt_is_started(
    container_engine: Engine, runtimes: MakeRuntime
) -> None:
    runtime = runtimes(container_engine)
    spec = job_spec(["sleep", "30"])
    client = container_engine.client()
    try:
        created = client.containers.create(
            BUSYBOX_IMAGE,
            ["sleep", "30"],
            name=spec.name,
            labels={
                LABEL_JOB: spec.job,
                LABEL_ATTEMPT: "1",
                LABEL_AGENT: runtime.settings.agent_name,
            },
        )
    finally:
        client.close()
    assert (await runtime.status([Handle(runtime.name, created.id, spec.job, 1, spec.name)]))[
        spec.job
    ].state == "pending"
    handle = await runtime.start(spec)
    assert handle.native_id == created.id
    assert (await wait_state(runtime, handle, "running")).state == "running"


# ---------------------------------------------------------------------- rejections


async def test_missing_image_is_rejected_without_debris(
    container_engine: Engine, runtimes: MakeRuntime
) -> None:
    runtime = runtimes(container_engine)
    spec = job_spec(["true"], image="localhost/pfleet-test/no-such-image:1")
    with pytest.raises(JobRejected, match=r"^image not found: localhost/pfleet-test/no-such"):
        await runtime.start(spec)
    assert _containers(container_engine, name=spec.name) == []


async def test_gpu_on_a_host_without_gpus_is_rejected_without_debris(
    container_engine: Engine, runtimes: MakeRuntime
) -> None:
    runtime = runtimes(container_engine)
    spec = job_spec(["true"], gpu_limit=1)
    with pytest.raises(JobRejected, match="GPU"):
        await runtime.start(spec)
    assert _containers(container_engine, name=spec.name) == []


async def test_impossible_request_is_rejected(
    container_engine: Engine, runtimes: MakeRuntime
) -> None:
    runtime = runtimes(container_engine)
    spec = job_spec(["/no/such/program"])
    with pytest.raises(JobRejected, match="no such file or directory"):
        await runtime.start(spec)
    assert _containers(container_engine, name=spec.name) == []


# ------------------------------------------------------------------------ settings


async def test_settings_reach_the_container(
    container_engine: Engine, runtimes: MakeRuntime
) -> None:
    runtime = runtimes(
        container_engine,
        container_user="1234:5678",
        shm_size_mib=128,
        job_labels={"org.example.team": "fnndsc"},
        enable_home_workaround=True,
    )
    spec = job_spec(["sh", "-c", 'id; df -k /dev/shm | tail -n 1; echo "HOME=$HOME"'])
    handle = await runtime.start(spec)
    assert (await wait_state(runtime, handle, "exited")).exit_code == 0
    ident, shm, home = (await runtime.logs(handle, 10)).splitlines()
    assert ident.startswith("uid=1234")
    assert "5678" in ident.split("groups=")[1]  # supplementary group, as in pfcon
    assert shm.split()[1] == str(134 * 1024)  # SHM_SIZE 128 MiB -> "134m"
    assert home == "HOME=/tmp"
    (row,) = _containers(container_engine, name=spec.name)
    assert row["Labels"] == {
        "org.example.team": "fnndsc",
        LABEL_JOB_TYPE: "plugin",
        LABEL_JOB: spec.job,
        LABEL_ATTEMPT: "1",
        LABEL_AGENT: runtime.settings.agent_name,
        LABEL_JID: spec.jid,
    }


async def test_docker_local_volume_is_the_storebase(
    container_engine: Engine, runtimes: MakeRuntime
) -> None:
    volume_name = f"pfleet-t-{uuid.uuid4().hex[:8]}"
    client = container_engine.client()
    volume = client.volumes.create(volume_name)
    try:
        incoming = Path(volume.attrs["Mountpoint"]) / "key-vol" / "incoming"
        incoming.mkdir(parents=True)
        (incoming / "data.txt").write_text("from the volume\n")
        runtime = runtimes(
            container_engine,
            volume_type="docker_local_volume",
            volume_name=volume_name,
            storebase=None,
        )
        assert (await runtime.probe()).health == "healthy"
        handle = await runtime.start(
            job_spec(
                ["cat", "/share/incoming/data.txt"],
                mounts=[Mount("key-vol/incoming", "/share/incoming", True)],
            )
        )
        assert (await wait_state(runtime, handle, "exited")).exit_code == 0
        assert await runtime.logs(handle, 10) == "from the volume\n"
        await runtime.remove(handle)

        lost = runtimes(
            container_engine,
            volume_type="docker_local_volume",
            volume_name=f"{volume_name}-missing",
            storebase=None,
        )
        probe = await lost.probe()
        assert probe.health == "unhealthy" and "does not exist" in probe.reason
        with pytest.raises(RuntimeUnavailable, match="VOLUME_NAME"):
            await lost.start(job_spec(["true"]))
    finally:
        volume.remove(force=True)
        client.close()


# ----------------------------------------------------------------- listing, events


async def test_list_ours_finds_only_this_agents_containers(
    container_engine: Engine, runtimes: MakeRuntime
) -> None:
    mine, theirs = runtimes(container_engine), runtimes(container_engine)
    spec = job_spec(["sleep", "30"])
    handle = await mine.start(spec)
    other = await theirs.start(job_spec(["sleep", "30"]))
    assert await mine.list_ours() == [handle]
    assert await theirs.list_ours() == [other]
    assert (await mine.status([other]))[other.job].state == "missing"


async def test_changes_yield_the_job_when_its_container_dies(
    container_engine: Engine, runtimes: MakeRuntime
) -> None:
    runtime = runtimes(container_engine)
    changes = runtime.changes()
    pending = asyncio.ensure_future(anext(changes))
    for _ in range(50):  # until the engine accepted the subscription
        if runtime.event_streams:
            break
        await asyncio.sleep(POLL)
    handle = await runtime.start(job_spec(["sh", "-c", "sleep 0.5; exit 4"]))
    seen = [await asyncio.wait_for(pending, 15)]
    while seen.count(handle.job) < 2:  # start, then die
        seen.append(await asyncio.wait_for(anext(changes), 15))
    assert (await wait_state(runtime, handle, "exited")).exit_code == 4
    await changes.aclose()
    assert runtime.event_streams == 0

    # close() ends an open stream: the iterator stops
    pending = asyncio.ensure_future(anext(runtime.changes()))
    for _ in range(50):
        if runtime.event_streams:
            break
        await asyncio.sleep(POLL)
    assert runtime.event_streams == 1
    await runtime.close()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(pending, 10)
    assert runtime.event_streams == 0
    assert await _no_threads(f"pfleet-{container_engine.kind}")


# --------------------------------------------------------------- probe, capabilities


async def test_probe_reports_capacity(container_engine: Engine, runtimes: MakeRuntime) -> None:
    runtime = runtimes(container_engine, gpus=0)
    probe = await runtime.probe()
    assert probe.health == "healthy", probe.reason
    assert probe.cpu_millicores >= 1000 and probe.cpu_millicores % 1000 == 0
    assert probe.memory_mib > 100 and probe.gpus == 0
    caps = runtime.capabilities()
    assert caps.hard_memory_limit and not caps.multi_worker
    assert caps.gpus is (container_engine.kind == "docker")


async def test_unreachable_engine_is_unhealthy_not_an_exception(tmp_path: Path) -> None:
    url = f"unix://{tmp_path}/no-engine.sock"
    runtime = DockerRuntime(DockerSettings(base_url=url, storebase=str(tmp_path)))
    try:
        probe = await runtime.probe()
        assert probe.health == "unhealthy"
        assert probe.reason.startswith(f"docker engine unreachable at {url}: ")
        with pytest.raises(RuntimeUnavailable, match="unreachable"):
            await runtime.start(job_spec(["true"]))
        with pytest.raises(RuntimeUnavailable):
            await runtime.status([Handle("docker", "abc", "j", 1, "n")])
        assert [job async for job in runtime.changes()] == []
    finally:
        await runtime.close()


def test_bad_settings_fail_at_construction() -> None:
    with pytest.raises(ValueError, match="CONTAINER_USER 'abc:1'"):
        DockerRuntime(DockerSettings(storebase="/srv/sb", container_user="abc:1"))
    with pytest.raises(ValueError, match="STOREBASE"):
        DockerRuntime(DockerSettings())
