"""The direct engine client of the docker runtime: log framing, errors as the SDK's
types (against the suite's real dockerd and podman), engine URLs it refuses."""

from __future__ import annotations

import asyncio
import struct
import subprocess
import uuid
from collections.abc import AsyncIterator

import docker
import docker.errors
import pytest

from agent.runtimes.docker import DockerRuntime, DockerSettings
from agent.runtimes.docker_http import EngineHTTP, demux_logs, unsupported_url
from tests.support.engines import BUSYBOX_IMAGE, Engine


def frame(kind: int, data: bytes) -> bytes:
    return struct.pack(">BxxxL", kind, len(data)) + data


def test_demux_joins_stdout_and_stderr_in_order() -> None:
    raw = frame(1, b"out 1\n") + frame(2, b"err 1\n") + frame(1, b"out 2\n")
    assert demux_logs(raw) == b"out 1\nerr 1\nout 2\n"
    assert demux_logs(b"") == b""


@pytest.mark.parametrize("raw", [
    b"plain text from a tty container\n",  # not framed at all
    frame(1, b"complete") + b"\x01\x00\x00\x00\x00\x00\x00\x09trunc",  # a frame cut short
    b"\x07\x00\x00\x00\x00\x00\x00\x01x",  # no such stream type
])
def test_demux_returns_unframed_or_broken_input_as_is(raw: bytes) -> None:
    assert demux_logs(raw) == raw


@pytest.mark.parametrize("url", ["ssh://user@host", "npipe:////./pipe/docker_engine", "host:2375"])
def test_engine_urls_it_cannot_speak_are_refused_at_construction(url: str) -> None:
    assert unsupported_url(url)
    with pytest.raises(ValueError, match="is not supported"):
        DockerRuntime(DockerSettings(agent_name="a", storebase="/tmp", base_url=url))
    assert unsupported_url("unix:///run/docker.sock") is None
    assert unsupported_url("tcp://127.0.0.1:2375") is None


@pytest.fixture
async def api(container_engine: Engine) -> AsyncIterator[EngineHTTP]:
    sdk = docker.APIClient(base_url=container_engine.url, version="auto")
    version = sdk._version
    sdk.close()
    client = EngineHTTP(container_engine.url, version, timeout=30.0)
    yield client
    await client.close()


async def test_missing_containers_are_the_sdks_not_found(api: EngineHTTP) -> None:
    missing = f"pfleet-missing-{uuid.uuid4().hex[:8]}"
    with pytest.raises(docker.errors.NotFound) as exc:
        await api.inspect_container(missing)
    assert exc.value.status_code == 404
    assert missing in str(exc.value.explanation)
    assert missing in str(exc.value)  # str() of the SDK type works on our response
    with pytest.raises(docker.errors.NotFound):
        await api.remove_container(missing, force=True)


async def test_a_refused_create_is_an_api_error_with_the_engines_reason(api: EngineHTTP) -> None:
    with pytest.raises(docker.errors.APIError) as exc:
        await api.create_container({"Image": BUSYBOX_IMAGE}, "bad name/with slash")
    assert not isinstance(exc.value, docker.errors.NotFound)
    assert exc.value.status_code in (400, 500)  # podman answers 500 for client faults
    assert exc.value.explanation


async def test_create_start_logs_remove(api: EngineHTTP, container_engine: Engine) -> None:
    name = f"pfleet-http-{uuid.uuid4().hex[:8]}"
    # stderr first, then a pause: the engines order the two streams by time only
    script = "echo err >&2; sleep 0.3; echo one; echo two; echo three"
    cid = await api.create_container(
        {"Image": BUSYBOX_IMAGE, "Cmd": ["sh", "-c", script], "Labels": {"t": "http"}}, name)
    try:
        await api.start(cid)
        await asyncio.to_thread(subprocess.run, [*container_engine.cli, "wait", cid],
                                check=True, timeout=60, capture_output=True)
        attrs = await api.inspect_container(name)
        assert (attrs["Id"], attrs["State"]["ExitCode"]) == (cid, 0)
        assert attrs["Config"]["Labels"]["t"] == "http"
        assert (await api.logs(cid, 2)).decode().splitlines() == ["two", "three"]
        assert (await api.logs(cid, 100)).decode().splitlines() == ["err", "one", "two", "three"]
    finally:
        await api.remove_container(cid, force=True)
    with pytest.raises(docker.errors.NotFound):
        await api.inspect_container(cid)
