"""A real SLURM 22.05 for the test suite: ``munged`` with its own key and socket,
``slurmctld`` and ``slurmd`` started by hand, stopped by PID.

``slurm_cluster`` (session)
    One node on 127.0.0.1: ports picked free, node named ``pfl<pid>`` (so the
    cgroups ``/sys/fs/cgroup/*/slurm_pfl<pid>`` of concurrent sessions never
    meet), 16 CPUs and 16000 MiB declared (``config_overrides``: more than this
    2-core machine has, so tests can run side by side), ``task/cgroup`` with
    ``ConstrainRAMSpace`` (a job over its ``--mem`` ends OUT_OF_MEMORY),
    ``jobcomp/filetxt`` and no accounting database, ``MinJobAge=300``.
:func:`start_multinode_cluster`
    slurmctld and one slurmd in host namespace h1, a second slurmd in h2, client
    commands from a third ("login node"), per the multi-namespace testbed; nodes
    have 2 CPUs and 4000 MiB each; ``task/none`` (two slurmd on one machine).

Everything lives in ``/run/pfleet-slurm-<pid>[-mn]`` (mode 0755: jobs of an
unprivileged user read their files there); a directory left by a killed session
(its PID gone) is reaped at the next start.  ``charliecloud_image`` unpacks the
suite's cached busybox rootfs (``scripts/build-test-images.sh``) into a directory
image for ``ch-run``.

PYTEST_DONT_REWRITE: test modules import this before it is registered as a plugin.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import signal
import socket
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.support.daemons import (
    REPO_ROOT,
    Daemon,
    EngineStartError,
    kill_mentioning,
    pid_alive,
    require,
    run,
    tail,
    wait_until,
)

__all__ = ["NOBODY", "SlurmCluster", "busybox_rootfs", "charliecloud_image", "slurm_cluster",
           "start_multinode_cluster", "start_single_node_cluster", "unpack_busybox_image"]

RUN_BASE = Path("/run")
PREFIX = "pfleet-slurm-"
START_TIMEOUT = 30.0
IMAGE_CACHE = Path(os.environ.get("PFLEET_IMAGE_CACHE", REPO_ROOT / ".pfleet" / "images"))
NOBODY = 65534  # the unprivileged user some tests run the agent as
_LEFTOVER = re.compile(re.escape(PREFIX) + r"(?P<pid>\d+)(-\w+)?")

COMMON_CONF = """\
ClusterName={cluster}
SlurmctldHost={host}({ctld_addr})
AuthType=auth/munge
CryptoType=crypto/munge
AuthInfo=socket={munge_socket}
SlurmUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool-%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmdParameters=config_overrides
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
JobCompType=jobcomp/filetxt
JobCompLoc={root}/log/jobcomp.txt
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
SlurmctldTimeout=30
SlurmdTimeout=30
MinJobAge=300
KillWait=5
"""

SINGLE_NODE = """\
ProctrackType=proctrack/cgroup
TaskPlugin=task/cgroup
NodeName={node} NodeAddr=127.0.0.1 CPUs=16 RealMemory=16000 State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""

CGROUP_CONF = """\
CgroupPlugin=cgroup/v1
ConstrainRAMSpace=yes
ConstrainSwapSpace=yes
"""

MULTI_NODE = """\
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
NodeName=h1 NodeAddr={h1} CPUs=2 RealMemory=4000 State=UNKNOWN
NodeName=h2 NodeAddr={h2} CPUs=2 RealMemory=4000 State=UNKNOWN
PartitionName=batch Nodes=h1,h2 Default=YES MaxTime=INFINITE State=UP
"""


