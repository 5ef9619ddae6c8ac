"""End-to-end fixtures: the real ``pfleet-controller`` (and ``pfleet-agent``) processes
on a real engine, driven by python-pfconclient."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.support.engines import Engine
from tests.support.processes import ControllerProc, Proc, agent_proc, controller_proc


def engine_env(engine: Engine, storebase: Path) -> dict[str, str]:
    """Agent runtime settings for ``engine`` with a host-path storeBase."""
    return {"DOCKER_HOST": engine.url, "CONTAINER_ENV": engine.kind,
            "COMPUTE_VOLUME_TYPE": "host", "STOREBASE": str(storebase),
            "STOREBASE_MOUNT": str(storebase), "PFLEET_AGENT_POLL_INTERVAL": "1",
            # Tests run more jobs at once than this 2-core machine would place by default.
            "PFLEET_AGENT_CPU_MILLICORES": "32000"}


class Deployment:
    """A controller process, optionally with separate agent processes."""

    def __init__(self, workdir: Path, engine: Engine, *, local_agent: bool,
                 extra_env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.engine = engine
        self.storebase = workdir / "storeBase"
        self.storebase.mkdir(parents=True, exist_ok=True)
        env = {**engine_env(engine, self.storebase), **(extra_env or {})}
        if local_agent:
            env["PFLEET_HEALTH_LISTEN"] = f"127.0.0.1:{free_port()}"
        self.controller: ControllerProc = controller_proc(workdir, free_port(), env,
                                                          local_agent=local_agent)
        self.agents: dict[str, Proc] = {}
        self.controller.start()
        self.controller.wait_ready()
        if local_agent:
            self.controller.wait_agent("local")

    def add_agent(self, name: str, extra_env: dict[str, str] | None = None) -> Proc:
        proc = agent_proc(self.workdir, name, self.controller,
                          {**engine_env(self.engine, self.storebase), **(extra_env or {})})
        self.agents[name] = proc
        proc.start()
        self.controller.wait_agent(name)
        return proc

    def stop(self) -> None:
        for proc in self.agents.values():
            proc.stop()
        self.controller.stop()


@pytest.fixture
def deployment_factory(tmp_path: Path) -> Iterator:
    made: list[Deployment] = []

    def make(engine: Engine, *, local_agent: bool = True,
             extra_env: dict[str, str] | None = None) -> Deployment:
        d = Deployment(tmp_path / f"d{len(made)}", engine, local_agent=local_agent,
                       extra_env=extra_env)
        made.append(d)
        return d

    yield make
    for d in made:
        d.stop()
