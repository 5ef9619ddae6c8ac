"""Building blocks for the real daemons the test suite starts: bounded waits, processes
stopped by PID, network namespaces, crash reaping, and a private ``dockerd`` / ``podman
system service`` in a given network namespace.

``tests.support.engines`` (one docker and one podman engine for the session) and
``tests.support.topology`` (several "hosts", each with its own engine) are built on this.

PYTEST_DONT_REWRITE: imported by modules that are registered as plugins later.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import http.client
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

REPO_ROOT = Path(__file__).resolve().parents[2]
SUPPORT_DIR = Path(__file__).resolve().parent
CONTAINERS_CONF = SUPPORT_DIR / "containers.conf"
BUILD_IMAGES = REPO_ROOT / "scripts" / "build-test-images.sh"
ENGINE_STATE = Path(os.environ.get("PFLEET_TEST_ENGINE_DIR", REPO_ROOT / ".pfleet" / "test-engine"))

START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0

# The id podman gives its built-in default network (containers/common).
PODMAN_DEFAULT_NETWORK_ID = "2f259bab93aaaaa2542ba43ef33eb990d0999ee1b9924b557b7be53c0b7a1bb9"

T = TypeVar("T")


class EngineStartError(RuntimeError):
    """An engine did not come up; the message ends with the tail of its log."""


@dataclasses.dataclass(frozen=True)
class DockerTLS:
    """A TCP listener for dockerd that takes only clients with a certificate ``ca``
    signed (``--tlsverify``); ``address`` is inside the engine's network namespace."""

    ca: Path
    cert: Path
    key: Path
    address: str = "127.0.0.1:2376"

    def dockerd_args(self) -> list[str]:
        return ["--tlsverify", "--tlscacert", str(self.ca), "--tlscert", str(self.cert),
                "--tlskey", str(self.key), "-H", f"tcp://{self.address}"]


# --------------------------------------------------------------------------- helpers


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.1,
    what: str = "condition",
) -> T:
    """Call ``predicate`` until it returns something truthy, and return that.

    Bounded both in time (``timeout`` seconds) and in number of calls; raises
    ``TimeoutError`` when the predicate never succeeded. Exceptions from the predicate
    propagate.
    """
    deadline = time.monotonic() + timeout
    max_calls = int(timeout / interval) + 2
    for _ in range(max_calls):
        result = predicate()
        if result:
            return result
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        time.sleep(min(interval, remaining))
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def ping(url: str, timeout: float = 2.0) -> bool:
    """True when the Docker-compatible API at ``unix://...`` answers ``GET /_ping``."""
    path = url.removeprefix("unix://")
    conn = _UnixHTTPConnection(path, timeout)
    try:
        conn.request("GET", "/_ping")
        resp = conn.getresponse()
        return resp.status == 200 and resp.read().strip() == b"OK"
    except OSError:
        return False
    finally:
        conn.close()


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"(no log: {e})"
    return "\n".join(text.splitlines()[-lines:])


def run(argv: list[str], timeout: float = 60.0, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)


def require(*commands: str) -> None:
    if os.geteuid() != 0:
        raise EngineStartError("the test engines need root (network namespaces, dockerd)")
    missing = [c for c in commands if shutil.which(c) is None]
    if missing:
        raise EngineStartError(f"missing {', '.join(missing)}: run scripts/bootstrap.sh")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is not alive for our purposes.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def mentions(argv: list[str], marker: str) -> bool:
    """True when an argument is ``marker`` or a path below it (also after ``--opt=``)."""
    for arg in argv:
        value = arg.split("=", 1)[1] if arg.startswith("-") and "=" in arg else arg
        if value == marker or value.startswith(marker + "/"):
            return True
    return False


