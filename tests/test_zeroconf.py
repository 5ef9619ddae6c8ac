"""Zeroconf discovery across the test bridge (DESIGN §5), with real processes.

The controller runs inside the controller namespace, listening on 198.51.100.10 and
advertising ``_pfleet._tcp.local.``; agents (fake runtime) started in host namespaces
without ``PFLEET_CONTROLLER_URL`` browse for it, connect and are listed as found by
``zeroconf``.  One with a token signed by another key finds the controller just the
same and is refused (exit 78).  Every request is sent from inside a namespace
(``Topology.call_in``) and multicast happens only there: the root namespace never
talks to 198.51.100.0/24 and runs no zeroconf.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from zeroconf import ServiceInfo

from agent.discovery import SERVICE_TYPE, controller_from_info
from tests.support.processes import BIN, http_json, wait_for
from tests.support.topology import Topology

# fleet_topology starts both engines, so the topology test carries both marks

PORT = 30005  # namespace-private: nothing else listens in the controller namespace
HEALTH_PORT = 30006  # on the agent namespace's own loopback


def base_env(**extra: str) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/root"),
            "PYTHONUNBUFFERED": "1", **extra}


class Deployment:
    """What one test started in the topology; stopped by PID at the end."""

    def __init__(self, topo: Topology, workdir: Path) -> None:
        self.topo = topo
        self.workdir = workdir
        self.base = f"http://{topo.controller_ip}:{PORT}/api/v1/"
        self.procs: dict[str, tuple[subprocess.Popen[Any], Path]] = {}

    def start(self, name: str, where: str, argv: list[str], env: dict[str, str]) -> None:
        log = self.workdir / f"{name}.log"
        with log.open("ab") as out:
            proc = self.topo.run_in(where, argv, env=env, stdout=out,
                                    stderr=subprocess.STDOUT)
        self.procs[name] = (proc, log)

    def proc(self, name: str) -> subprocess.Popen[Any]:
        return self.procs[name][0]

    def log(self, name: str) -> str:
        return self.procs[name][1].read_text(errors="replace")

    def stop(self) -> None:
        for proc, _ in reversed(list(self.procs.values())):
            self.topo.stop(proc)

    # Requests go out of the controller namespace, to the controller's bridge address.
    def http(self, method: str, path: str, body: Any = None, token: str | None = None,
             timeout: float = 5.0) -> tuple[int, Any]:
        return self.topo.call_in("ctl", http_json, method, self.base + path, body, token,
                                 timeout, timeout=timeout + 5)

    def token(self) -> str:
        status, body = self.http("POST", "auth-token/",
                                 {"pfcon_user": "pfcon", "pfcon_password": "pfcon1234"})
        assert status == 200, body
        return str(body["token"])

    def agents(self) -> dict[str, dict]:
        status, body = self.http("GET", "agents/", token=self.token())
        assert status == 200, body
        return {a["name"]: a for a in body["agents"]}


def test_the_advertised_record_becomes_a_connect_url() -> None:
    """No network: how an answer turns into the URL the agent dials."""
    def record(**props: str) -> ServiceInfo:
        return ServiceInfo(SERVICE_TYPE, f"pfleet-x-1.{SERVICE_TYPE}", port=30443,
                           addresses=[socket.inet_aton("127.0.0.1"),
                                      socket.inet_aton("198.51.100.10")],
                           properties=props, server="pfleet-x.local.")

    found = controller_from_info(record(path="/api/v1/", tls="1", version="1.2"))
    assert found is not None
    assert found.url == "wss://198.51.100.10:30443/api/v1/fleet/connect"
    assert (found.address, found.port, found.tls, found.version) == ("198.51.100.10", 30443,
                                                                     True, "1.2")
    plain = controller_from_info(record(tls="0"))
    assert plain is not None and plain.url.startswith("ws://198.51.100.10:30443/api/v1/")
    assert controller_from_info(ServiceInfo(SERVICE_TYPE, f"y.{SERVICE_TYPE}", port=1,
                                            server="y.local.")) is None  # no address


def agent_health(topo: Topology, host: str) -> dict[str, Any] | None:
    """The agent's local /health, fetched from inside its own namespace (loopback)."""
    try:
        _, body = topo.call_in(host, http_json, "GET", f"http://127.0.0.1:{HEALTH_PORT}/health",
                               None, None, 2.0, timeout=10)
    except OSError:
        return None
    return body if isinstance(body, dict) else None


