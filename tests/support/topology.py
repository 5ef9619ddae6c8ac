"""Several "hosts" on one machine: network namespaces on a bridge, each host with its
own container engine, all sharing one filesystem (the shared storeBase stands in for NFS).

Layout (``<pid>`` is the pytest process, so concurrent sessions do not collide)::

    pft-sw-<pid>    br0, one veth-<name> port per namespace below (no addresses)
    pft-ctl-<pid>   eth0 198.51.100.10/24                       (controller)
    pft-h1-<pid>    eth0 198.51.100.11/24, dockerd, docker0 198.18.10.1/24
    pft-h2-<pid>    eth0 198.51.100.12/24, dockerd, docker0 198.18.11.1/24
    pft-h3-<pid>    eth0 198.51.100.13/24, podman service, podman0 198.18.12.1/24

No namespace has a default route and the root namespace gets no leg on the bridge: test
traffic to 198.51.100.0/24 must be sent from inside these namespaces
(:meth:`Topology.run_in`, :meth:`Topology.run`, :meth:`Topology.call_in`). Before
yielding, the topology checks with ``ip route get`` that the controller reaches every host
on its own veth (and back), and that a TCP SYN from the controller to each host is answered.

Engines are started with ``nsenter --net`` (not ``ip netns exec``, which hides the cgroup
mounts) by :mod:`tests.support.daemons`; their unix sockets are on the shared filesystem,
so the docker SDK reaches them from any namespace. Image storage persists per host in
``.pfleet/test-engine/topology/h<N>-<kind>``.

Use the module-scoped fixture ``fleet_topology`` (register ``tests.support.topology`` as a
plugin) or the context manager :func:`start_topology` outside pytest. Everything started is
stopped by PID on exit and every namespace is deleted; namespaces and work directories
left by a killed earlier session (a ``pft-`` name whose PID is gone) are removed at start.

PYTEST_DONT_REWRITE: test modules may import this before it is registered as a plugin.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import dataclasses
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.support.daemons import (
    Engine,
    docker_cli,
    kill_pid,
    netns_add,
    netns_del,
    netns_exists,
    pid_alive,
    reap_docker,
    reap_podman,
    require,
    run,
    run_dockerd,
    run_podman_service,
    state_dir,
    stop_popen,
    sweep_dead_netns,
    umount_under,
    wait_until,
)

__all__ = [
    "CONTROLLER_IP",
    "HOST_NETWORK",
    "Host",
    "RouteError",
    "Topology",
    "fleet_topology",
    "start_topology",
]

PREFIX = "pft-"
HOST_NETWORK = ipaddress.ip_network("198.51.100.0/24")
CONTAINER_NETWORK = ipaddress.ip_network("198.18.0.0/15")
CONTROLLER_IP = "198.51.100.10"
FIRST_HOST = 11  # h1 is 198.51.100.11
MAX_HOSTS = 15
BRIDGE = "br0"
IFACE = "eth0"  # every namespace's leg on the bridge
CONTROLLER = "ctl"
DEFAULT_KINDS = ("docker", "docker", "podman")

# What a killed earlier session may have left (only with a PID that is gone).
_LEFTOVER_NETNS = re.compile(r"pft-(?:sw|ctl|h\d+|reap)-(?P<pid>\d+)")
_LEFTOVER_WORKDIR = re.compile(r"pft-topo-(?P<pid>\d+)-\w+")

_PROBE = """
import socket, sys
timeout = float(sys.argv[1])
for target in sys.argv[2:]:
    ip, port = target.rsplit(":", 1)
    try:
        socket.create_connection((ip, int(port)), timeout=timeout).close()
        print("open")
    except ConnectionRefusedError:
        print("refused")
    except OSError as e:
        print("down", type(e).__name__)