def pids_mentioning(marker: str) -> list[int]:
    """PIDs of processes whose command line names ``marker`` (a directory unique to us)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid() and mentions(cmdline(int(entry)), marker):
            pids.append(int(entry))
    return pids


def kill_pid(pid: int, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM, bounded wait, SIGKILL. For processes that are not our children."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    try:
        wait_until(lambda: not pid_alive(pid), timeout, 0.05, f"pid {pid} to exit")
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: not pid_alive(pid), 5.0, 0.05, f"pid {pid} to die")


def kill_mentioning(marker: str) -> None:
    for pid in pids_mentioning(marker):
        kill_pid(pid, timeout=5.0)


def stop_popen(proc: subprocess.Popen[Any], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM, bounded wait, SIGKILL, for a child we started."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)


def mountpoints_under(path: Path) -> list[str]:
    prefix = str(path).rstrip("/")
    found = []
    with contextlib.suppress(OSError), open("/proc/self/mounts") as f:
        for line in f:
            mnt = line.split()[1].replace("\\040", " ")
            if mnt == prefix or mnt.startswith(prefix + "/"):
                found.append(mnt)
    return found


def umount_under(path: Path) -> None:
    for mnt in sorted(set(mountpoints_under(path)), key=len, reverse=True):
        if run(["umount", mnt], timeout=20).returncode != 0:
            run(["umount", "-l", mnt], timeout=20)


# --------------------------------------------------------------------------- namespaces


def netns_exists(name: str) -> bool:
    return Path("/run/netns", name).exists()


def netns_add(name: str) -> None:
    """Create the network namespace ``name`` (replacing one of that name) with ``lo`` up."""
    if netns_exists(name):
        netns_del(name)
    res = run(["ip", "netns", "add", name], timeout=20)
    if res.returncode != 0:
        raise EngineStartError(f"ip netns add {name}: {res.stderr.strip()}")
    run(["ip", "-n", name, "link", "set", "lo", "up"], timeout=20, check=True)


def netns_del(name: str) -> None:
    if netns_exists(name):
        run(["ip", "netns", "del", name], timeout=20)


def sweep_dead_netns(pattern: re.Pattern[str]) -> list[str]:
    """Delete namespaces whose whole name matches ``pattern`` and whose ``pid`` group
    names a process that is gone (leftovers of a killed session). Returns their names."""
    removed = []
    with contextlib.suppress(OSError):
        for name in os.listdir("/run/netns"):
            m = pattern.fullmatch(name)
            if m and not pid_alive(int(m.group("pid"))):
                netns_del(name)
                removed.append(name)
    return removed


# --------------------------------------------------------------------------- crash reaping


def read_record(record: Path) -> dict[str, Any]:
    """What an earlier session using the same state dir left behind (if it crashed)."""
    try:
        prev = json.loads(record.read_text())
    except (OSError, ValueError):
        return {}
    return prev if isinstance(prev, dict) else {}


def write_record(record: Path, **fields: Any) -> None:
    tmp = record.with_suffix(".tmp")
    tmp.write_text(json.dumps(fields))
    tmp.replace(record)


def reap_previous(
    record: Path, before_kill: Callable[[dict[str, Any]], None] | None = None
) -> bool:
    """Stop what a crashed earlier session left running; True when something was.

    The recorded daemon gets SIGTERM first (dockerd then stops its containers itself),
    ``before_kill`` may clean up with the engine's own tools, and only then is anything
    still naming the old session's directories killed.
    """
    prev = read_record(record)
    if not prev:
        return False
    markers = [str(m) for m in prev.get("markers", [])]
    found = False
    pid = prev.get("pid")
    if isinstance(pid, int) and pid_alive(pid) and any(mentions(cmdline(pid), m) for m in markers):
        found = True
        kill_pid(pid)
    if any(pids_mentioning(m) for m in markers):
        found = True
        if before_kill is not None:
            with contextlib.suppress(Exception):
                before_kill(prev)
        for m in markers:
            kill_mentioning(m)
    for d in prev.get("scratch", []):
        umount_under(Path(d))
        shutil.rmtree(d, ignore_errors=True)
    if prev.get("netns"):
        netns_del(prev["netns"])
    record.unlink(missing_ok=True)
    return found


def sweep_sessions(base: Path, reap: Callable[[Path], bool]) -> None:
    """Reap and remove per-session directories of crashed concurrent sessions."""
    with open(base / "sweep.lock", "w") as lock:

        def locked() -> bool:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            return True

        try:
            wait_until(locked, 120, 0.1, f"{base}/sweep.lock")
        except TimeoutError:
            return  # someone else is sweeping
        for d in base.glob("session-*"):
            m = re.fullmatch(r"session-(\d+)", d.name)
            if m and not pid_alive(int(m.group(1))):
                reap(d)
                umount_under(d)
                shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def state_dir(kind: str, reap: Callable[[Path], bool]) -> Iterator[tuple[Path, bool]]:
    """Yield (directory, reaped) for this session's engine storage.

    The persistent directory ``.pfleet/test-engine/<kind>`` is used when no other session
    holds it (flock); otherwise a per-session directory below it, removed afterwards.
    ``reap(dir)`` stops what a crashed earlier session left running in a directory;
    ``reaped`` says whether it found anything (then leftovers should be removed).
    """
    base = ENGINE_STATE / kind
    base.mkdir(parents=True, exist_ok=True)
    lock = open(base / "lock", "w")  # noqa: SIM115 - held for the whole session
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shared = True
        except BlockingIOError:
            shared = False
        sweep_sessions(base, reap)
        if shared:
            yield base, reap(base)
            return
        private = base / f"session-{os.getpid()}"
        private.mkdir(exist_ok=True)
        try:
            yield private, False
        finally:
            umount_under(private)
            shutil.rmtree(private, ignore_errors=True)
    finally:
        lock.close()


# --------------------------------------------------------------------------- engines


class Daemon:
    """A background process we started; stopped by its PID only. Restartable."""

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes]
        self.start()

    def start(self) -> None:
        """(Re)start the command; the log is appended to."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,  # Ctrl-C on pytest does not hit it; we stop it
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait(10)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        stop_popen(self.proc, timeout)


