"""Shared fixtures: a clean environment for every test, a controller with a fake
agent in-process (fast API tests), and the real engines of ``tests.support.engines``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from agent.config import AgentConfig
from agent.main import Agent
from agent.runtimes.fake import FakeRuntime
from controller.app import create_app
from controller.auth import issue_agent_token, issue_client_token
from controller.config import Config
from controller.fleet import FLEET
from controller.store import STORE
from tests.support.slow_callbacks import SlowCallbacks, debug_loop_settings

pytest_plugins = ["tests.support.engines", "tests.support.swift", "tests.support.topology",
                  "tests.support.kmock_server", "tests.support.swarm", "tests.support.slurm"]

_ENV_PREFIXES = ("PFLEET_", "PFCON_", "STORAGE_ENV", "STOREBASE", "SECRET_KEY", "JOB_LOGS_TAIL",
                 "CONTAINER_", "COMPUTE_VOLUME_TYPE", "VOLUME_NAME", "JOB_LABELS", "SHM_SIZE",
                 "IGNORE_LIMITS", "REMOVE_JOBS", "ENABLE_HOME_WORKAROUND", "DOCKER_HOST",
                 "APPLICATION_MODE", "SWIFT_", "KUBECONFIG", "KUBERNETES_SERVICE_",
                 "JOB_NAMESPACE", "NODE_SELECTOR", "IMAGE_PULL_SECRETS", "TIMELIMIT_MINUTES",
                 "SLURM_", "SBATCH_", "SQUEUE_")


# Every event loop of the suite runs in debug mode, and a callback that holds the loop
# longer than SLOW_CALLBACK_SECONDS fails the test that ran it.
def _debug_loop() -> asyncio.AbstractEventLoop:
    return debug_loop_settings(asyncio.new_event_loop())


def pytest_asyncio_loop_factories(config: pytest.Config,
                                  item: pytest.Item) -> dict[str, object]:
    return {"debug": _debug_loop}


@pytest.fixture(autouse=True)
def no_slow_callbacks() -> Iterator[None]:
    # A test body or fixture may block (it drives engines with the synchronous SDK);
    # the product's own callbacks and tasks may not.
    handler = SlowCallbacks(ignore=("coro=<test_", "_fixture"))
    asyncio_log = logging.getLogger("asyncio")
    asyncio_log.addHandler(handler)
    try:
        yield
    finally:
        asyncio_log.removeHandler(handler)
    assert not handler.seen, "the event loop was blocked:\n" + "\n".join(handler.seen)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings leaking in from the developer's shell must not change any test."""
    for name in list(os.environ):
        if name.startswith(_ENV_PREFIXES):
            monkeypatch.delenv(name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_config(tmp_path: Path, **overrides: Any) -> Config:
    base = Config(dev=True, storebase_mount=tmp_path / "storeBase",
                  state_dir=tmp_path / "state", listen_host="127.0.0.1", listen_port=0,
                  heartbeat_interval=0.5)
    (tmp_path / "storeBase").mkdir(exist_ok=True)
    return replace(base, **overrides)


@dataclass
class Harness:
    """A controller on a real loopback socket with one fake agent connected."""

    config: Config
    server: TestServer
    agent: Agent | None
    runtime: FakeRuntime | None
    agent_task: asyncio.Task[None] | None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.port}/api/v1/"

    @property
    def app(self) -> web.Application:
        return self.server.app

    def token(self) -> str:
        return issue_client_token(self.config)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token()}"}


async def start_fake_agent(config: Config, server: TestServer, tmp_path: Path, name: str = "fake1",
                           **agent_overrides: Any) -> tuple[Agent, FakeRuntime,
                                                            asyncio.Task[None]]:
    token, jti = issue_agent_token(config, name)
    await server.app[STORE].add_token(jti, name)
    runtime = FakeRuntime(cpu_millicores=agent_overrides.pop("cpu_millicores", 64_000),
                          memory_mib=agent_overrides.pop("memory_mib", 256_000),
                          gpus=agent_overrides.pop("gpus", 0))
    agent_config = AgentConfig(
        name=name, controller_url=f"ws://127.0.0.1:{server.port}/api/v1/fleet/connect",
        token=token, state_dir=tmp_path / f"agent-{name}", runtime="fake",
        storebase=str(config.storebase_mount), storebase_mount=config.storebase_mount,
        health_listen="", poll_interval=0.2, **agent_overrides)
    agent = Agent(agent_config, runtime=runtime)
    task = asyncio.create_task(agent.run())
    fleet = server.app[FLEET]
    for _ in range(200):
        if name in fleet.sessions:
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError(f"fake agent {name} did not connect")
    return agent, runtime, task


async def stop_task(task: asyncio.Task[Any] | None) -> None:
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    config = make_config(tmp_path)
    server = TestServer(create_app(config), host="127.0.0.1")
    await server.start_server()
    agent, runtime, task = await start_fake_agent(config, server, tmp_path)
    h = Harness(config, server, agent, runtime, task)
    try:
        yield h
    finally:
        await stop_task(h.agent_task)
        await server.close()


@pytest.fixture
def storebase(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "storeBase"
    path.mkdir(exist_ok=True)
    yield path
