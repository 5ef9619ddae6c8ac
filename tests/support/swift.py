"""A real all-in-one OpenStack Swift for the test suite.

Use from ``tests/conftest.py`` with ``pytest_plugins = ["tests.support.swift"]``. Fixture:

``swift_service`` (session)
    memcached + account, container, object and proxy servers (the ``swift`` package in
    the venv), bound on free 127.0.0.1 ports, one replica, one device, tempauth users
    ``test:tester`` / ``testing`` and pfcon's dev user ``chris:chris1234`` / ``testing``.

:func:`start_swift` is the same as a context manager, with a ``host`` to bind on and an
optional ``netns`` (a name under ``/run/netns``) to run every daemon inside a network
namespace the caller created (readiness is then probed from inside it too).

Everything lives in a private temporary directory: ``swift.conf`` (hash path salts,
storage policy and small listing limits, so that tests exercise pagination), the rings,
the four server confs, the storage device and the logs. The servers are started as
``<venv python> -c BOOT <swift.conf> <rings|-> <venv bin/swift-*-server> <conf> -v``:
``BOOT`` points ``swift.common.utils.SWIFT_CONF_FILE`` at the private ``swift.conf``
before the storage policies and constraints are loaded (the servers' ``swift_dir``
option alone only redirects the hash path salts), so nothing is read from
``/etc/swift``; the proxy's ``BOOT`` first builds the three rings. Every
process is stopped by PID at exit (SIGTERM, bounded wait, SIGKILL) and the directory is
removed.

PYTEST_DONT_REWRITE: test modules import this before it is registered as a plugin (no
asserts here need rewriting, and this avoids PytestAssertRewriteWarning).
"""

from __future__ import annotations

import contextlib
import getpass
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

__all__ = [
    "SWIFT_USERS",
    "SwiftService",
    "SwiftStartError",
    "start_swift",
    "swift_service",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
START_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0
LISTING_LIMIT = 100  # small on purpose: full listings must paginate

# account:user -> key; the first one is the fixture's default user
SWIFT_USERS: dict[str, str] = {"test:tester": "testing", "chris:chris1234": "testing"}

SERVERS = ("account", "container", "object", "proxy")

# Runs a swift server script with SWIFT_CONF_FILE pointing at our swift.conf. It must be
# set before swift.common.storage_policy / constraints are imported (they read it then).
# The proxy (the only server that reads the rings) first builds them: one interpreter
# start-up less than a separate ring builder.
_BOOT = """\
import json, runpy, sys
import swift.common.utils as utils
utils.SWIFT_CONF_FILE = sys.argv[1]
if sys.argv[2] != "-":
    from swift.common.ring import RingBuilder
    spec = json.loads(sys.argv[2])
    for name, port in spec["ports"].items():
        builder = RingBuilder(spec["part_power"], 1, 1)
        builder.add_dev({"id": 0, "region": 1, "zone": 1, "ip": spec["host"], "port": port,
                         "device": "d1", "weight": 100.0, "meta": ""})
        builder.rebalance()
        builder.get_ring().save(spec["dir"] + "/" + name + ".ring.gz")
sys.argv = sys.argv[3:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

_SWIFT_CONF = f"""\
[swift-hash]
swift_hash_path_suffix = pfleet-test-suffix
swift_hash_path_prefix = pfleet-test-prefix

[storage-policy:0]
name = Policy-0
default = yes

[swift-constraints]
container_listing_limit = {LISTING_LIMIT}
account_listing_limit = {LISTING_LIMIT}
"""

# Common [DEFAULT] of every server. Logs go to stderr (-v) and so to our log files;
# syslog would otherwise fall back to UDP localhost:514, so point it at a port nobody uses.
_DEFAULT = """\
[DEFAULT]
bind_ip = {host}
bind_port = {port}
swift_dir = {swift_dir}
devices = {devices}
mount_check = false
workers = 0
user = {user}
log_name = {name}
log_level = INFO
log_udp_host = 127.0.0.1
log_udp_port = {log_port}
recon_cache_path = {cache}
"""

_STORAGE_SERVER = """\
[pipeline:main]
pipeline = {name}-server

[app:{name}-server]
use = egg:swift#{name}
"""

_PROXY_SERVER = """\
[pipeline:main]
pipeline = catch_errors gatekeeper healthcheck proxy-logging cache listing_formats tempauth
    copy slo dlo proxy-logging proxy-server

[app:proxy-server]
use = egg:swift#proxy
account_autocreate = true

[filter:tempauth]
use = egg:swift#tempauth
{users}

[filter:cache]
use = egg:swift#memcache
memcache_servers = {memcache}

[filter:catch_errors]
use = egg:swift#catch_errors

[filter:gatekeeper]
use = egg:swift#gatekeeper

[filter:healthcheck]
use = egg:swift#healthcheck

[filter:proxy-logging]
use = egg:swift#proxy_logging

[filter:listing_formats]
use = egg:swift#listing_formats

[filter:copy]
use = egg:swift#copy

[filter:slo]
use = egg:swift#slo

[filter:dlo]
use = egg:swift#dlo
"""


class SwiftStartError(RuntimeError):
    """Swift did not come up; the message carries the tail of the daemons' logs."""


@dataclass
class _Daemon:
    name: str
    argv: list[str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.log_path.parent,
            )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, sig: int) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, sig)

    def wait(self, timeout: float) -> bool:
        if self.process is None:
            return True
        try:
            self.process.wait(timeout=max(timeout, 0.01))
        except subprocess.TimeoutExpired:
            return False
        return True

    def tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return "(no log)"
        return "\n".join(text)


