"""Real pfleet processes for end-to-end tests: the controller (optionally with its
embedded agent) and stand-alone agents, started from the installed commands,
killed with SIGKILL on demand and restarted on the same state.

Every process is stopped by PID when the fixture ends; output goes to a log file
whose tail is shown when a start fails.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent
START_TIMEOUT = 30.0


def http_json(
    method: str,
    url: str,
    body: object | None = None,
    token: str | None = None,
    timeout: float = 10.0,
    ca: Path | None = None,
) -> tuple[int, object]:
    """One JSON request; ``ca``: the CA file an https server's certificate must chain to."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    context = ssl.create_default_context(cafile=str(ca)) if ca is not None else None
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            text = response.read().decode()
            return response.status, json.loads(text) if text.strip() else None
    except urllib.error.HTTPError as exc:
        text = exc.read().decode()
        try:
            return exc.code, json.loads(text)
        except ValueError:
            return exc.code, text


def wait_for(predicate, timeout: float, interval: float = 0.1, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


@dataclass
class Proc:
    """One daemon: its argv, environment and log; restartable after a kill."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None, "already running"
        self.starts += 1
        log = self.log_path.open("ab")
        log.write(f"\n==== start {self.starts} ====\n".encode())
        log.flush()
        self.process = subprocess.Popen(
            self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill9(self) -> None:
        if self.alive():
            assert self.process is not None
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self, timeout: float = 15.0) -> None:
        if not self.alive():
            return
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@dataclass
class ControllerProc(Proc):
    port: int = 0
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v1/"

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        def ready() -> bool:
            if not self.alive():
                raise RuntimeError(f"controller exited:\n{self.log_tail()}")
            try:
                return http_json("GET", self.base + "health/", timeout=1.0)[0] == 200
            except OSError:
                return False

        wait_for(ready, timeout, what="controller health")

    def token(self) -> str:
        status, body = http_json(
            "POST",
            self.base + "auth-token/",
            {"pfcon_user": "pfcon", "pfcon_password": "pfcon1234"},
        )
        assert status == 200, body
        assert isinstance(body, dict)
        return str(body["token"])

    def agent_token(self, name: str) -> str:
        status, body = http_json(
            "POST", self.base + "agents/tokens/", {"name": name}, token=self.token()
        )
        assert status == 201, body
        assert isinstance(body, dict)
        return str(body["token"])

    def agents(self) -> list[dict]:
        status, body = http_json("GET", self.base + "agents/", token=self.token())
        assert status == 200, body
        assert isinstance(body, dict)
        return list(body["agents"])

    def wait_agent(self, name: str, timeout: float = START_TIMEOUT) -> None:
        def connected() -> bool:
            if not self.alive():
                raise RuntimeError(f"controller exited:\n{self.log_tail()}")
            return any(
                a["name"] == name and a["state"] in ("healthy", "unhealthy") for a in self.agents()
            )

        wait_for(connected, timeout, what=f"agent {name} to connect")

    def jobs(self) -> list[dict]:
        status, body = http_json("GET", self.base + "fleet/jobs/?all=1", token=self.token())
        assert status == 200, body
        assert isinstance(body, dict)
        return list(body["jobs"])


def controller_proc(
    workdir: Path,
    port: int,
    env: dict[str, str],
    *,
    local_agent: bool,
    extra_args: list[str] | None = None,
    dev: bool = True,
) -> ControllerProc:
    """The controller command (``--dev`` unless ``dev`` is False, optionally
    ``--local-agent``) and its environment; ``extra_args`` are appended to its argv
    (e.g. ``--log-level``)."""
    full_env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", "/root"),
        "PFLEET_LISTEN": f"127.0.0.1:{port}",
        "PFLEET_STATE_DIR": str(workdir / "state"),
        "PFLEET_HEARTBEAT_INTERVAL": "1",
        "PYTHONUNBUFFERED": "1",
        **env,
    }
    argv = [str(BIN / "pfleet-controller"), *(["--dev"] if dev else []),
            *(["--local-agent"] if local_agent else [])]
    argv += list(extra_args or [])
    return ControllerProc(
        name="controller", argv=argv, env=full_env, log_path=workdir / "controller.log", port=port
    )


def agent_proc(workdir: Path, name: str, controller: ControllerProc, env: dict[str, str]) -> Proc:
    full_env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", "/root"),
        "PFLEET_AGENT_NAME": name,
        "PFLEET_CONTROLLER_URL": controller.base,
        "PFLEET_AGENT_TOKEN": controller.agent_token(name),
        "PFLEET_AGENT_STATE_DIR": str(workdir / f"agent-{name}"),
        "PFLEET_AGENT_CONFIG": str(workdir / "absent-agent.toml"),
        "PFLEET_HEALTH_LISTEN": "",
        "PYTHONUNBUFFERED": "1",
        **env,
    }
    return Proc(
        name=f"agent-{name}",
        argv=[str(BIN / "pfleet-agent")],
        env=full_env,
        log_path=workdir / f"agent-{name}.log",
    )