"""

CLONE_NEWNET = 0x40000000
T = TypeVar("T")

_active = threading.Lock()  # one topology per process (names carry only the PID)


class RouteError(AssertionError):
    """A namespace would not send to an address over its own veth on the test bridge."""


@dataclasses.dataclass
class Host:
    """One "host": a network namespace on the bridge, with its own engine (or none)."""

    name: str  # "h1"
    ns: str  # network namespace, /run/netns/<ns>
    ip: str  # 198.51.100.x on its eth0
    engine_kind: str | None  # "docker" | "podman" | None
    veth: str  # its port on the bridge, in the switch namespace
    bridge_subnet: str | None  # the engine's default container bridge
    engine: Engine | None = dataclasses.field(default=None, repr=False)

    @property
    def engine_url(self) -> str | None:
        return self.engine.url if self.engine else None

    @property
    def nsenter(self) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.ns}"]

    def client(self, **kwargs: Any) -> Any:
        """A ``docker.DockerClient`` for this host's engine (close it when done)."""
        if self.engine is None:
            raise RuntimeError(f"{self.name} has no engine")
        return self.engine.client(**kwargs)


@dataclasses.dataclass
class Topology:
    """What :func:`start_topology` built. Wherever a namespace is expected, a
    :class:`Host`, a host name (``"h1"``), ``"ctl"`` or a namespace name will do.

    Processes: :meth:`run_in` (background, ``Popen``), :meth:`run` / :meth:`python` (to
    completion), :meth:`call_in` (a function on a thread inside a namespace). Network:
    :meth:`route`, :meth:`check_route`, :meth:`probe`, :meth:`set_link`, :meth:`link_up`.
    Engines: :meth:`kill_engine`, :meth:`start_engine`. :meth:`heal` undoes faults.
    """

    switch_ns: str
    controller_ns: str
    controller_ip: str
    hosts: list[Host]
    storebase: Path  # shared by all hosts ("NFS")
    workdir: Path
    startup_seconds: float = 0.0
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    _procs: list[subprocess.Popen[Any]] = dataclasses.field(default_factory=list, repr=False)
    _threads: dict[str, concurrent.futures.ThreadPoolExecutor] = dataclasses.field(
        default_factory=dict, repr=False
    )

    # ----------------------------------------------------------------- lookups

    @property
    def namespaces(self) -> list[str]:
        """Every namespace of the topology (switch, controller, hosts)."""
        return [self.switch_ns, self.controller_ns, *(h.ns for h in self.hosts)]

    def host(self, name: str | Host) -> Host:
        if isinstance(name, Host):
            return name
        for h in self.hosts:
            if name in (h.name, h.ns, h.ip):
                return h
        raise KeyError(f"no host {name!r} in the topology")

    def ns_of(self, where: str | Host) -> str:
        """The namespace named by a host, a host name, ``"ctl"`` or a namespace name."""
        if isinstance(where, Host):
            return where.ns
        if where in (CONTROLLER, self.controller_ns):
            return self.controller_ns
        if where == self.switch_ns:
            return where
        return self.host(where).ns

    def nsenter(self, where: str | Host) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.ns_of(where)}"]

    # ----------------------------------------------------------------- processes

    def run_in(
        self, where: str | Host, argv: Sequence[str], **popen_kwargs: Any
    ) -> subprocess.Popen[Any]:
        """Start ``argv`` in a namespace (``nsenter --net``); a ``subprocess.Popen``.

        Stopped by PID (SIGTERM, bounded wait, SIGKILL) when the topology ends, or earlier
        with :meth:`stop`. Defaults: stdin from /dev/null, a new session.
        """
        popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
        popen_kwargs.setdefault("start_new_session", True)
        proc = subprocess.Popen([*self.nsenter(where), *argv], **popen_kwargs)
        self._procs.append(proc)
        return proc

    def run(
        self, where: str | Host, argv: Sequence[str], timeout: float = 30.0, **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` to completion in a namespace; output captured as text."""
        return run([*self.nsenter(where), *argv], timeout=timeout, **kwargs)

    def python(
        self, where: str | Host, code: str, *args: str, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """Run a snippet with this interpreter (stdlib only) in a namespace."""
        return self.run(where, [sys.executable, "-I", "-S", "-c", code, *args], timeout=timeout)

    def stop(self, proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
        stop_popen(proc, timeout)

    def call_in(
        self,
        where: str | Host,
        fn: Callable[..., T],
        *args: Any,
        timeout: float = 60.0,
        **kwargs: Any,
    ) -> T:
        """Call ``fn(*args, **kwargs)`` in this process, on a thread that lives in the
        namespace (``setns``; one thread per namespace): sockets it opens send from there,
        e.g. ``processes.http_json`` to a controller in the controller namespace. Check
        the route (:meth:`check_route`) before the first request to a new address."""
        ns = self.ns_of(where)
        pool = self._threads.get(ns)
        if pool is None:
            pool = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix=f"netns-{ns}", initializer=_enter_netns, initargs=(ns,)
            )
            self._threads[ns] = pool
        return pool.submit(fn, *args, **kwargs).result(timeout)

    # ----------------------------------------------------------------- network

    def route(self, where: str | Host, dst: str) -> dict[str, Any] | None:
        """``ip -n NS route get DST`` as a dict, or None when there is no route."""
        ns = self.ns_of(where)
        res = run(["ip", "-j", "-n", ns, "route", "get", str(dst)], timeout=10)
        if res.returncode != 0:
            return None
        routes = json.loads(res.stdout or "[]")
        return routes[0] if routes else None

    def check_route(self, where: str | Host, dst: str) -> dict[str, Any]:
        """Assert ``NS`` sends to ``dst`` on-link over its own interface; the route.

        A topology address (198.51.100.0/24) must go out of the namespace's own ``eth0``
        on the bridge, a container address (198.18.0.0/15) to a host's own engine bridge;
        never via a gateway. Anything else raises :class:`RouteError`.
        """
        ns = self.ns_of(where)
        addr = ipaddress.ip_address(dst)
        r = self.route(ns, str(addr))
        if r is None:
            raise RouteError(f"no route from {ns} to {addr}")
        if r.get("gateway"):
            raise RouteError(f"{ns} would send to {addr} via gateway {r['gateway']}: {r}")
        dev = r.get("dev")
        own = self._ip_of(ns)
        if own is not None and addr == ipaddress.ip_address(own):
            if dev != "lo":
                raise RouteError(f"{ns}: own address {addr} not local: {r}")
        elif addr in HOST_NETWORK:
            if ns == self.switch_ns or dev != IFACE:
                raise RouteError(f"{ns} would send to {addr} on {dev!r}, not its {IFACE}: {r}")
        elif addr in CONTAINER_NETWORK:
            if ns not in {h.ns for h in self.hosts} or dev in (IFACE, "lo", None):
                raise RouteError(f"{ns} has no engine bridge for {addr}: {r}")
        else:
            raise RouteError(f"{addr} is outside the topology, yet {ns} has a route: {r}")
        return r

    def probe(
        self, where: str | Host, ip: str, port: int, timeout: float = 1.0, listening: bool = False
    ) -> bool:
        """True when a TCP SYN from ``where`` to ``ip:port`` is answered (accepted or reset;
        with ``listening`` only when accepted). The route is checked first."""
        self.check_route(where, ip)
        result = self._probe_many(where, [(ip, port)], timeout)[0]
        return result == "open" if listening else result in ("open", "refused")

    def set_link(self, host: str | Host, up: bool) -> None:
        """Take a host's (or ``"ctl"``'s) port on the bridge down or up."""
        veth = self._veth_of(host)
        state = "up" if up else "down"
        res = run(["ip", "-n", self.switch_ns, "link", "set", veth, state], timeout=10)
        if res.returncode != 0:
            raise RuntimeError(f"ip link set {veth} {state}: {res.stderr.strip()}")

    def link_up(self, host: str | Host) -> bool:
        res = run(["ip", "-j", "-n", self.switch_ns, "link", "show", self._veth_of(host)])
        return res.returncode == 0 and "UP" in json.loads(res.stdout)[0].get("flags", [])

    # ----------------------------------------------------------------- engines

    def kill_engine(self, host: str | Host) -> None:
        """SIGKILL a host's engine API daemon (dockerd / podman service), as a crash would;
        :meth:`start_engine` brings the API back. Running containers: dockerd's managed
        containerd dies with it and the restarted dockerd (no live-restore) finds them
        exited; podman's containers keep running under conmon."""
        h = self.host(host)
        if h.engine is None:
            raise RuntimeError(f"{h.name} has no engine")
        h.engine.kill()

    def start_engine(self, host: str | Host) -> float:
        """Start a killed engine again on the same storage; seconds until it answered."""
        h = self.host(host)
        if h.engine is None:
            raise RuntimeError(f"{h.name} has no engine")
        return h.engine.restart()

    def heal(self) -> None:
        """Every link up and every engine running again (after fault tests)."""
        for h in self.hosts:
            self.set_link(h, True)
            if h.engine is not None and not h.engine.running():
                self.start_engine(h)
        self.set_link(CONTROLLER, True)

    # ----------------------------------------------------------------- internals

    def _ip_of(self, ns: str) -> str | None:
        if ns == self.controller_ns:
            return self.controller_ip
        for h in self.hosts:
            if h.ns == ns:
                return h.ip
        return None

    def _veth_of(self, where: str | Host) -> str:
        if where == CONTROLLER or where == self.controller_ns:
            return f"veth-{CONTROLLER}"
        return self.host(where).veth

    def _probe_many(
        self, where: str | Host, targets: list[tuple[str, int]], timeout: float
    ) -> list[str]:
        res = self.python(
            where,
            _PROBE,
            str(timeout),
            *(f"{ip}:{port}" for ip, port in targets),
            timeout=10 + timeout * len(targets),
        )
        lines = res.stdout.splitlines()
        if res.returncode != 0 or len(lines) != len(targets):
            raise RuntimeError(f"probe from {self.ns_of(where)} failed: {res.stderr.strip()}")
        return [line.split()[0] for line in lines]

    def _build_network(self) -> None:
        sw = self.switch_ns
        ip = ["ip", "-n", sw]
        netns_add(sw)
        _check([*ip, "link", "add", BRIDGE, "type", "bridge"])
        _check([*ip, "link", "set", BRIDGE, "up"])
        legs = [(CONTROLLER, self.controller_ns, self.controller_ip)]
        legs += [(h.name, h.ns, h.ip) for h in self.hosts]
        for name, ns, addr in legs:
            netns_add(ns)  # lo up
            veth = f"veth-{name}"
            # Created in the switch namespace, peer straight into the host's: nothing ever
            # appears in the root namespace.
            _check([*ip, "link", "add", veth, "type", "veth", "peer", "name", IFACE, "netns", ns])
            _check([*ip, "link", "set", veth, "master", BRIDGE, "up"])
            plen = HOST_NETWORK.prefixlen
            _check(["ip", "-n", ns, "addr", "add", f"{addr}/{plen}", "dev", IFACE])
            _check(["ip", "-n", ns, "link", "set", IFACE, "up"])

    def _verify_network(self) -> None:
        """Routes both ways on the bridge, then a SYN from the controller to each host."""
        for h in self.hosts:
            self.check_route(self.controller_ns, h.ip)
            self.check_route(h.ns, self.controller_ip)
        for ns in self.namespaces:
            if self.route(ns, "8.8.8.8") is not None:
                raise RouteError(f"{ns} has a route out of the topology")
        targets = [(h.ip, 9) for h in self.hosts]

        def answered() -> bool:
            results = self._probe_many(self.controller_ns, targets, 1.0)
            return all(r in ("open", "refused") for r in results)

        try:
            wait_until(answered, 10.0, 0.2, "hosts to answer the controller on the bridge")
        except TimeoutError as e:
            raise RouteError(f"{e}: the test bridge does not carry traffic") from e

    def _stop_processes(self) -> None:
        for pool in self._threads.values():
            pool.shutdown(wait=True, cancel_futures=True)
        self._threads.clear()
        for proc in reversed(self._procs):
            stop_popen(proc, 10.0)
        self._procs.clear()

    def _delete_namespaces(self) -> None:
        for ns in reversed(self.namespaces):  # hosts, controller, then the switch
            netns_del(ns)
        left = [ns for ns in self.namespaces if netns_exists(ns)]
        if left:
            raise RuntimeError(f"could not delete namespaces {left}")


def _enter_netns(ns: str) -> None:
    """Move the calling thread (only) into network namespace ``ns``."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({ns}): {os.strerror(err)}")
        want, got = os.fstat(fd), os.stat("/proc/thread-self/ns/net")
        if (want.st_dev, want.st_ino) != (got.st_dev, got.st_ino):
            raise OSError(f"thread did not enter {ns}")
    finally:
        os.close(fd)


def _check(argv: list[str]) -> None:
    res = run(argv, timeout=20)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {res.stderr.strip()}")


def _root_routes_into_topology() -> list[dict[str, Any]]:
    """Routes of the root namespace that cover part of 198.51.100.0/24 (not default)."""
    res = run(["ip", "-j", "route", "show", "table", "all"], timeout=10)
    found = []
    for r in json.loads(res.stdout or "[]"):
        dst = r.get("dst", "")
        if dst in ("", "default"):
            continue
        with contextlib.suppress(ValueError):
            net = ipaddress.ip_network(dst, strict=False)
            if net.version == 4 and net.overlaps(HOST_NETWORK):
                found.append(r)
    return found


def _remove_cgroups(name: str) -> None:
    """Remove the (empty) cgroup-parent directories ``name`` a dockerd created."""
    root = Path("/sys/fs/cgroup")
    for d in [root / name, *root.glob(f"*/{name}")]:
        with contextlib.suppress(OSError):
            d.rmdir()  # fails, harmlessly, while a cgroup is still in use


def _dead_sessions_netns() -> dict[str, tuple[int, int]]:
    """Name -> (st_dev, st_ino) of the namespaces a killed earlier session left behind."""
    found = {}
    with contextlib.suppress(OSError):
        for name in os.listdir("/run/netns"):
            m = _LEFTOVER_NETNS.fullmatch(name)
            if m and not pid_alive(int(m.group("pid"))):
                with contextlib.suppress(OSError):
                    st = os.stat(f"/run/netns/{name}")
                    found[name] = (st.st_dev, st.st_ino)
    return found


def _sweep_leftovers(dead_netns: dict[str, tuple[int, int]]) -> None:
    """Stop what still runs in a killed session's namespaces (controllers and agents it
    started; its engines were reaped already), then delete the namespaces, the cgroups
    its engines created and its work directories. Processes are found by the identity of
    the namespace, since reaping an engine may have removed the name already."""
    inodes = set(dead_netns.values())
    if inodes:
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            with contextlib.suppress(OSError):
                st = os.stat(f"/proc/{entry}/ns/net")
                if (st.st_dev, st.st_ino) in inodes:
                    kill_pid(int(entry), timeout=5.0)
    for name in {*dead_netns, *sweep_dead_netns(_LEFTOVER_NETNS)}:
        _remove_cgroups(name)
    tmp = Path(tempfile.gettempdir())
    for d in tmp.glob("pft-topo-*"):
        m = _LEFTOVER_WORKDIR.fullmatch(d.name)
        if m and d.is_dir() and not pid_alive(int(m.group("pid"))):
            umount_under(d)
            shutil.rmtree(d, ignore_errors=True)


def _kinds(n_hosts: int, engine_kinds: Sequence[str | None] | None) -> list[str | None]:
    if engine_kinds is None:
        engine_kinds = (
            list(DEFAULT_KINDS) if n_hosts == 3 else ["docker"] * (n_hosts - 1) + ["podman"]
        )
    kinds = list(engine_kinds)
    if len(kinds) != n_hosts or not 1 <= n_hosts <= MAX_HOSTS:
        raise ValueError(f"need 1..{MAX_HOSTS} hosts and one engine kind each, got {kinds}")
    for k in kinds:
        if k not in ("docker", "podman", None):
            raise ValueError(f"unknown engine kind {k!r}")
    return kinds


@contextlib.contextmanager
def start_topology(
    n_hosts: int = 3,
    engine_kinds: Sequence[str | None] | None = None,
    *,
    images: bool = True,
    workdir: Path | None = None,
) -> Iterator[Topology]:
    """Bring up the bridge, the controller and ``n_hosts`` host namespaces with their
    engines (default: docker, docker, podman; ``None`` for a host without one), check the
    routes, yield the :class:`Topology`, and take everything down again.

    ``images``: make sure each engine holds the test images. ``workdir``: where the shared
    ``storeBase`` is created (default a temporary directory, removed afterwards).
    """
    kinds = _kinds(n_hosts, engine_kinds)
    require("ip", "nsenter", "umount", *(["dockerd"] if "docker" in kinds else []),
            *(["podman"] if "podman" in kinds else []))  # fmt: skip
    if "docker" in kinds:
        docker_cli()
    if not _active.acquire(blocking=False):
        raise RuntimeError("a topology is already running in this process")
    t0 = time.monotonic()
    pid = os.getpid()
    timings: dict[str, float] = {}
    try:
        with contextlib.ExitStack() as stack:
            if workdir is None:
                workdir = Path(tempfile.mkdtemp(prefix=f"pft-topo-{pid}-"))
                stack.callback(shutil.rmtree, workdir, ignore_errors=True)
                stack.callback(umount_under, workdir)
            storebase = workdir / "storeBase"
            storebase.mkdir(parents=True, exist_ok=True)

            dead_netns = _dead_sessions_netns()
            # Engine storage first: reaping a crashed session's engine may still need its
            # old namespaces; only then are dead sessions' namespaces deleted.
            states: dict[int, tuple[Path, bool]] = {}
            for i, kind in enumerate(kinds, 1):
                if kind == "docker":
                    reap = reap_docker
                elif kind == "podman":

                    def reap(state: Path) -> bool:
                        return reap_podman(state, f"{PREFIX}reap-{pid}")
                else:
                    continue
                states[i] = stack.enter_context(state_dir(f"topology/h{i}-{kind}", reap))
            _sweep_leftovers(dead_netns)
            timings["reap"] = time.monotonic() - t0

            routes_before = _root_routes_into_topology()
            hosts = [
                Host(
                    name=f"h{i}",
                    ns=f"{PREFIX}h{i}-{pid}",
                    ip=str(HOST_NETWORK[FIRST_HOST - 1 + i]),
                    engine_kind=kind,
                    veth=f"veth-h{i}",
                    bridge_subnet=f"198.18.{9 + i}.0/24" if kind else None,
                )
                for i, kind in enumerate(kinds, 1)
            ]
            topo = Topology(
                switch_ns=f"{PREFIX}sw-{pid}",
                controller_ns=f"{PREFIX}{CONTROLLER}-{pid}",
                controller_ip=CONTROLLER_IP,
                hosts=hosts,
                storebase=storebase,
                workdir=workdir,
                timings=timings,
            )
            t = time.monotonic()
            stack.callback(topo._delete_namespaces)
            topo._build_network()
            topo._verify_network()
            if _root_routes_into_topology() != routes_before:
                raise RouteError("the root namespace got a route into 198.51.100.0/24")
            timings["network"] = time.monotonic() - t

            for i, h in enumerate(hosts, 1):
                t = time.monotonic()
                if h.engine_kind == "docker":
                    assert h.bridge_subnet is not None
                    gateway = ipaddress.ip_network(h.bridge_subnet)[1]
                    cm = run_dockerd(
                        *states[i],
                        netns=h.ns,
                        bip=f"{gateway}/24",
                        address_pool=f"base=198.19.{16 * i}.0/20,size=24",
                        tag=h.ns,  # containerd namespaces and cgroup parent
                        own_netns=False,
                        images=images,
                        scratch_prefix=f"pft-docker-{h.name}-",
                    )
                elif h.engine_kind == "podman":
                    cm = run_podman_service(
                        *states[i],
                        netns=h.ns,
                        own_netns=False,
                        images=images,
                        scratch_prefix=f"pft-podman-{h.name}-",
                        default_subnet=h.bridge_subnet,
                    )
                else:
                    continue
                stack.callback(_remove_cgroups, h.ns)  # after the engine stopped
                h.engine = stack.enter_context(cm)
                timings[f"{h.name}-{h.engine_kind}"] = time.monotonic() - t

            # Runs first on exit: processes started in the namespaces, then engines that a
            # test killed are started again so that they can remove their containers.
            stack.callback(_quietly, topo.heal)
            stack.callback(topo._stop_processes)
            topo.startup_seconds = time.monotonic() - t0
            yield topo
    finally:
        _active.release()


def _quietly(fn: Any) -> None:
    with contextlib.suppress(Exception):
        fn()


@pytest.fixture(scope="module")
def fleet_topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    """A controller namespace and three hosts (docker, docker, podman); see module doc."""
    with start_topology(workdir=tmp_path_factory.mktemp("fleet-topology")) as topo:
        yield topo