@dataclass
class SwiftService:
    """A running all-in-one Swift."""

    host: str
    port: int  # the proxy's
    user: str
    key: str
    users: dict[str, str]
    workdir: Path
    netns: str | None = None
    started_in: float = 0.0  # seconds from the first process to ready
    _daemons: dict[str, _Daemon] = field(default_factory=dict, repr=False)

    @property
    def auth_url(self) -> str:
        return f"http://{self.host}:{self.port}/auth/v1.0"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pids(self) -> dict[str, int]:
        return {name: d.pid for name, d in self._daemons.items()}

    @property
    def nsenter(self) -> list[str]:
        """argv prefix running a command in the service's network namespace (or none)."""
        return ["nsenter", f"--net=/run/netns/{self.netns}"] if self.netns else []

    def connection(self, user: str | None = None, key: str | None = None, **kwargs: Any) -> Any:
        """A ``swiftclient.Connection`` (v1 auth) as ``user`` (default: the first user)."""
        import swiftclient

        user = user or self.user
        key = key if key is not None else self.users.get(user, self.key)
        kwargs.setdefault("retries", 1)
        kwargs.setdefault("starting_backoff", 0.1)
        kwargs.setdefault("timeout", 30)
        return swiftclient.Connection(authurl=self.auth_url, user=user, key=key, **kwargs)

    def put_objects(
        self, container: str, objects: dict[str, bytes], user: str | None = None, workers: int = 8
    ) -> None:
        """Create ``container`` (if needed) and PUT ``objects`` into it, in parallel."""
        from concurrent.futures import ThreadPoolExecutor

        first = self.connection(user)
        first.put_container(container)
        url, token = first.url, first.token
        local = threading.local()
        conns = [first]

        def put(item: tuple[str, bytes]) -> None:
            if not hasattr(local, "conn"):
                local.conn = self.connection(user, preauthurl=url, preauthtoken=token)
                conns.append(local.conn)
            local.conn.put_object(container, item[0], item[1])

        try:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                list(pool.map(put, objects.items()))
        finally:
            for conn in conns:
                conn.close()

    def log_tail(self, lines: int = 25) -> str:
        return _tails(self._daemons.values(), lines)