@dataclasses.dataclass
class Engine:
    """A running engine. ``url`` works with the docker SDK and the engine's own CLI."""

    kind: str  # "docker" | "podman"
    url: str  # unix:///tmp/pfleet-.../docker.sock
    cli: list[str]  # e.g. ["docker", "-H", url] / ["podman", "--url", url]
    netns: str  # name under /run/netns
    pid: int
    log_path: Path
    data_dir: Path
    startup_seconds: float = 0.0  # daemon start until it answers
    tls_url: str = ""  # tcp://... of a DockerTLS listener (reachable inside ``netns`` only)
    images_seconds: float = 0.0  # making sure the test images exist
    # The API daemon (dockerd / podman service), for stopping and restarting it.
    daemon: Daemon | None = dataclasses.field(default=None, repr=False, compare=False)
    # Pidfiles of processes that die with the daemon (dockerd's managed containerd).
    pidfiles: list[Path] = dataclasses.field(default_factory=list, repr=False, compare=False)

    @property
    def socket_path(self) -> str:
        return self.url.removeprefix("unix://")

    @property
    def nsenter(self) -> list[str]:
        """argv prefix that runs a command inside the engine's network namespace."""
        return ["nsenter", f"--net=/run/netns/{self.netns}"]

    def client(self, **kwargs: Any) -> Any:
        """A ``docker.DockerClient`` for this engine (close it when done)."""
        import docker

        kwargs.setdefault("timeout", 120)
        return docker.DockerClient(base_url=self.url, **kwargs)

    def run_cli(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return run([*self.cli, *args], timeout=timeout)

    def log_tail(self, lines: int = 40) -> str:
        return tail(self.log_path, lines)

    def running(self) -> bool:
        return self.daemon is not None and self.daemon.running()

    def kill(self) -> None:
        """SIGKILL the API daemon, as a crash would; waits (bounded) until what dies with
        it (dockerd's managed containerd) is gone. Containers and their shims stay."""
        if self.daemon is None:
            return
        self.daemon.kill()
        for pid in filter(None, map(_read_pid, self.pidfiles)):
            with contextlib.suppress(TimeoutError):
                wait_until(lambda p=pid: not pid_alive(p), 10.0, 0.05, f"pid {pid} to exit")

    def restart(self) -> float:
        """Start the API daemon again after :meth:`kill`; seconds until it answered."""
        if self.daemon is None:
            raise EngineStartError(f"{self.kind} engine has no daemon to restart")
        if self.daemon.running():
            return 0.0
        # PID 1 may reap orphans late: dockerd takes a zombie containerd named in its
        # pidfile for a live one and waits on its dead socket. Forget dead pids first.
        for path in self.pidfiles:
            pid = _read_pid(path)
            if pid is not None and not pid_alive(pid):
                path.unlink(missing_ok=True)
        self.daemon.start()
        self.pid = self.daemon.pid
        return wait_for_api(self.daemon, self.url, self.kind)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def wait_for_api(daemon: Daemon, url: str, name: str) -> float:
    t0 = time.monotonic()

    def ready() -> bool:
        if not daemon.running():
            raise EngineStartError(
                f"{name} exited with {daemon.proc.returncode} while starting; "
                f"log {daemon.log_path}:\n{tail(daemon.log_path)}"
            )
        return ping(url, timeout=1.0)

    try:
        wait_until(ready, START_TIMEOUT, 0.1, f"{name} to answer on {url}")
    except TimeoutError as e:
        raise EngineStartError(f"{e}; log {daemon.log_path}:\n{tail(daemon.log_path)}") from e
    return time.monotonic() - t0


def build_images(engine: Engine) -> None:
    t0 = time.monotonic()
    try:
        res = run(["bash", str(BUILD_IMAGES), *engine.cli], timeout=600)
    except subprocess.TimeoutExpired as e:
        raise EngineStartError(f"building test images in {engine.kind} timed out") from e
    if res.returncode != 0:
        raise EngineStartError(
            f"building test images in {engine.kind} failed ({res.returncode}):\n"
            f"{res.stdout}{res.stderr}\n{engine.kind} log:\n{engine.log_tail()}"
        )
    engine.images_seconds = time.monotonic() - t0


def remove_all(engine: Engine) -> None:
    """Remove containers, networks and volumes tests left behind (storage persists)."""
    if engine.kind == "docker":
        ids = engine.run_cli("ps", "-aq", timeout=60).stdout.split()
        if ids:
            engine.run_cli("rm", "-f", "-v", *ids, timeout=120)
    else:
        engine.run_cli("pod", "rm", "--all", "--force", timeout=120)
        engine.run_cli("rm", "--all", "--force", "--volumes", "--time", "0", timeout=120)
    engine.run_cli("network", "prune", "-f", timeout=60)
    engine.run_cli("volume", "prune", "-f", timeout=60)
    engine.run_cli("image", "prune", "-f", timeout=60)  # dangling only: test images stay


def containerd_own_config(path: Path, data_root: Path, exec_root: Path) -> Path:
    """containerd.toml like the one dockerd writes for its managed containerd."""
    sock = exec_root / "containerd" / "containerd.sock"
    path.write_text(
        "\n".join(
            [
                "version = 2",
                f'root = "{data_root}/containerd/daemon"',
                f'state = "{exec_root}/containerd/daemon"',
                'disabled_plugins = ["io.containerd.grpc.v1.cri"]',
                "[grpc]",
                f'  address = "{sock}"',
                "[debug]",
                '  level = "info"',
                "",
            ]
        )
    )
    return sock


def docker_cli() -> str:
    docker_bin = shutil.which("docker")
    if docker_bin is None:
        raise EngineStartError("missing docker CLI: run scripts/bootstrap.sh")
    return docker_bin


def reap_docker(state: Path) -> bool:
    # dockerd gets SIGTERM first and stops its containers itself.
    return reap_previous(state / "session.json")


@contextlib.contextmanager
def run_dockerd(
    state: Path,
    reaped: bool,
    *,
    netns: str,
    bip: str,
    address_pool: str,
    tag: str,
    own_netns: bool = True,
    images: bool = True,
    scratch_prefix: str = "pfleet-docker-",
    tls: DockerTLS | None = None,
) -> Iterator[Engine]:
    """A private dockerd in network namespace ``netns`` with storage in ``state``.

    ``state`` and ``reaped`` come from :func:`state_dir`. ``bip`` / ``address_pool`` are
    its default bridge and pool (``--bip`` / ``--default-address-pool``), ``tag`` names its
    containerd namespaces and cgroup parent. With ``own_netns`` the namespace is created
    here and deleted afterwards; otherwise it must exist and is left alone.
    With ``tls`` it also listens on TCP with TLS (``Engine.tls_url``); off by default.
    """
    docker_bin = docker_cli()
    record = state / "session.json"
    data_root = state / "data"
    data_root.mkdir(exist_ok=True)
    # Short path: containerd's socket lives below it (unix socket paths <= 107 bytes).
    scratch = Path(tempfile.mkdtemp(prefix=scratch_prefix, dir="/tmp"))
    exec_root = scratch / "exec"
    sock = scratch / "docker.sock"
    url = f"unix://{sock}"
    log_path = state / "dockerd.log"
    nsenter = ["nsenter", f"--net=/run/netns/{netns}"]
    # dockerd 20.10 uses /run/containerd/containerd.sock instead of starting its own
    # containerd when that socket exists (a system containerd). Keep ours separate.
    own_containerd = (
        os.environ.get("PFLEET_TEST_OWN_CONTAINERD") == "1"
        or Path("/run/containerd/containerd.sock").exists()
    )
    rec = {"markers": [str(scratch)], "scratch": [str(scratch)], "netns": netns}
    write_record(record, **rec)
    daemons: list[Daemon] = []
    engine: Engine | None = None
    try:
        if own_netns:
            netns_add(netns)
        elif not netns_exists(netns):
            raise EngineStartError(f"network namespace {netns} does not exist")
        log_path.write_text("")
        extra: list[str] = []
        if own_containerd:
            exec_root.mkdir()
            (exec_root / "containerd").mkdir()
            cfg = scratch / "containerd.toml"
            csock = containerd_own_config(cfg, data_root, exec_root)
            containerd = Daemon(
                [*nsenter, "containerd", "--config", str(cfg)], state / "containerd.log"
            )
            daemons.append(containerd)
            wait_until(
                lambda: csock.exists() or not containerd.running(),
                START_TIMEOUT,
                0.05,
                "containerd socket",
            )
            if not containerd.running():
                raise EngineStartError(f"containerd died:\n{tail(containerd.log_path)}")
            extra = ["--containerd", str(csock)]
        t0 = time.monotonic()
        dockerd = Daemon(
            [
                *nsenter,
                "dockerd",
                "--data-root", str(data_root),
                "--exec-root", str(exec_root),
                "--pidfile", str(scratch / "docker.pid"),
                "-H", url,
                "--bip", bip,
                "--default-address-pool", address_pool,
                "--containerd-namespace", tag,
                "--containerd-plugins-namespace", f"{tag}-p",
                "--cgroup-parent", tag,
                "--shutdown-timeout", "5",
                *(tls.dockerd_args() if tls else []),
                *extra,
            ],
            log_path,
        )  # fmt: skip
        daemons.insert(0, dockerd)
        write_record(record, pid=dockerd.pid, **rec)
        wait_for_api(dockerd, url, "dockerd")
        engine = Engine(
            kind="docker",
            url=url,
            cli=[docker_bin, "-H", url],
            netns=netns,
            pid=dockerd.pid,
            log_path=log_path,
            data_dir=data_root,
            startup_seconds=time.monotonic() - t0,
            tls_url=f"tcp://{tls.address}" if tls else "",
            daemon=dockerd,
            pidfiles=[scratch / "docker.pid", exec_root / "containerd" / "containerd.pid"],
        )
        if reaped:
            remove_all(engine)
        if images:
            build_images(engine)
        yield engine
    finally:
        try:
            if engine is not None and daemons[0].running():
                with contextlib.suppress(Exception):
                    remove_all(engine)
        finally:
            for d in daemons:  # dockerd first, then its containerd
                d.stop()
            kill_mentioning(str(scratch))  # a containerd/shim outliving dockerd
            umount_under(scratch)  # <exec-root>/netns/default and the like
            # dockerd bind-mounts its data root onto itself; one killed and restarted
            # (the topology's fault tests) leaves a second mount that a stop keeps.
            umount_under(data_root)
            if own_netns:
                netns_del(netns)
            shutil.rmtree(scratch, ignore_errors=True)
            record.unlink(missing_ok=True)


def podman_setup(state: Path) -> tuple[Path, Path, list[str], dict[str, str]]:
    """(root, run_base, global flags, env) of the podman storage in ``state``.

    When ``state/networks`` exists (see :func:`run_podman_service`) it is the service's
    network config directory instead of the system-wide ``/etc/containers/networks``.
    """
    root = state / "root"
    # podman refuses a runroot longer than 50 characters: keep per-boot state in /run,
    # at a path derived from (so stable for) the storage root, as podman's DB requires.
    run_base = Path("/run/pfleet-test") / hashlib.sha256(str(root).encode()).hexdigest()[:12]
    # Our own storage.conf, so a system /etc/containers/storage.conf cannot add options.
    storage_conf = state / "storage.conf"
    storage_conf.write_text(
        f'[storage]\ndriver = "overlay"\ngraphroot = "{root}"\nrunroot = "{run_base}/run"\n'
    )
    env = {
        **os.environ,
        "CONTAINERS_CONF": str(CONTAINERS_CONF),
        "CONTAINERS_STORAGE_CONF": str(storage_conf),
    }
    env.pop("CONTAINER_HOST", None)
    flags = [
        "--root", str(root),
        "--runroot", str(run_base / "run"),
        "--tmpdir", str(run_base / "tmp"),
        "--storage-driver", "overlay",
        "--cgroup-manager", "cgroupfs",
        "--events-backend", "file",
    ]  # fmt: skip
    networks = state / "networks"
    if networks.is_dir():
        flags += ["--network-config-dir", str(networks)]
    return root, run_base, flags, env


def reap_podman(state: Path, reap_netns: str) -> bool:
    """Reap a crashed podman service in ``state``; ``reap_netns`` names a namespace to
    create (and delete) for the clean-up when the old session's one is gone."""

    def remove_orphans(prev: dict[str, Any]) -> None:
        # conmon keeps the containers of a dead service running: remove them with a local
        # podman on the same storage, inside the old namespace (for netavark's teardown).
        # Never in the root namespace: netavark would tear down bridge/firewall state there.
        _root, _run_base, flags, env = podman_setup(state)
        podman_bin = shutil.which("podman") or "podman"
        ns = prev.get("netns", "")
        temp_ns = None
        if not ns or not netns_exists(ns):
            ns = temp_ns = reap_netns
            netns_add(ns)
        try:
            for args in (["pod", "rm", "-af"], ["rm", "-af", "-t", "0"]):
                run(
                    ["nsenter", f"--net=/run/netns/{ns}", podman_bin, *flags, *args],
                    timeout=120,
                    env=env,
                )
        finally:
            if temp_ns:
                netns_del(temp_ns)

    return reap_previous(state / "session.json", before_kill=remove_orphans)


def _podman_default_network(directory: Path, subnet: str, bridge: str) -> None:
    """Define podman's default network ``podman`` (netavark) with our own subnet."""
    net = ipaddress.ip_network(subnet)
    directory.mkdir(exist_ok=True)
    config = {
        "name": "podman",
        "id": PODMAN_DEFAULT_NETWORK_ID,
        "driver": "bridge",
        "network_interface": bridge,
        "created": "2024-01-01T00:00:00Z",
        "subnets": [{"subnet": str(net), "gateway": str(next(net.hosts()))}],
        "ipv6_enabled": False,
        "internal": False,
        "dns_enabled": False,
        "ipam_options": {"driver": "host-local"},
    }
    tmp = directory / "podman.json.tmp"
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    tmp.replace(directory / "podman.json")


@contextlib.contextmanager
def run_podman_service(
    state: Path,
    reaped: bool,
    *,
    netns: str,
    own_netns: bool = True,
    images: bool = True,
    scratch_prefix: str = "pfleet-podman-",
    default_subnet: str | None = None,
) -> Iterator[Engine]:
    """``podman system service`` in network namespace ``netns``, storage in ``state``.

    ``state`` and ``reaped`` come from :func:`state_dir`. With ``default_subnet`` the
    service gets its own network config directory (``state/networks``) whose default
    network uses that subnet; otherwise containers.conf's default network applies.
    ``own_netns`` as for :func:`run_dockerd`.
    """
    podman_bin = shutil.which("podman") or "podman"
    if default_subnet is not None:
        _podman_default_network(state / "networks", default_subnet, "podman0")
    record = state / "session.json"
    root, run_base, global_flags, env = podman_setup(state)
    runroot, tmpdir = run_base / "run", run_base / "tmp"
    log_path = state / "podman.log"
    # runroot and tmpdir hold per-boot state; starting with them empty makes podman
    # "refresh" (forget containers that were running when an earlier session ended).
    for d in (runroot, tmpdir):
        umount_under(d)
        shutil.rmtree(d, ignore_errors=True)
    for d in (root, runroot, tmpdir):
        d.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=scratch_prefix, dir="/tmp"))
    sock = scratch / "podman.sock"
    url = f"unix://{sock}"
    rec = {
        "markers": [str(scratch), str(root), str(run_base)],
        "scratch": [str(scratch), str(run_base)],
        "netns": netns,
    }
    write_record(record, **rec)
    daemon: Daemon | None = None
    engine: Engine | None = None
    try:
        if own_netns:
            netns_add(netns)
        elif not netns_exists(netns):
            raise EngineStartError(f"network namespace {netns} does not exist")
        log_path.write_text("")
        service_argv = [
            "nsenter", f"--net=/run/netns/{netns}",
            podman_bin, *global_flags, "--log-level", "info",
            "system", "service", "--time=0", url,
        ]  # fmt: skip
        for attempt in (1, 2):
            t0 = time.monotonic()
            daemon = Daemon(service_argv, log_path, env=env)
            write_record(record, pid=daemon.pid, **rec)
            try:
                wait_for_api(daemon, url, "podman service")
                break
            except EngineStartError:
                daemon.stop()
                if attempt == 2 or "database configuration mismatch" not in tail(log_path):
                    raise
                # The libpod DB remembers the paths it was created with (e.g. before the
                # checkout moved). Images live in c/storage, not in it: start a new DB.
                (root / "libpod" / "bolt_state.db").unlink(missing_ok=True)
        assert daemon is not None
        engine = Engine(
            kind="podman",
            url=url,
            cli=[podman_bin, "--url", url],
            netns=netns,
            pid=daemon.pid,
            log_path=log_path,
            data_dir=root,
            startup_seconds=time.monotonic() - t0,
            daemon=daemon,
        )
        if reaped:
            remove_all(engine)
        if images:
            build_images(engine)
        yield engine
    finally:
        try:
            if engine is not None and daemon is not None and daemon.running():
                with contextlib.suppress(Exception):
                    remove_all(engine)
        finally:
            if daemon is not None:
                daemon.stop()
            # conmon (and anything else) still naming our storage is ours.
            for marker in (root, run_base, scratch):
                kill_mentioning(str(marker))
            umount_under(root)  # c/storage leaves <root>/overlay bind-mounted
            umount_under(run_base)
            shutil.rmtree(run_base, ignore_errors=True)
            if own_netns:
                netns_del(netns)
            shutil.rmtree(scratch, ignore_errors=True)
            record.unlink(missing_ok=True)