@dataclasses.dataclass
class SlurmCluster:
    """A running cluster.  :meth:`command` runs a SLURM client command against it (in
    the login namespace of a multi-node cluster)."""

    root: Path
    conf: Path
    nodes: list[str]
    munged: Daemon
    slurmctld: Daemon
    slurmds: dict[str, Daemon]
    client_prefix: list[str] = dataclasses.field(default_factory=list)  # nsenter ...

    @property
    def env(self) -> dict[str, str]:
        """What a SLURM client (an agent) needs in its environment."""
        return {"SLURM_CONF": str(self.conf)}

    def command(self, *argv: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return run([*self.client_prefix, *argv], timeout=timeout,
                   env={**os.environ, **self.env})

    def check(self, *argv: str, timeout: float = 30.0) -> str:
        res = self.command(*argv, timeout=timeout)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {res.stderr.strip() or res.stdout.strip()}")
        return res.stdout

    def job_state(self, job_id: str) -> str:
        return self.check("squeue", "-h", "--states=all", "-j", job_id, "-o", "%T").strip()

    def jobs(self) -> dict[str, str]:
        """SLURM job id -> state of every job slurmctld remembers."""
        out = self.check("squeue", "-h", "--states=all", "-o", "%i %T")
        return dict(line.split() for line in out.splitlines() if line.strip())

    def wait_nodes_ready(self, timeout: float = START_TIMEOUT) -> None:
        def ready() -> bool:
            res = self.command("sinfo", "-h", "-N", "-o", "%N %t", timeout=10)
            states = dict(line.split() for line in res.stdout.splitlines() if line.strip())
            return res.returncode == 0 and all(
                states.get(n, "").rstrip("*") in ("idle", "mix", "alloc") for n in self.nodes)
        try:
            wait_until(ready, timeout, 0.1, f"SLURM nodes {self.nodes} to come up")
        except TimeoutError as exc:
            raise EngineStartError(f"{exc}\n{self.log_tails()}") from exc

    def pause_controller(self) -> None:
        """SIGSTOP slurmctld: it keeps its socket but answers nobody (a hung controller)."""
        os.kill(self.slurmctld.pid, signal.SIGSTOP)

    def resume_controller(self) -> None:
        os.kill(self.slurmctld.pid, signal.SIGCONT)

    def cancel_all(self, timeout: float = 20.0) -> None:
        """Cancel every job and wait (bounded) until none runs."""
        with contextlib.suppress(Exception):
            live = [j for j, s in self.jobs().items()
                    if s in ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED")]
            if live:
                self.command("scancel", *live)

            def quiet() -> bool:
                return not any(s in ("RUNNING", "COMPLETING", "CONFIGURING")
                               for s in self.jobs().values())
            wait_until(quiet, timeout, 0.2, "SLURM jobs to end")

    def log_tails(self) -> str:
        logs = sorted((self.root / "log").glob("*.log"))
        return "\n".join(f"--- {p.name}:\n{tail(p, 15)}" for p in logs)


# ------------------------------------------------------------------ processes


def _reap_leftovers() -> None:
    """Stop what killed earlier sessions left in their /run/pfleet-slurm-<pid> dirs."""
    for path in RUN_BASE.glob(PREFIX + "*"):
        m = _LEFTOVER.fullmatch(path.name)
        if m and not pid_alive(int(m.group("pid"))):
            kill_mentioning(str(path))
            _remove_cgroups(f"pfl{m.group('pid')}")
            shutil.rmtree(path, ignore_errors=True)


def _remove_cgroups(node: str) -> None:
    """Remove the (empty) cgroup tree slurmd made for ``node`` (deepest first)."""
    for top in Path("/sys/fs/cgroup").glob(f"*/slurm_{node}"):
        dirs = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts),
                      reverse=True)
        for d in [*dirs, top]:
            with contextlib.suppress(OSError):
                d.rmdir()


def _start_munged(root: Path) -> tuple[Daemon, Path]:
    munge = root / "munge"
    munge.mkdir(mode=0o755)
    key = munge / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    sock = munge / "munge.sock"
    daemon = Daemon(["munged", "-F", "--force", f"--socket={sock}", f"--key-file={key}",
                     f"--pid-file={munge / 'munged.pid'}", f"--log-file={munge / 'munged.log'}",
                     f"--seed-file={munge / 'munged.seed'}"], root / "log" / "munged.out")
    try:
        wait_until(lambda: sock.exists() or not daemon.running(), START_TIMEOUT, 0.02,
                   "munged socket")
    except TimeoutError:
        daemon.stop()
        raise
    if not daemon.running():
        raise EngineStartError(f"munged died:\n{tail(munge / 'munged.log')}")
    return daemon, sock


def _make_root(suffix: str = "") -> Path:
    root = RUN_BASE / f"{PREFIX}{os.getpid()}{suffix}"
    if root.exists():
        kill_mentioning(str(root))
        shutil.rmtree(root, ignore_errors=True)
    root.mkdir(mode=0o755)
    root.chmod(0o755)
    for sub in ("state", "log"):
        (root / sub).mkdir(mode=0o755)
    (root / "state").chmod(0o700)
    return root


@contextlib.contextmanager
def _cluster(root: Path, conf_text: str, nodes: list[str], *, ctld_prefix: list[str],
             slurmd_prefix: dict[str, list[str]],
             client_prefix: list[str]) -> Iterator[SlurmCluster]:
    daemons: list[Daemon] = []
    cluster: SlurmCluster | None = None
    try:
        munged, sock = _start_munged(root)
        daemons.append(munged)
        conf = root / "slurm.conf"
        conf.write_text(conf_text.replace("{munge_socket}", str(sock)))
        (root / "cgroup.conf").write_text(CGROUP_CONF)
        ctld = Daemon([*ctld_prefix, "slurmctld", "-D", "-i", "-f", str(conf)],
                      root / "log" / "slurmctld.out")
        daemons.append(ctld)
        slurmds = {}
        for node in nodes:
            (root / f"spool-{node}").mkdir(mode=0o755, exist_ok=True)
            slurmds[node] = Daemon([*slurmd_prefix[node], "slurmd", "-D", "-f", str(conf),
                                    "-N", node], root / "log" / f"slurmd-{node}.out")
            daemons.append(slurmds[node])
        cluster = SlurmCluster(root, conf, nodes, munged, ctld, slurmds, client_prefix)
        dead = [d.argv[-1] for d in daemons if not d.running()]
        if dead:
            raise EngineStartError(f"SLURM daemons exited: {dead}\n{cluster.log_tails()}")
        cluster.wait_nodes_ready()
        yield cluster
    finally:
        if cluster is not None:
            with contextlib.suppress(Exception):
                cluster.resume_controller()  # a test may have left it stopped
            cluster.cancel_all()
        for daemon in reversed(daemons):  # slurmd, slurmctld, munged
            daemon.stop()
        kill_mentioning(str(root))  # slurmstepd of a job that outlived its slurmd