def _stop_all(daemons: list[_Daemon], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM every daemon by PID, wait for all (bounded), SIGKILL what is left."""
    for daemon in daemons:
        daemon.signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for daemon in daemons:
        if not daemon.wait(deadline - time.monotonic()):
            daemon.signal(signal.SIGKILL)
            daemon.wait(timeout)


def _tails(daemons: Any, lines: int = 25) -> str:
    return "\n".join(f"--- {d.name} ({d.log_path}):\n{d.tail(lines)}" for d in daemons)


def _free_ports(host: str, count: int, nsenter: list[str]) -> list[int]:
    """``count`` distinct free TCP ports on ``host`` (held open together, then released)."""
    if nsenter:
        code = (
            "import socket, sys\n"
            "socks = [socket.socket() for _ in range(int(sys.argv[2]))]\n"
            "[s.bind((sys.argv[1], 0)) for s in socks]\n"
            "print(' '.join(str(s.getsockname()[1]) for s in socks))\n"
        )
        res = subprocess.run(
            [*nsenter, sys.executable, "-c", code, host, str(count)],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        if res.returncode != 0:
            raise SwiftStartError(f"cannot pick ports in {nsenter}: {res.stderr.strip()}")
        return [int(p) for p in res.stdout.split()]
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _check_xattrs(path: Path) -> None:
    probe = path / ".xattr-probe"
    probe.write_bytes(b"")
    try:
        os.setxattr(probe, "user.pfleet", b"1")
    except OSError as exc:
        raise SwiftStartError(
            f"{path} has no user xattrs ({exc}); Swift needs them: "
            "pass a workdir on a filesystem that has them"
        ) from exc
    finally:
        probe.unlink()


def _write_confs(
    root: Path, host: str, ports: dict[str, int], memcache: str, users: dict[str, str]
) -> dict[str, Path]:
    swift_dir, devices, cache = root / "etc", root / "node", root / "cache"
    for d in (swift_dir, devices / "d1", cache, root / "log"):
        d.mkdir(parents=True, exist_ok=True)
    (swift_dir / "swift.conf").write_text(_SWIFT_CONF)
    user_lines = "\n".join(
        f"user_{account}_{name} = {key} .admin"
        for account, name, key in ((*u.split(":", 1), k) for u, k in users.items())
    )
    confs = {}
    for name in SERVERS:
        text = (
            _DEFAULT.format(
                host=host,
                port=ports[name],
                swift_dir=swift_dir,
                devices=devices,
                user=getpass.getuser(),
                name=name,
                log_port=ports["syslog"],
                cache=cache,
            )
            + "\n"
        )
        if name == "proxy":
            text += _PROXY_SERVER.format(users=user_lines, memcache=memcache)
        else:
            text += _STORAGE_SERVER.format(name=name)
        path = swift_dir / f"{name}-server.conf"
        path.write_text(text)
        confs[name] = path
    return confs


# -- readiness ---------------------------------------------------------------------------


def _request(
    host: str,
    port: int,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=3)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


def _probe_once(host: str, port: int, users: dict[str, str]) -> str | None:
    """None when Swift answers end to end, else what is still missing."""
    try:
        status, _, _ = _request(host, port, "GET", "/healthcheck")
        if status != 200:
            return f"healthcheck answered {status}"
        tokens = {}
        for user, key in users.items():
            status, headers, _ = _request(
                host, port, "GET", "/auth/v1.0", {"X-Auth-User": user, "X-Auth-Key": key}
            )
            if status != 200 or "x-auth-token" not in headers:
                return f"login as {user} answered {status}"
            tokens[user] = (headers["x-storage-url"], headers["x-auth-token"])
        # one object through all four servers, then clean up
        storage_url, token = tokens[next(iter(users))]
        path = "/" + storage_url.split("/", 3)[3] + f"/pfleet-probe-{uuid.uuid4().hex[:8]}"
        auth = {"X-Auth-Token": token}
        steps: list[tuple[str, str, bytes | None, tuple[int, ...]]] = [
            ("PUT", path, None, (201, 202)),
            ("PUT", path + "/o", b"probe", (201,)),
            ("GET", path + "/o", None, (200,)),
            ("DELETE", path + "/o", None, (204,)),
            ("DELETE", path, None, (204,)),
        ]
        for method, p, data, ok in steps:
            status, _, _ = _request(
                host, port, method, p, {**auth, "Content-Length": str(len(data or b""))}, data
            )
            if status not in ok:
                return f"{method} {p} answered {status}"
        return None
    except (OSError, http.client.HTTPException) as exc:
        return f"{type(exc).__name__}: {exc}"


def _wait_ready(host: str, port: int, users: dict[str, str], timeout: float, alive: Any) -> None:
    deadline = time.monotonic() + timeout
    last = "not probed"
    while time.monotonic() < deadline:
        dead = alive()
        if dead:
            raise SwiftStartError(f"{dead} exited during startup")
        last = _probe_once(host, port, users) or ""
        if not last:
            return
        time.sleep(0.05)
    raise SwiftStartError(f"Swift not ready after {timeout:.0f} s: {last}")


def _wait_ready_in_netns(
    nsenter: list[str], host: str, port: int, users: dict[str, str], timeout: float
) -> None:
    spec = json.dumps({"host": host, "port": port, "users": users, "timeout": timeout})
    try:
        res = subprocess.run(
            [*nsenter, sys.executable, "-m", "tests.support.swift", "probe", spec],
            capture_output=True,
            text=True,
            timeout=timeout + 15,
            check=False,
            cwd=REPO_ROOT,
        )
    except subprocess.TimeoutExpired as exc:
        raise SwiftStartError(f"the readiness probe in {nsenter} hung") from exc
    if res.returncode != 0:
        raise SwiftStartError(f"Swift not ready: {(res.stdout + res.stderr).strip()[-2000:]}")


# -- the service -------------------------------------------------------------------------


@contextlib.contextmanager
def start_swift(
    workdir: Path | None = None,
    host: str = "127.0.0.1",
    *,
    netns: str | None = None,
    users: dict[str, str] | None = None,
    timeout: float = START_TIMEOUT,
) -> Iterator[SwiftService]:
    """Start memcached and the four Swift servers on ``host``; stop them all at exit.

    ``workdir``: where the private directory is made (default: the system temp dir);
    it must support user xattrs. ``netns``: run everything in ``/run/netns/<netns>``.
    """
    users = dict(users or SWIFT_USERS)
    nsenter = ["nsenter", f"--net=/run/netns/{netns}"] if netns else []
    if netns and not Path("/run/netns", netns).exists():
        raise SwiftStartError(f"network namespace {netns!r} does not exist")
    scripts = {name: BIN / f"swift-{name}-server" for name in SERVERS}
    missing = [str(p) for p in scripts.values() if not p.exists()]
    memcached = shutil.which("memcached")
    if missing or memcached is None:
        raise SwiftStartError(
            "missing: "
            + ", ".join(
                missing + ([] if memcached else ["memcached (apt-get install -y memcached)"])
            )
        )

    root = Path(tempfile.mkdtemp(prefix="pfleet-swift-", dir=workdir))
    daemons: dict[str, _Daemon] = {}
    try:
        _check_xattrs(root)
        names = ["memcached", *SERVERS, "syslog"]
        ports = dict(zip(names, _free_ports(host, len(names), nsenter), strict=True))
        confs = _write_confs(root, host, ports, f"{host}:{ports['memcached']}", users)
        logs = root / "log"
        mc_argv = [
            *nsenter,
            memcached,
            "-l",
            host,
            "-p",
            str(ports["memcached"]),
            "-U",
            "0",
            "-m",
            "64",
            "-c",
            "512",
        ]
        if os.geteuid() == 0:
            mc_argv += ["-u", "root"]
        daemons["memcached"] = _Daemon("memcached", mc_argv, logs / "memcached.log")
        t0 = time.monotonic()
        daemons["memcached"].start()
        swift_conf = str(root / "etc" / "swift.conf")
        rings = json.dumps(
            {
                "dir": str(root / "etc"),
                "host": host,
                "part_power": 6,
                "ports": {n: ports[n] for n in ("account", "container", "object")},
            }
        )
        for name in SERVERS:
            argv = [
                *nsenter,
                sys.executable,
                "-c",
                _BOOT,
                swift_conf,
                rings if name == "proxy" else "-",
                str(scripts[name]),
                str(confs[name]),
                "-v",
            ]
            daemons[name] = _Daemon(name, argv, logs / f"{name}.log")
            daemons[name].start()

        def first_dead() -> str | None:
            return next((n for n, d in daemons.items() if not d.running()), None)

        try:
            if nsenter:
                _wait_ready_in_netns(nsenter, host, ports["proxy"], users, timeout)
                if dead := first_dead():
                    raise SwiftStartError(f"{dead} exited during startup")
            else:
                _wait_ready(host, ports["proxy"], users, timeout, first_dead)
        except SwiftStartError as exc:
            raise SwiftStartError(f"{exc}\n{_tails(daemons.values())}") from None
        first_user = next(iter(users))
        service = SwiftService(
            host=host,
            port=ports["proxy"],
            user=first_user,
            key=users[first_user],
            users=users,
            workdir=root,
            netns=netns,
            started_in=time.monotonic() - t0,
            _daemons=daemons,
        )
        yield service
    finally:
        _stop_all(list(daemons.values()))
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def swift_service() -> Iterator[SwiftService]:
    """A real Swift on 127.0.0.1 for the whole session."""
    try:
        with start_swift() as service:
            yield service
    except SwiftStartError as exc:
        pytest.fail(f"could not start Swift: {exc}", pytrace=False)


def _probe_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    try:
        _wait_ready(
            spec["host"], int(spec["port"]), spec["users"], float(spec["timeout"]), lambda: None
        )
    except SwiftStartError as exc:
        print(exc)
        return 1
    return 0


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "probe":
    sys.exit(_probe_main(sys.argv[2]))
