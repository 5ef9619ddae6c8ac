"""A fleet on separate hosts: the controller in its own network namespace, one agent per
host namespace, each on that host's own engine (docker, docker, podman), one shared
storeBase.  Every request from the test is sent from inside the controller namespace
(``Topology.call_in``); the root namespace never talks to 198.51.100.0/24."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pfconclient import client as pfc

from tests.conftest import free_port
from tests.support.processes import BIN, Proc, http_json, wait_for
from tests.support.tls import Certs
from tests.support.topology import Host, Topology


class Fleet:
    def __init__(self, topo: Topology, workdir: Path, env: dict[str, str],
                 tls: Certs | None = None) -> None:
        self.topo = topo
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.storebase = topo.storebase
        self.tls = tls
        if tls is None:
            self.base = f"http://127.0.0.1:{self.port}/api/v1/"  # inside the controller ns
            self.public_url = f"http://{topo.controller_ip}:{self.port}/"
        else:  # the certificate names the controller's address, not loopback
            self.base = f"https://{topo.controller_ip}:{self.port}/api/v1/"
            self.public_url = f"https://{topo.controller_ip}:{self.port}/"
            env = {"PFLEET_TLS_CERT": str(tls.cert), "PFLEET_TLS_KEY": str(tls.key), **env}
        self.controller_env = {
            "PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/root"),
            "PYTHONUNBUFFERED": "1", "PFLEET_LISTEN": f"0.0.0.0:{self.port}",
            "PFLEET_STATE_DIR": str(workdir / "state"), "STOREBASE_MOUNT": str(self.storebase),
            "PFLEET_HEARTBEAT_INTERVAL": "1", **env}
        self.controller = Proc("controller", [*topo.nsenter("ctl"),
                                              str(BIN / "pfleet-controller"), "--dev"],
                               self.controller_env, workdir / "controller.log")
        self.agents: dict[str, Proc] = {}
        for host in topo.hosts:
            topo.check_route("ctl", host.ip)
            topo.check_route(host, topo.controller_ip)
        self.controller.start()
        self.wait_ready()

    # ------------------------------------------------------------ requests

    def http(self, method: str, path: str, body: Any = None, token: str | None = None,
             timeout: float = 10.0) -> tuple[int, Any]:
        ca = self.tls.ca if self.tls is not None else None
        return self.topo.call_in("ctl", http_json, method, self.base + path, body, token,
                                 timeout, ca, timeout=timeout + 5)

    def token(self) -> str:
        status, body = self.http("POST", "auth-token/", {"pfcon_user": "pfcon",
                                                         "pfcon_password": "pfcon1234"})
        assert status == 200, body
        return str(body["token"])

    def admin(self, method: str, path: str, body: Any = None) -> Any:
        status, answer = self.http(method, path, body, self.token())
        assert status in (200, 201), (status, answer)
        return answer

    def client(self) -> pfc.Client:
        """A python-pfconclient client; call it (and use it) inside ``call``."""
        status, body = http_json("POST", self.base + "auth-token/",
                                 {"pfcon_user": "pfcon", "pfcon_password": "pfcon1234"},
                                 ca=self.tls.ca if self.tls is not None else None)
        assert status == 200, body
        c = pfc.Client(self.base, str(body["token"]))
        c.initial_wait, c.max_wait = 0.5, 4
        return c

    def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn`` (e.g. python-pfconclient calls) inside the controller namespace."""
        return self.topo.call_in("ctl", fn, *args, timeout=300, **kwargs)

    def agents_by_name(self) -> dict[str, dict]:
        return {a["name"]: a for a in self.admin("GET", "agents/")["agents"]}

    def jobs(self) -> dict[str, dict]:
        return {j["name"]: j for j in self.admin("GET", "fleet/jobs/?all=1&limit=1000")["jobs"]}

    # ------------------------------------------------------------ processes

    def wait_ready(self, timeout: float = 30.0) -> None:
        def ready() -> bool:
            if not self.controller.alive():
                raise RuntimeError(f"controller exited:\n{self.controller.log_tail()}")
            with contextlib.suppress(OSError):
                return self.http("GET", "health/", timeout=1.0)[0] == 200
            return False
        wait_for(ready, timeout, what="controller health")

    def start_agent(self, host: Host, name: str | None = None, **env: str) -> Proc:
        """An agent process on ``host`` (named after it unless ``name`` is given)."""
        name = name or host.name
        token = self.admin("POST", "agents/tokens/", {"name": name})["token"]
        agent_env = {
            "PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/root"),
            "PYTHONUNBUFFERED": "1", "PFLEET_AGENT_NAME": name,
            "PFLEET_CONTROLLER_URL": self.public_url, "PFLEET_AGENT_TOKEN": token,
            "PFLEET_AGENT_STATE_DIR": str(self.workdir / f"agent-{name}"),
            "PFLEET_AGENT_CONFIG": str(self.workdir / "absent.toml"),
            "PFLEET_HEALTH_LISTEN": "", "CONTAINER_ENV": host.engine_kind or "fake",
            "DOCKER_HOST": host.engine_url or "", "STOREBASE": str(self.storebase),
            "PFLEET_AGENT_POLL_INTERVAL": "1", "PFLEET_AGENT_CPU_MILLICORES": "4000", **env}
        if self.tls is not None:
            agent_env.setdefault("PFLEET_CA_FILE", str(self.tls.ca))
        proc = Proc(f"agent-{name}", [*self.topo.nsenter(host), str(BIN / "pfleet-agent")],
                    agent_env, self.workdir / f"agent-{name}.log")
        self.agents[name] = proc
        proc.start()
        return proc

    def wait_agents(self, names: list[str], timeout: float = 30.0,
                    states: tuple[str, ...] = ("healthy",)) -> None:
        def connected() -> bool:
            agents = self.agents_by_name()
            return all(agents.get(n, {}).get("state") in states for n in names)
        wait_for(connected, timeout, interval=0.2, what=f"agents {names} {states}")

    def stop(self) -> None:
        for proc in self.agents.values():
            proc.stop()
        self.controller.stop()


@pytest.fixture
def fleet_factory(fleet_topology: Topology, tmp_path: Path) -> Iterator:
    made: list[Fleet] = []

    def make(*, agents: bool = True, agent_env: dict[str, str] | None = None,
             tls: Certs | None = None, **env: str) -> Fleet:
        fleet = Fleet(fleet_topology, tmp_path / f"f{len(made)}", env, tls)
        made.append(fleet)
        if agents:
            for host in fleet_topology.hosts:
                fleet.start_agent(host, **(agent_env or {}))
            fleet.wait_agents([h.name for h in fleet_topology.hosts])
        return fleet

    yield make
    for fleet in made:
        fleet.stop()
    fleet_topology.heal()
    for host in fleet_topology.hosts:  # leave the engines clean for the next test
        client = host.client()
        try:
            for container in client.containers.list(all=True):
                with contextlib.suppress(Exception):
                    container.remove(force=True)
        finally:
            client.close()