@contextlib.contextmanager
def start_single_node_cluster() -> Iterator[SlurmCluster]:
    """Context manager behind ``slurm_cluster`` (usable outside pytest)."""
    require("munged", "slurmctld", "slurmd", "sbatch")
    _reap_leftovers()
    root = _make_root()
    node = f"pfl{os.getpid()}"
    conf = COMMON_CONF.format(
        cluster="pfleet", host=socket.gethostname().split(".")[0], ctld_addr="127.0.0.1",
        munge_socket="{munge_socket}", ctld_port=free_port(), slurmd_port=free_port(),
        root=root) + SINGLE_NODE.format(node=node)
    try:
        with _cluster(root, conf, [node], ctld_prefix=[], slurmd_prefix={node: []},
                      client_prefix=[]) as cluster:
            yield cluster
    finally:
        _remove_cgroups(node)
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def start_multinode_cluster(topo: object) -> Iterator[SlurmCluster]:
    """slurmctld + slurmd h1 in the topology's host h1, slurmd h2 in h2; client commands
    run in h3 (the login node).  ``topo`` is a ``tests.support.topology.Topology``."""
    from tests.support.topology import Topology

    assert isinstance(topo, Topology)
    require("munged", "slurmctld", "slurmd", "sbatch")
    _reap_leftovers()
    h1, h2, login = topo.host("h1"), topo.host("h2"), topo.host("h3")
    for a, b in ((login, h1), (login, h2), (h1, h2)):
        topo.check_route(a, b.ip)
        topo.check_route(b, a.ip)
    root = _make_root("-mn")
    conf = COMMON_CONF.format(
        cluster="pfleetmn", host=socket.gethostname().split(".")[0], ctld_addr=h1.ip,
        munge_socket="{munge_socket}", ctld_port=6817, slurmd_port=6818,
        root=root) + MULTI_NODE.format(h1=h1.ip, h2=h2.ip)
    try:
        with _cluster(root, conf, ["h1", "h2"], ctld_prefix=topo.nsenter(h1),
                      slurmd_prefix={"h1": topo.nsenter(h1), "h2": topo.nsenter(h2)},
                      client_prefix=topo.nsenter(login)) as cluster:
            yield cluster
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------- images


def busybox_tarball() -> Path:
    """The busybox rootfs tarball that scripts/build-test-images.sh caches (the docker
    engine fixture builds it)."""
    found = sorted(IMAGE_CACHE.glob("busybox-r*.tar"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise EngineStartError(f"no busybox rootfs in {IMAGE_CACHE}: the docker_engine "
                               "fixture (scripts/build-test-images.sh) makes it")
    return found[-1]


def unpack_busybox_image(dest: Path, tarball: Path | None = None) -> Path:
    """A Charliecloud directory image of the busybox rootfs at ``dest``: the tarball
    plus the mount points ch-run needs (it binds only onto existing paths)."""
    dest.mkdir(parents=True)
    with tarfile.open(tarball or busybox_tarball()) as tar:
        tar.extractall(dest, filter="tar")
    for sub in ("dev", "proc", "sys", "home", "mnt", "run", "var/tmp", "share/incoming",
                "share/outgoing"):
        (dest / sub).mkdir(parents=True, exist_ok=True)
    for name in ("hosts", "resolv.conf"):
        (dest / "etc" / name).touch()
    dest.chmod(0o755)
    return dest


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A one-node SLURM for the session (see the module docstring)."""
    with start_single_node_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def busybox_rootfs(docker_engine: object) -> Path:
    """The cached busybox rootfs tarball (building the docker engine's test images
    makes it)."""
    return busybox_tarball()


@pytest.fixture(scope="session")
def charliecloud_image(slurm_cluster: SlurmCluster, busybox_rootfs: Path) -> Path:
    """The busybox directory image in the cluster's run directory, named as
    Charliecloud's storage names ``localhost/pfleet-test/busybox:1``."""
    images = slurm_cluster.root / "images"
    images.mkdir(mode=0o755, exist_ok=True)
    path = images / "localhost%pfleet-test%busybox+1"
    if not path.exists():
        unpack_busybox_image(path, busybox_rootfs)
    return path