@pytest.fixture
def deployment(fleet_topology: Topology, tmp_path: Path) -> Iterator[Deployment]:
    topo = fleet_topology
    for host in topo.hosts[:2]:  # on-link both ways before any packet is sent
        topo.check_route("ctl", host.ip)
        topo.check_route(host, topo.controller_ip)
    d = Deployment(topo, tmp_path)
    try:
        yield d
    finally:
        d.stop()


@pytest.mark.docker
@pytest.mark.podman
def test_agents_find_the_controller_by_zeroconf(deployment: Deployment,
                                                 tmp_path: Path) -> None:
    d, topo = deployment, deployment.topo
    h1, h2 = topo.hosts[0], topo.hosts[1]
    storebase = tmp_path / "sb"
    storebase.mkdir()

    def start_agent(host: str, token: str, **env: str) -> None:
        d.start(f"agent-{host}", host, [str(BIN / "pfleet-agent")], base_env(
            PFLEET_AGENT_NAME=host, PFLEET_AGENT_TOKEN=token, CONTAINER_ENV="fake",
            STOREBASE=str(storebase), PFLEET_AGENT_STATE_DIR=str(tmp_path / f"agent-{host}"),
            PFLEET_AGENT_CONFIG=str(tmp_path / "absent.toml"), **env))

    # Host 2 first, before any controller, with a token signed by another key: it
    # browses and says so on /health ...
    forged = jwt.encode({"sub": h2.name, "typ": "pfleet-agent", "jti": "zc-h2"},
                        "a-key-that-is-not-the-controllers-key", algorithm="HS256")
    start_agent(h2.name, forged, PFLEET_HEALTH_LISTEN=f"127.0.0.1:{HEALTH_PORT}")

    def discovering() -> bool:
        if d.proc(f"agent-{h2.name}").poll() is not None:
            raise RuntimeError(f"agent exited:\n{d.log(f'agent-{h2.name}')}")
        body = agent_health(topo, h2.name)
        return body is not None and any(p.startswith("controller link down: discovering "
                                                     "controller") for p in body["problems"])

    wait_for(discovering, 15, interval=0.2, what="h2 to report discovery on /health")

    d.start("controller", "ctl", [str(BIN / "pfleet-controller"), "--dev"], base_env(
        PFLEET_LISTEN=f"{topo.controller_ip}:{PORT}", PFLEET_ZEROCONF="true",
        PFLEET_STATE_DIR=str(tmp_path / "state"), STOREBASE_MOUNT=str(storebase),
        PFLEET_HEARTBEAT_INTERVAL="1"))

    def ready() -> bool:
        if d.proc("controller").poll() is not None:
            raise RuntimeError(f"controller exited:\n{d.log('controller')}")
        with contextlib.suppress(OSError):
            return d.http("GET", "health/", timeout=1.0)[0] == 200
        return False

    wait_for(ready, 20, interval=0.2, what="controller health")
    assert f"zeroconf: _pfleet._tcp.local. on {topo.controller_ip}" in d.log("controller")

    # ... then finds the controller, is refused, and exits with 78 (EX_CONFIG) instead
    # of retrying for ever.
    assert d.proc(f"agent-{h2.name}").wait(timeout=30) == 78
    log = d.log(f"agent-{h2.name}")
    assert "found controller by zeroconf" in log and "refused" in log, log

    # Host 1 with a token the controller issued, and no controller URL either.
    status, body = d.http("POST", "agents/tokens/", {"name": h1.name}, token=d.token())
    assert status == 201, body
    start_agent(h1.name, str(body["token"]), PFLEET_HEALTH_LISTEN=f"127.0.0.1:{HEALTH_PORT}")

    def listed() -> bool:
        if d.proc(f"agent-{h1.name}").poll() is not None:
            raise RuntimeError(f"agent exited:\n{d.log(f'agent-{h1.name}')}")
        return d.agents().get(h1.name, {}).get("state") == "healthy"

    wait_for(listed, 30, interval=0.2, what="h1 to find the controller and connect")
    agents = d.agents()
    assert agents[h1.name]["found_by"] == "zeroconf"
    assert h2.name not in agents
    health = agent_health(topo, h1.name)
    assert health is not None and health["status"] == "healthy", health
    assert health["controller"] == f"ws://{topo.controller_ip}:{PORT}/api/v1/fleet/connect"
    assert health["found_by"] == "zeroconf"
