"""Hosts for real ``ansible-playbook`` runs: four containers with their own filesystems on
a private dockerd, reached through the ``community.docker.docker`` connection.

Layout (``<pid>`` is the pytest process)::

    netns pfa-<pid>      the "outer" dockerd: docker0 198.18.40.1/24, network
                         pfleet-ansible 198.18.42.0/24 (no route out: no internet)
      ctl   198.18.42.10   pfleet_controller
      h1    198.18.42.11   pfleet_docker_hosts   its own dockerd: bip 198.18.43.1/24
      h2    198.18.42.12   pfleet_docker_hosts   its own dockerd: bip 198.18.45.1/24
      h3    198.18.42.13   pfleet_podman_hosts   its own Podman: subnet 198.18.47.0/24

Each container runs ``tests/support/ansible_service.py`` as PID 1 and as the roles'
service command (no systemd here: it starts the ExecStart line of the rendered units).
The engines inside the hosts need nearly everything a privileged container has, but
``--privileged`` would ask for CAP_SYS_RESOURCE, which this machine does not grant: every
other capability, no seccomp/AppArmor, unmasked /proc and /sys, all devices, and the
cgroup mounts remounted read-write. One host directory is bind-mounted at the storeBase
path of every host, standing in for NFS (no NFS client in this kernel).

The containers reach nothing outside the namespace; the tests talk to the controller
from a thread inside the namespace (:meth:`AnsibleTestbed.call`) after checking the route.

PYTEST_DONT_REWRITE
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import yaml

from tests.support.ansible_image import IMAGE, ensure_image
from tests.support.ansible_wheels import Wheels
from tests.support.daemons import (
    REPO_ROOT,
    Engine,
    EngineStartError,
    reap_docker,
    require,
    run,
    run_dockerd,
    state_dir,
    sweep_dead_netns,
    wait_until,
)
from tests.support.topology import _enter_netns

T = TypeVar("T")

NETNS_PREFIX = "pfa-"
OUTER_BIP = "198.18.40.1/24"
OUTER_POOL = "base=198.18.41.0/24,size=24"
NETWORK = "pfleet-ansible"
SUBNET = "198.18.42.0/24"
SERVICE_PATH = "/usr/local/sbin/pfleet-test-service"
# The roles' service command (run through the hosts' python3: no exec bit needed).
SERVICE = f"/usr/bin/python3 {SERVICE_PATH}"
SERVICE_SRC = REPO_ROOT / "tests" / "support" / "ansible_service.py"
STOREBASE = "/var/local/storeBase"
CONTROLLER_PORT = 30005
PLAYBOOKS = REPO_ROOT / "playbooks"
PLAYBOOK_TIMEOUT = 600.0
_DEAD_NETNS = re.compile(re.escape(NETNS_PREFIX) + r"(?P<pid>\d+)")
_RECAP = re.compile(r"^(?P<host>\S+)\s+: ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+"
                    r"unreachable=(?P<unreachable>\d+)\s+failed=(?P<failed>\d+)", re.M)
# Containers that run an engine need (almost) a privileged container; see module doc.
_ENGINE_OPTIONS = ["--cap-add", "ALL", "--cap-drop", "SYS_RESOURCE",
                   "--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined",
                   "--security-opt", "systempaths=unconfined", "--device-cgroup-rule", "a *:* rwm"]
_REMOUNT = ("mount -o remount,rw /sys && for d in /sys/fs/cgroup/*; do "
            "mount -o remount,bind,rw \"$d\" || exit 1; done")


@dataclasses.dataclass(frozen=True)
class TargetHost:
    name: str
    ip: str
    group: str  # the inventory group
    engine: str | None  # docker | podman | None
    host_vars: dict[str, Any]


HOSTS = (
    TargetHost("ctl", "198.18.42.10", "pfleet_controller", None, {}),
    TargetHost("h1", "198.18.42.11", "pfleet_docker_hosts", "docker", {
        "container_engine_docker_bip": "198.18.43.1/24",
        "container_engine_docker_address_pools": [{"base": "198.18.44.0/24", "size": 24}]}),
    TargetHost("h2", "198.18.42.12", "pfleet_docker_hosts", "docker", {
        "container_engine_docker_bip": "198.18.45.1/24",
        "container_engine_docker_address_pools": [{"base": "198.18.46.0/24", "size": 24}]}),
    TargetHost("h3", "198.18.42.13", "pfleet_podman_hosts", "podman", {
        "container_engine_podman_subnet": "198.18.47.0/24",
        "container_engine_podman_subnet_pools": [{"base": "198.18.48.0/24", "size": 24}]}),
)
AGENT_HOSTS = tuple(h.name for h in HOSTS if h.engine)


@dataclasses.dataclass
class PlaybookRun:
    argv: list[str]
    returncode: int
    output: str  # stdout and stderr, interleaved

    def recap(self) -> dict[str, dict[str, int]]:
        """PLAY RECAP per host: ok, changed, unreachable, failed."""
        return {m["host"]: {k: int(m[k]) for k in ("ok", "changed", "unreachable", "failed")}
                for m in _RECAP.finditer(self.output)}

    def describe(self) -> str:
        return f"{' '.join(self.argv)} -> {self.returncode}\n{self.output[-12000:]}"


@dataclasses.dataclass
class AnsibleTestbed:
    engine: Engine
    netns: str
    workdir: Path
    storebase: Path  # the host directory behind every host's storeBase
    inventory: Path
    secrets: dict[str, str]  # never in any playbook's output (tests add the agents' tokens)
    wheels: Wheels
    _pool: concurrent.futures.ThreadPoolExecutor | None = dataclasses.field(default=None,
                                                                          repr=False)

    @property
    def controller_url(self) -> str:
        return f"http://{HOSTS[0].ip}:{CONTROLLER_PORT}/api/v1/"

    # ------------------------------------------------------------------ commands

    def docker(self, *args: str, timeout: float = 120.0,
               input: str | None = None) -> subprocess.CompletedProcess[str]:
        return run([*self.engine.cli, *args], timeout=timeout, input=input)

    def exec(self, host: str, *argv: str, timeout: float = 120.0,
             input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside a host (as root)."""
        return self.docker("exec", "-i", host, *argv, timeout=timeout, input=input)

    def sh(self, host: str, script: str, timeout: float = 120.0) -> str:
        res = self.exec(host, "sh", "-c", script, timeout=timeout)
        if res.returncode != 0:
            raise AssertionError(f"{host}: {script!r} -> {res.returncode}: {res.stderr}")
        return res.stdout

    def service(self, host: str, action: str, unit: str) -> subprocess.CompletedProcess[str]:
        return self.exec(host, *SERVICE.split(), action, unit, timeout=90)

    def service_pid(self, host: str, unit: str) -> int | None:
        res = self.service(host, "show", unit)
        if res.returncode != 0:
            raise AssertionError(f"{host}: show {unit}: {res.stderr}")
        pid = json.loads(res.stdout)["pid"]
        return int(pid) if pid else None

    def playbook(self, name: str, *extra: str, timeout: float = PLAYBOOK_TIMEOUT) -> PlaybookRun:
        """``ansible-playbook -i <inventory> playbooks/<name> <extra...>`` from the
        checkout (its ansible.cfg), the hosts reached through this testbed's dockerd."""
        argv = [str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(self.inventory),
                str(PLAYBOOKS / name), *extra]
        env = {**_clean_env(), "DOCKER_HOST": self.engine.url,
               "ANSIBLE_CONFIG": str(REPO_ROOT / "ansible.cfg"),
               "ANSIBLE_HOME": str(self.workdir / "ansible-home"),
               "ANSIBLE_LOCAL_TEMP": str(self.workdir / "ansible-tmp"),
               "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0",
               "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
        try:
            res = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True, timeout=timeout, env=env, cwd=REPO_ROOT)
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else ""
            raise AssertionError(f"{' '.join(argv)} timed out after {timeout:.0f} s:\n"
                                 f"{out[-8000:]}") from exc
        run = PlaybookRun(argv, res.returncode, res.stdout)
        leaked = [name for name, value in self.secrets.items() if value in run.output]
        if leaked:
            raise AssertionError(f"{' '.join(argv)} printed the secrets {leaked}")
        return run

    # ------------------------------------------------------------------ network

    def call(self, fn: Callable[..., T], *args: Any, timeout: float = 300.0,
             **kwargs: Any) -> T:
        """Call ``fn`` on a thread inside the testbed's network namespace (client
        traffic to the hosts goes from there)."""
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix=f"netns-{self.netns}", initializer=_enter_netns,
                initargs=(self.netns,))
        return self._pool.submit(fn, *args, **kwargs).result(timeout)

    def check_route(self, ip: str) -> None:
        """The namespace sends to ``ip`` on-link over a bridge of its own dockerd."""
        res = run(["ip", "-j", "-n", self.netns, "route", "get", ip], timeout=10)
        routes = json.loads(res.stdout or "[]") if res.returncode == 0 else []
        if not routes or routes[0].get("gateway") or not str(routes[0].get("dev", "")).startswith(
                "br-"):
            raise AssertionError(f"{self.netns} would not send to {ip} on its own bridge: "
                                 f"{routes or res.stderr}")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _clean_env() -> dict[str, str]:
    """The environment for ansible-playbook: none of pfleet's or pip's settings."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("PFLEET_", "PFCON_", "ANSIBLE_", "DOCKER_", "PIP_"))}


def inventory(wheels: Wheels, secrets: dict[str, str]) -> dict[str, Any]:
    """The test inventory: the product's groups, the hosts above, no systemd (the roles'
    ``command`` service manager with the stand-in), offline installs."""
    service = {f"{role}_service_manager": "command" for role in (
        "pfleet_controller", "pfleet_agent", "container_engine", "storebase", "slurm_login")}
    service |= {f"{role}_service_command": SERVICE for role in (
        "pfleet_controller", "pfleet_agent", "container_engine", "storebase", "slurm_login")}
    common = {
        "ansible_connection": "community.docker.docker",
        "ansible_python_interpreter": "/usr/bin/python3",
        "pfleet_source_dir": str(wheels.source),
        "pfleet_source_build_isolation": False,
        "pfleet_wheelhouse": str(wheels.wheelhouse),
        "storebase_path": STOREBASE,
        # Podman without systemd, and without CAP_SYS_RESOURCE to keep the host's limits.
        "container_engine_podman_cgroup_manager": "cgroupfs",
        "container_engine_podman_events_logger": "file",
        "container_engine_podman_default_ulimits": ["nofile=16384:16384", "nproc=8192:8192"],
        # One job at a time per agent: three jobs at once land on three hosts.
        "pfleet_agent_cpu_millicores": 1000,
        "pfleet_agent_poll_interval": 1,
        "pfleet_controller_heartbeat_interval": 1,
        **service,
    }
    groups: dict[str, Any] = {
        "testbed": {"hosts": {h.name: None for h in HOSTS}, "vars": common},
        "pfleet_storage_server": {"hosts": {}},
        "pfleet_slurm_login": {"hosts": {}},
    }
    for h in HOSTS:
        group = groups.setdefault(h.group, {"hosts": {}})
        group["hosts"][h.name] = h.host_vars or None
    groups["pfleet_controller"]["vars"] = {
        "pfleet_controller_secret_key": secrets["secret_key"],
        "pfleet_controller_pfcon_user": "pfcon",
        "pfleet_controller_pfcon_password": secrets["password"],
    }
    return {"all": {"children": groups}}


def _remove_cgroup_tree(name: str) -> None:
    """Remove the cgroup directories ``<hierarchy>/<name>`` and below (empty ones; the
    engines inside the hosts nest theirs there), deepest first."""
    root = Path("/sys/fs/cgroup")
    for top in [root / name, *root.glob(f"*/{name}")]:
        if not top.is_dir():
            continue
        for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            with contextlib.suppress(OSError):
                d.rmdir()
        with contextlib.suppress(OSError):
            top.rmdir()


def _start_host(tb_engine: Engine, h: TargetHost, storebase: Path, tag: str) -> None:
    cli = tb_engine.cli
    argv = [*cli, "run", "-d", "--name", h.name, "--hostname", h.name, "--network", NETWORK,
            "--ip", h.ip, "--tmpfs", "/run:exec,mode=0755", "--tmpfs", "/tmp:exec,mode=1777",
            "-v", f"{storebase}:{STOREBASE}", "-v", f"{SERVICE_SRC}:{SERVICE_PATH}:ro",
            "--label", f"pfleet-ansible={tag}", "--entrypoint", "/usr/bin/python3"]
    if h.engine:
        data = "/var/lib/docker" if h.engine == "docker" else "/var/lib/containers"
        argv += [*_ENGINE_OPTIONS, "-v", f"{tag}-{h.name}-engine:{data}"]
    argv += [IMAGE, SERVICE_PATH, "init"]
    res = run(argv, timeout=120)
    if res.returncode != 0:
        raise EngineStartError(f"starting host {h.name}: {res.stderr}")
    if h.engine:
        res = run([*cli, "exec", h.name, "sh", "-c", _REMOUNT], timeout=60)
        if res.returncode != 0:
            raise EngineStartError(f"{h.name}: cannot make /sys and the cgroups writable: "
                                   f"{res.stderr}")


def _stop_inner_engines(engine: Engine) -> None:
    """Remove the plugin containers the hosts' own engines run, then stop the engines, so
    that nothing nested outlives the hosts (their cgroups, their mounts)."""
    for h in HOSTS:
        if h.engine == "docker":
            script = "ids=$(docker ps -aq 2>/dev/null); [ -z \"$ids\" ] || docker rm -f $ids"
            unit = "docker"
        elif h.engine == "podman":
            script = "podman rm -af -t 0 >/dev/null 2>&1 || true"
            unit = "podman.socket"
        else:
            continue
        with contextlib.suppress(subprocess.TimeoutExpired):
            run([*engine.cli, "exec", h.name, "sh", "-c", script], timeout=120)
            run([*engine.cli, "exec", h.name, *SERVICE.split(), "stop", unit], timeout=60)


@contextlib.contextmanager
def start_testbed(workdir: Path, wheels: Wheels,
                  secrets: dict[str, str]) -> Iterator[AnsibleTestbed]:
    """The outer dockerd, the image, the hosts and the inventory; everything is removed
    again on exit (containers and volumes by the dockerd's own clean-up, then the
    dockerd by PID, its namespace, and the cgroups nested below the hosts)."""
    require("dockerd", "ip", "nsenter", "umount")
    pid = os.getpid()
    netns = f"{NETNS_PREFIX}{pid}"
    with state_dir("ansible", reap_docker) as (state, reaped):
        sweep_dead_netns(_DEAD_NETNS)  # after reaping: that may still need them
        for leftover in Path("/sys/fs/cgroup/memory").glob(f"{NETNS_PREFIX}*"):
            m = _DEAD_NETNS.fullmatch(leftover.name)
            if m and not Path(f"/proc/{m['pid']}").exists():
                _remove_cgroup_tree(leftover.name)
        try:
            with run_dockerd(state, reaped, netns=netns, bip=OUTER_BIP, address_pool=OUTER_POOL,
                             tag=netns, images=False, scratch_prefix="pfa-docker-") as engine:
                ensure_image(engine.cli)
                res = run([*engine.cli, "network", "create", "--subnet", SUBNET, NETWORK],
                          timeout=60)
                if res.returncode != 0:
                    raise EngineStartError(f"docker network create: {res.stderr}")
                storebase = workdir / "storeBase"
                storebase.mkdir(parents=True, exist_ok=True)
                tb = AnsibleTestbed(engine=engine, netns=netns, workdir=workdir,
                                    storebase=storebase, inventory=workdir / "inventory.yml",
                                    secrets=secrets, wheels=wheels)
                (workdir / "ansible-home").mkdir(exist_ok=True)
                (workdir / "ansible-tmp").mkdir(exist_ok=True)
                tb.inventory.write_text(yaml.safe_dump(inventory(wheels, secrets),
                                                       sort_keys=False))
                try:
                    for h in HOSTS:
                        _start_host(engine, h, storebase, netns)
                    for h in HOSTS:
                        wait_until(lambda h=h: tb.exec(h.name, "true", timeout=30).returncode
                                   == 0, 30, 0.2, f"host {h.name}")
                    tb.check_route(HOSTS[0].ip)
                    yield tb
                finally:
                    tb.close()
                    _stop_inner_engines(engine)
        finally:
            _remove_cgroup_tree(netns)


def import_image(tb: AnsibleTestbed, host: str, tarball: Path, name: str,
                 changes: list[str]) -> None:
    """Import a rootfs tarball as image ``name`` into a host's own engine (stdin)."""
    h = next(x for x in HOSTS if x.name == host)
    cli = ["docker", "import"] if h.engine == "docker" else ["podman", "import", "--quiet"]
    flag = "-c" if h.engine == "docker" else "--change"
    argv = [*tb.engine.cli, "exec", "-i", host, *cli]
    for change in changes:
        argv += [flag, change]
    argv += ["-", name]
    with open(tarball, "rb") as f:
        res = subprocess.run(argv, stdin=f, capture_output=True, timeout=300)
    if res.returncode != 0:
        raise AssertionError(f"{host}: import of {name} failed: {res.stderr.decode()[-2000:]}")

