"""Bench 5 and 6: the built-in storage operations against the usual command-line tools.

**Bench 5, fslink copy.**  10,000 small files (100 dirs x 100 x 4 KiB) and one
1 GiB file in the storeBase, copied into ``key-<jid>/incoming`` by:

* the copy *job*, as a client sees it: POST ``copyjobs/`` (cpu_limit 1000,
  memory_limit 300, pfcon's defaults) then its status every 0.05 s until
  ``finishedSuccessfully`` (a real controller with its local agent, STORAGE_ENV=fslink,
  PFCON_INNETWORK=true, on the session's private dockerd);
* the bare operation via ``OpRunner`` (the child ``python -m agent.op_worker``), with
  the job's limits (RLIMIT_DATA, a memory cgroup's soft limit, a cpu quota) and with
  none;
* the bare operation in-process (``agent.ops.run_op``);

against ``cp -r src dst`` on the same filesystem (and, for information, ``cp -r`` in a
hard memory cgroup of 300 MiB, how operations were limited before).  Every run starts
with ``sync`` and a drop of the page, dentry and inode caches (``echo 3 >
/proc/sys/vm/drop_caches``),
then the interpreter, the agent's modules and ``cp`` are loaded again (a running agent
has them in memory); *cold* runs start there, *warm* runs first read the source once.
No run syncs its own output (neither does ``cp``).  The variants are interleaved,
their order rotated each round; the median of N rounds (``PFLEET_BENCH_STORAGE_N``, 3)
is reported.  Target: job <= 1.3x ``cp -r``.  The outputs of the 10,000-file runs are
kept until the module ends (see :func:`settle`: deleting many files slows the next
file creations on this kind of filesystem).

**Bench 6, Swift.**  A real all-in-one Swift on 127.0.0.1 (``tests.support.swift``)
holds 1 GiB in 100 objects.  The copy job (Swift -> ``incoming``) is compared with
``swift download <container> -p <prefix> -D <dir>``; then a plugin job (busybox
``true``) runs, the 100 files are moved (renamed) from ``incoming`` to ``outgoing``,
and the upload job (``outgoing`` -> Swift) is compared with ``swift upload
<container> <the same outgoing dir> --object-name <prefix>``.  Each timed run starts
as a warm fslink run does (sync, drop, tools loaded, the source read once: Swift's
files or ``outgoing``); rotated order; median of N rounds.
Targets: <= 1.2x the ``swift`` client, and RSS growth < 64 MiB for the controller
(VmHWM reset before each job, ``/proc/<pid>/clear_refs``) and for the agent's
operation, which runs in a child process: its peak VmHWM, polled every 20 ms, less
the RSS of an idle interpreter that imported the same modules.

Everything lives under ``.pfleet/bench/storage-<pid>/`` (the repository's disk, not a
tmpfs) and is removed at the end.  Nothing here asserts a timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.op_runner import OpRunner, detect_cgroups, set_cpu_quota, set_memory_limit
from agent.ops import run_op
from agent.protocol import JobSpec
from tests.bench.helpers import (
    BenchDeployment,
    JobFailed,
    PfconHttp,
    Report,
    median,
    plugin_descriptors,
    publish,
    reset_peak_rss,
    status_kib,
    tiny_zip,
)
from tests.support.engines import BUSYBOX_IMAGE, Engine
from tests.support.swift import SwiftService, SwiftStartError, start_swift

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRATCH_PARENT = REPO_ROOT / ".pfleet" / "bench"
BIN = Path(sys.executable).parent
MIB = 1 << 20
GIB = 1 << 30
REPS = max(1, int(os.environ.get("PFLEET_BENCH_STORAGE_N", "3")))
MIN_FREE = 10 * GIB
SMALL_DIRS, SMALL_PER_DIR, SMALL_SIZE = 100, 100, 4096
BIG_SIZE = GIB
SWIFT_OBJECTS = 100
SWIFT_CONTAINER = "users"
CPU_LIMIT, MEMORY_LIMIT = 1000, 300  # what CUBE sends (pfcon's defaults)
POLL = 0.05
JOB_TIMEOUT = 600.0
TARGET_FSLINK = 1.3
TARGET_SWIFT = 1.2
TARGET_GROWTH_MIB = 64.0
WORKER_MODULE = b"agent.op_worker"
FORK_SERVER_MODULE = b"agent.op_forkserver"


# ------------------------------------------------------------------ scratch space


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    """``.pfleet/bench/storage-<pid>``: on the repository's disk, removed at the end."""
    SCRATCH_PARENT.mkdir(parents=True, exist_ok=True)
    fstype = filesystem_type(SCRATCH_PARENT)
    if fstype in ("tmpfs", "ramfs"):
        pytest.skip(f"{SCRATCH_PARENT} is on {fstype}: the storage benchmarks need a disk")
    free = shutil.disk_usage(SCRATCH_PARENT).free
    if free < MIN_FREE:
        pytest.skip(f"{free / GIB:.1f} GiB free under {SCRATCH_PARENT}, the storage "
                    f"benchmarks need {MIN_FREE // GIB}")  # fmt: skip
    path = SCRATCH_PARENT / f"storage-{os.getpid()}"
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        drop_caches()  # see settle(): spare whatever runs next the deleted inodes


def filesystem_type(path: Path) -> str:
    """The type of the filesystem holding ``path`` (longest mount point of /proc/mounts)."""
    best, kind = "", "?"
    real = os.path.realpath(path)
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        mount = fields[1].replace("\\040", " ")
        inside = real == mount or real.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, kind = mount, fields[2]
    return kind


def drop_caches() -> bool:
    """``sync`` then drop the page, dentry and inode caches; False when refused."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3")
    except OSError:
        return False
    return True


def prime(path: Path) -> None:
    """Read every file under ``path`` once (the warm case)."""
    for top, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(top, name), "rb", buffering=0) as fh:
                while fh.read(8 * MIB):
                    pass


def python_path() -> str:
    """PYTHONPATH for interpreters that import the agent (a caller's own first)."""
    return os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(REPO_ROOT)) if p)


def warm_tools() -> None:
    """Load what a running agent and a shell have in memory anyway: the interpreter, the
    agent's modules (an op worker imports them at each start) and ``cp``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = python_path()
    code = "import agent.op_worker, agent.ops, agent.ops_swift"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
    subprocess.run(["cp", "--version"], stdout=subprocess.DEVNULL, check=True, timeout=60)


def settle(sources: list[Path], cache: str, can_drop: bool) -> None:
    """The state every timed run starts from: ``sync`` (no writeback of an earlier run in
    flight); the page, dentry and inode caches dropped (when allowed), then the tools
    loaded again; for ``warm`` the sources read once.

    Deleting many files disturbs what follows on a journal-less ext4 (as here): its
    inode allocator skips inodes deleted in the last 60-360 s whose inode table block
    is cached, so creating 10,000 files soon after deleting 10,000 costs seconds of
    system time (reading the sources caches those blocks again).  So the outputs of
    the 10,000-file runs are only removed when the module ends, followed by ``sync``
    and a cache drop."""
    os.sync()
    if can_drop:
        if not drop_caches():
            raise JobFailed("drop_caches refused after it worked once")
        warm_tools()
    if cache == "warm":
        for src in sources:
            prime(src)


def tree_stats(path: Path) -> tuple[int, int]:
    """(regular files, bytes) under ``path``."""
    files = size = 0
    for top, _dirs, names in os.walk(path):
        for name in names:
            st = os.lstat(os.path.join(top, name))
            files += 1
            size += st.st_size
    return files, size


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def load_note() -> str:
    load1 = os.getloadavg()[0]
    flag = " (ABOVE 1.5: other work competed)" if load1 > 1.5 else ""
    return f"load average (1 min) at the end: {load1:.2f}{flag}"


# ------------------------------------------------------------------ op workers


def children(pid: int) -> set[int]:
    """Direct children of ``pid`` (every thread's ``/proc/<pid>/task/<tid>/children``)."""
    found: set[int] = set()
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                found.update(
                    int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()
                )
    return found


def process_state(pid: int) -> str | None:
    """The state letter of ``/proc/<pid>/stat`` (``Z`` for a zombie), None if gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return data[data.rindex(b")") + 2 :][:1].decode()


def memory_cgroup(pid: int) -> Path | None:
    """The v1 memory cgroup directory (or v2 unified one) of a process, once it is an
    operation's leaf (``.../pfleet/<leaf>``)."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _hid, ctrls, path = line.split(":", 2)
        if "/pfleet/" not in path:
            continue
        if "memory" in ctrls.split(","):
            return Path("/sys/fs/cgroup/memory" + path)
        if ctrls == "" and Path("/sys/fs/cgroup/unified").is_dir():
            return Path("/sys/fs/cgroup/unified" + path)
    return None


@dataclass
class WorkerSeen:
    pid: int
    first: float  # first seen running
    alive: float  # last seen running (not a zombie)
    listed: float  # last seen among the children: a zombie stays until it is reaped
    hwm_kib: int = 0
    cgroup: Path | None = None
    cg_peak: int = 0  # memory.max_usage_in_bytes (v1) / memory.peak (v2): page cache too
    cg_anon_peak: int = 0  # largest rss (v1) / anon (v2) of memory.stat


class WorkerWatch(threading.Thread):
    """Every 20 ms: the operation workers of ``parent`` (see ``candidates``): when they
    were first seen, last seen running, last seen at all (an exited worker stays a
    zombie until its parent reaps it), their peak VmHWM and their cgroup's peak usage."""

    def __init__(self, parent: int, interval: float = 0.02, limit_s: float = 900.0) -> None:
        super().__init__(daemon=True, name="bench-worker-watch")
        self.parent, self.interval, self.limit_s = parent, interval, limit_s
        self.workers: dict[int, WorkerSeen] = {}
        self.halt = threading.Event()

    def __enter__(self) -> WorkerWatch:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.halt.set()
        self.join(timeout=5)

    def run(self) -> None:
        for _ in range(int(self.limit_s / self.interval)):
            self.tick()
            if self.halt.wait(self.interval):
                return

    def candidates(self) -> set[int]:
        """Workers the parent started (``python -m agent.op_worker``) and the children
        of its fork server (each one a worker)."""
        found: set[int] = set()
        for pid in children(self.parent):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if FORK_SERVER_MODULE in cmdline:
                found.update(children(pid))
            elif WORKER_MODULE in cmdline:
                found.add(pid)  # (a worker between fork and exec is not one yet)
        return found

    def tick(self) -> None:
        now = time.monotonic()
        for pid in self.candidates():
            seen = self.workers.get(pid)
            if seen is None:
                seen = self.workers[pid] = WorkerSeen(pid, now, now, now)
            seen.listed = now
            if process_state(pid) in ("Z", "X", None):
                continue
            seen.alive = now
            with contextlib.suppress(OSError, KeyError, ValueError):
                seen.hwm_kib = max(seen.hwm_kib, status_kib(pid, "VmHWM"))
            if seen.cgroup is None:
                seen.cgroup = memory_cgroup(pid)
            if seen.cgroup is not None:
                self._cgroup(seen)

    @staticmethod
    def _cgroup(seen: WorkerSeen) -> None:
        assert seen.cgroup is not None
        for name in ("memory.max_usage_in_bytes", "memory.peak"):
            with contextlib.suppress(OSError, ValueError):
                seen.cg_peak = max(seen.cg_peak, int((seen.cgroup / name).read_text()))
        with contextlib.suppress(OSError, ValueError):
            for line in (seen.cgroup / "memory.stat").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key in ("rss", "anon"):
                    seen.cg_anon_peak = max(seen.cg_anon_peak, int(value))

    def only(self) -> WorkerSeen | None:
        """The one worker seen (None if none, or if there were several)."""
        return next(iter(self.workers.values())) if len(self.workers) == 1 else None


def worker_floor(modules: list[str]) -> tuple[float, int]:
    """(seconds, VmRSS KiB) of an idle interpreter started as the worker is, after
    importing ``modules``: what any operation costs before it does anything."""
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules)
            + "print(next(l.split()[1] for l in open('/proc/self/status') "
              "if l.startswith('VmRSS:')))\n")  # fmt: skip
    env = dict(os.environ)
    env["PYTHONPATH"] = python_path()
    t0 = time.monotonic()
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=60)  # fmt: skip
    took = time.monotonic() - t0
    if run.returncode != 0:
        raise JobFailed(f"importing {modules}: {run.stderr[-500:]}")
    return took, int(run.stdout.strip())


# ------------------------------------------------------------------ job calls


PHASES = ("POST -> 201", "201 -> op worker started", "op worker running",
          "worker exit -> agent reaped it", "reaped -> client saw finished")  # fmt: skip


@dataclass
class JobRun:
    """One job end to end as the client saw it, split with the worker's lifetime."""

    total_s: float
    post_s: float  # POST -> 201
    to_worker_s: float | None = None  # 201 -> worker first seen
    worker_s: float | None = None  # worker first -> last seen running
    reap_s: float | None = None  # worker last seen running -> reaped by the agent
    after_worker_s: float | None = None  # reaped -> the client saw the final status
    worker_hwm_kib: int | None = None
    cg_peak_bytes: int | None = None
    cg_anon_peak_bytes: int | None = None
    controller_growth_kib: int | None = None

    def phases(self) -> dict[str, float | None]:
        return {"POST -> 201": self.post_s, "201 -> op worker started": self.to_worker_s,
                "op worker running": self.worker_s,
                "worker exit -> agent reaped it": self.reap_s,
                "reaped -> client saw finished": self.after_worker_s}  # fmt: skip


def post_form(http: PfconHttp, path: str, fields: dict[str, Any]) -> dict[str, Any]:
    response = http.session.post(http.base + path, data=fields, timeout=60)
    if response.status_code != 201:
        raise JobFailed(f"POST {path} {fields.get('jid')}: {response.status_code} "
                        f"{response.text[:300]}")  # fmt: skip
    return response.json()["compute"]


def timed_job(deployment: BenchDeployment, http: PfconHttp, kind: str,
              fields: dict[str, Any]) -> JobRun:  # fmt: skip
    """POST ``<kind>jobs/`` and poll it every 0.05 s to its end, watching the worker and
    the controller's peak RSS."""
    pid = deployment.pid
    reset_peak_rss(pid)
    rss0 = status_kib(pid, "VmRSS")
    with WorkerWatch(pid) as watch:
        t0 = time.monotonic()
        post_form(http, f"{kind}jobs/", fields)
        t201 = time.monotonic()
        done = http.wait(fields["jid"], kind=kind, interval=POLL, timeout=JOB_TIMEOUT)
        t1 = time.monotonic()
    if done["status"] != "finishedSuccessfully":
        raise JobFailed(f"{kind} job {fields['jid']}: {done}")
    run = JobRun(total_s=t1 - t0, post_s=t201 - t0,
                 controller_growth_kib=status_kib(pid, "VmHWM") - rss0)  # fmt: skip
    seen = watch.only()
    if seen is not None:
        run.to_worker_s = seen.first - t201
        run.worker_s = seen.alive - seen.first
        run.reap_s = seen.listed - seen.alive
        run.after_worker_s = t1 - seen.listed
        run.worker_hwm_kib = seen.hwm_kib
        run.cg_peak_bytes = seen.cg_peak or None
        run.cg_anon_peak_bytes = seen.cg_anon_peak or None
    return run


def forget_jobs(http: PfconHttp, jid: str, kinds: tuple[str, ...]) -> None:
    for kind in kinds:
        response = http.session.delete(f"{http.base}{kind}jobs/{jid}/", timeout=60)
        if response.status_code not in (204, 404):
            raise JobFailed(f"DELETE {kind} {jid}: {response.status_code}")


# =========================================================== bench 5: fslink copy


@dataclass
class FslinkCase:
    label: str
    rel: str  # storage path of the input dir
    files: int
    bytes: int


@dataclass
class FslinkResults:
    """Seconds per variant per (case, cache), and the job runs."""

    times: dict[tuple[str, str, str], list[float]] = field(default_factory=dict)
    jobs: dict[tuple[str, str], list[JobRun]] = field(default_factory=dict)
    workers: dict[tuple[str, str, str], list[WorkerSeen]] = field(default_factory=dict)

    def add(self, case: str, cache: str, variant: str, seconds: float) -> None:
        self.times.setdefault((case, cache, variant), []).append(seconds)


def make_fslink_data(storebase: Path) -> list[FslinkCase]:
    small = storebase / "home" / "bench" / "small"
    for d in range(SMALL_DIRS):
        sub = small / f"d{d:03d}"
        sub.mkdir(parents=True)
        for f in range(SMALL_PER_DIR):
            (sub / f"f{f:03d}.bin").write_bytes(os.urandom(SMALL_SIZE))
    big = storebase / "home" / "bench" / "big"
    big.mkdir(parents=True)
    block = os.urandom(8 * MIB)
    with open(big / "one.bin", "wb") as fh:
        for _ in range(BIG_SIZE // len(block)):
            fh.write(block)
    (storebase / "home" / "bench" / "feeds" / "out").mkdir(parents=True)
    os.sync()
    cases = []
    for label, rel in (("10,000 x 4 KiB files", "home/bench/small"),
                       ("1 GiB file", "home/bench/big")):  # fmt: skip
        files, size = tree_stats(storebase / rel)
        cases.append(FslinkCase(label, rel, files, size))
    return cases


@contextlib.contextmanager
def job_cgroups(name: str) -> Iterator[list[Path]]:
    """Fresh cgroup v1 leaves (memory, cpu), below this process's own, with a hard
    memory limit of the job's ``memory_limit`` (page cache included) and its CPU quota;
    yields their ``cgroup.procs`` files and removes the leaves after."""
    hierarchies = detect_cgroups()
    leaves: list[Path] = []
    try:
        for ctrl in ("memory", "cpu"):
            h = hierarchies.get(ctrl)
            if h is None or h.version != 1:
                raise JobFailed(f"no cgroup v1 {ctrl} hierarchy: cannot limit cp like the job")
            leaf = h.own / name
            if leaf in leaves:
                continue  # memory and cpu mounted together
            leaf.mkdir()
            leaves.append(leaf)
            if ctrl == "memory":
                set_memory_limit(leaf, 1, MEMORY_LIMIT * MIB)
            else:
                set_cpu_quota(leaf, 1, CPU_LIMIT)
        yield [leaf / "cgroup.procs" for leaf in leaves]
    finally:
        for leaf in reversed(leaves):
            with contextlib.suppress(OSError):
                leaf.rmdir()  # cp has exited: the leaf is empty


class FslinkBench:
    def __init__(self, deployment: BenchDeployment, scratch: Path) -> None:
        self.deployment = deployment
        self.storebase = deployment.storebase
        self.scratch = scratch
        self.http = deployment.client()
        self.limited = OpRunner(scratch / "runner-limited", self.storebase)
        self.unlimited = OpRunner(scratch / "runner-unlimited", self.storebase,
                                  enforce_limits=False)  # fmt: skip
        # one loop for every OpRunner call: each keeps its fork server (and its reader
        # task) across runs, as the agent does; a loop per run would start a new one
        self.loop = asyncio.Runner()
        self.results = FslinkResults()
        self.counter = 0
        self.can_drop = drop_caches()

    def close(self) -> None:
        self.http.close()
        with contextlib.suppress(Exception):
            self.loop.run(self.limited.close())
            self.loop.run(self.unlimited.close())
        self.loop.close()

    def _jid(self, tag: str) -> str:
        self.counter += 1
        return f"st-{tag}-{self.counter}"

    def _op(self, case: FslinkCase, jid: str) -> dict[str, Any]:
        return {"op": "copy", "storage": "fslink", "key_dir": f"key-{jid}",
                "input_dirs": [case.rel], "output_dir": "home/bench/feeds/out"}  # fmt: skip

    def _check(self, case: FslinkCase, where: Path, what: str) -> None:
        got = tree_stats(where)
        if got != (case.files, case.bytes):
            raise JobFailed(f"{what}: copied {got[0]} files / {got[1]} bytes of {case.label}, "
                            f"expected {case.files} / {case.bytes}")  # fmt: skip

    # -- the variants: each returns seconds, checks its output, leaves it for cleanup

    def cp(self, case: FslinkCase, cache: str) -> tuple[float, Path]:
        return self._cp(case, cache, "cp-dst", [])

    def cp_limited(self, case: FslinkCase, cache: str) -> tuple[float, Path]:
        with job_cgroups(f"bench-cp-{os.getpid()}-{self.counter}") as procs:
            return self._cp(case, cache, "cp-lim-dst", procs)

    def _cp(self, case: FslinkCase, cache: str, tag: str,
            procs: list[Path]) -> tuple[float, Path]:  # fmt: skip
        """``cp -r``; with ``procs``, started inside those cgroups (a shell joins them
        and execs cp, so cp's every page is charged there from the start)."""
        dst = self.scratch / self._jid(tag)
        src = self.storebase / case.rel
        self._prepare(src, cache)
        argv = ["cp", "-r", str(src), str(dst)]
        if procs:
            joins = "".join(f'echo $$ > "{p}" && ' for p in procs)
            argv = ["sh", "-c", f'{joins}exec "$@"', "sh", *argv]
        t0 = time.monotonic()
        run = subprocess.run(argv, capture_output=True, text=True, timeout=JOB_TIMEOUT)
        took = time.monotonic() - t0
        if run.returncode != 0:
            raise JobFailed(f"cp -r: {run.stderr[-300:]}")
        self._check(case, dst, "cp -r")
        return took, dst

    def job(self, case: FslinkCase, cache: str) -> tuple[float, Path]:
        jid = self._jid("job")
        self._prepare(self.storebase / case.rel, cache)
        run = timed_job(self.deployment, self.http, "copy", {
            "jid": jid, "input_dirs": [case.rel], "output_dir": "home/bench/feeds/out",
            "cpu_limit": CPU_LIMIT, "memory_limit": MEMORY_LIMIT})  # fmt: skip
        key = self.storebase / f"key-{jid}"
        self._check(case, key / "incoming", "copy job")
        forget_jobs(self.http, jid, ("copy",))
        self.results.jobs.setdefault((case.label, cache), []).append(run)
        return run.total_s, key

    def _runner(self, runner: OpRunner, variant: str, case: FslinkCase,
                cache: str) -> tuple[float, Path]:  # fmt: skip
        jid = self._jid(variant)
        spec = JobSpec(job=uuid.uuid4().hex, attempt=1, name=f"{jid}-copy", jid=jid,
                       kind="copy", image="", command=["copy", case.rel],
                       cpu_limit=CPU_LIMIT, memory_limit=MEMORY_LIMIT,
                       op=self._op(case, jid))  # fmt: skip
        self._prepare(self.storebase / case.rel, cache)
        with WorkerWatch(os.getpid()) as watch:
            t0 = time.monotonic()
            result = self.loop.run(runner.run(spec))
            took = time.monotonic() - t0
        runner.forget(spec)
        if result.exit_code != 0:
            raise JobFailed(f"OpRunner copy: {result.message} {result.log[-300:]}")
        key = self.storebase / f"key-{jid}"
        self._check(case, key / "incoming", f"OpRunner ({variant})")
        if (seen := watch.only()) is not None:
            self.results.workers.setdefault((case.label, cache, variant), []).append(seen)
        return took, key

    def runner_limited(self, case: FslinkCase, cache: str) -> tuple[float, Path]:
        return self._runner(self.limited, "runner_limited", case, cache)

    def runner_unlimited(self, case: FslinkCase, cache: str) -> tuple[float, Path]:
        return self._runner(self.unlimited, "runner_unlimited", case, cache)

    def in_process(self, case: FslinkCase, cache: str) -> tuple[float, Path]:
        jid = self._jid("inproc")
        op = self._op(case, jid)
        self._prepare(self.storebase / case.rel, cache)
        t0 = time.monotonic()
        run_op(op, self.storebase)
        took = time.monotonic() - t0
        key = self.storebase / f"key-{jid}"
        self._check(case, key / "incoming", "run_op")
        return took, key

    def _prepare(self, src: Path, cache: str) -> None:
        settle([src], cache, self.can_drop)


VARIANTS: dict[str, str] = {
    "cp": "cp -r",
    "cp_limited": "cp -r in a hard memory cgroup of the job's memory_limit",
    "job": "copy job, client view",
    "runner_limited": "OpRunner child, job limits",
    "runner_unlimited": "OpRunner child, no limits",
    "in_process": "run_op in-process",
}


def run_fslink(bench: FslinkBench, cases: list[FslinkCase], caches: list[str]) -> None:
    """Every variant, interleaved (order rotated each round).  Outputs of many files are
    kept until the module ends: see :func:`settle` on deleting many inodes."""
    names = list(VARIANTS)
    for case in cases:
        for cache in caches:
            for rep in range(REPS):
                shift = rep % len(names)
                for name in names[shift:] + names[:shift]:
                    method: Callable[[FslinkCase, str], tuple[float, Path]] = getattr(bench, name)
                    took, output = method(case, cache)
                    bench.results.add(case.label, cache, name, took)
                    if case.files <= 10:
                        remove(output)  # the 1 GiB file: a few inodes, a lot of space


def fslink_report(results: FslinkResults, cases: list[FslinkCase], caches: list[str],
                  floor: tuple[float, int], cold_ok: bool) -> Report:  # fmt: skip
    report = Report(5, f"fslink copy job vs cp -r, same disk (median of {REPS})")
    for case in cases:
        for cache in caches:
            t = {v: median(results.times[(case.label, cache, v)]) for v in VARIANTS}
            base = t["cp"]
            head = f"{case.label}, {cache}"
            report.add(f"{head}: copy job (s)", t["job"], base, "cp -r",
                       f"<= {TARGET_FSLINK:.2f}x", t["job"] <= TARGET_FSLINK * base,
                       fmt="{:.2f}")  # fmt: skip
            for v in ("cp_limited", "runner_limited", "runner_unlimited", "in_process"):
                report.add(f"  {VARIANTS[v]} (s)", t[v], base, "cp -r", fmt="{:.2f}")
            jobs = results.jobs.get((case.label, cache), [])
            for phase in PHASES:
                values = [v for j in jobs if (v := j.phases()[phase]) is not None]
                if values:
                    report.add(f"  job: {phase} (s)", median(values), fmt="{:.2f}")
            for v in ("runner_limited", "runner_unlimited"):
                seen = results.workers.get((case.label, cache, v), [])
                if seen:
                    reap = median([w.listed - w.alive for w in seen])
                    report.add(f"  {VARIANTS[v]}: worker exit -> reaped (s)", reap, fmt="{:.2f}")
            hwm = [j.worker_hwm_kib for j in jobs if j.worker_hwm_kib]
            cg = [j.cg_peak_bytes for j in jobs if j.cg_peak_bytes]
            if hwm:
                report.add("  job: op worker peak RSS (MiB)", max(hwm) / 1024)
            if cg:
                report.add("  job: op cgroup peak incl. page cache (MiB)", max(cg) / MIB)
            report.add("  cp -r throughput (MB/s)", case.bytes / base / 1e6, fmt="{:.0f}")
    growth = [j.controller_growth_kib for js in results.jobs.values() for j in js
              if j.controller_growth_kib is not None]  # fmt: skip
    if growth:
        report.add("controller peak RSS growth per job (MiB)", max(growth) / 1024)
    report.add("idle worker: start + imports (s)", floor[0], fmt="{:.2f}")
    if not cold_ok:
        report.note("cold runs SKIPPED: writing /proc/sys/vm/drop_caches was refused; "
                    "warm page cache only")  # fmt: skip
    report.note(
        "every run starts after sync + drop_caches + reloading python, the agent's modules "
        "and cp; warm = then the source read once; outputs are not synced (as cp -r)"
    )
    report.note(
        "reading the variants: OpRunner no limits - run_op in-process = the worker's start "
        "and the runner's wait for its exit; job limits - no limits = the CPU quota, "
        "RLIMIT_DATA and the memory cgroup's soft limit; job - OpRunner = controller and "
        f"agent; cp -r in a hard memory cgroup = cp in a fresh cgroup limited to "
        f"{MEMORY_LIMIT} MiB (page cache included, as operations were limited before) and "
        f"{CPU_LIMIT} millicores: what capping the cache costs"
    )
    report.note(
        f"job: cpu_limit {CPU_LIMIT}, memory_limit {MEMORY_LIMIT} MiB, status polled "
        f"every {POLL} s; phases from a 20 ms watch of the op worker process"
    )
    report.note(load_note())
    return report


@pytest.mark.bench
@pytest.mark.timeout(1200)
def test_fslink_copy_vs_cp(bench_engine: Engine, scratch: Path) -> None:
    workdir = scratch / "fslink"
    workdir.mkdir()
    deployment = BenchDeployment(
        workdir, bench_engine, {"PFCON_INNETWORK": "true", "STORAGE_ENV": "fslink"}
    )
    bench: FslinkBench | None = None
    try:
        t0 = time.monotonic()
        cases = make_fslink_data(deployment.storebase)
        print(f"\nfslink data made in {time.monotonic() - t0:.1f} s", flush=True)
        bench = FslinkBench(deployment, workdir)
        cold_ok = bench.can_drop
        caches = ["cold", "warm"] if cold_ok else ["warm"]
        # warm-up: the controller's first copy job, a first worker, imports
        warm = FslinkCase("warm-up", "home/bench/small/d000", SMALL_PER_DIR,
                          SMALL_PER_DIR * SMALL_SIZE)  # fmt: skip
        for name in ("job", "runner_limited", "in_process"):
            getattr(bench, name)(warm, "warm")  # outputs kept, see settle()
        bench.results = FslinkResults()
        run_fslink(bench, cases, caches)
        floor = worker_floor(["agent.op_worker", "agent.ops"])
        report = fslink_report(bench.results, cases, caches, floor, cold_ok)
        report.extra = {
            "times": {" / ".join(k): v for k, v in bench.results.times.items()},
            "jobs": {" / ".join(k): [vars(j) for j in v] for k, v in bench.results.jobs.items()},
        }
        publish(report)
    finally:
        if bench is not None:
            bench.close()
        deployment.stop()  # the data stays until the module ends (see settle())


# ============================================================= bench 6: swift


@dataclass
class CliRun:
    seconds: float
    maxrss_kib: int


class SwiftBench:
    def __init__(self, deployment: BenchDeployment, swift: SwiftService, scratch: Path) -> None:
        self.deployment = deployment
        self.swift = swift
        self.scratch = scratch
        self.http = deployment.client()
        self.conn = swift.connection(timeout=120)
        self.copy_runs: list[JobRun] = []
        self.upload_runs: list[JobRun] = []
        self.cli_download: list[CliRun] = []
        self.cli_upload: list[CliRun] = []
        self.can_drop = drop_caches()

    def close(self) -> None:
        self.http.close()
        self.conn.close()

    def seed(self) -> None:
        """1 GiB in 100 objects under ``home/bench/data/`` (streamed from disk)."""
        self.conn.put_container(SWIFT_CONTAINER)
        src = self.scratch / "seed"
        src.mkdir()
        sizes = [BIG_SIZE // SWIFT_OBJECTS] * SWIFT_OBJECTS
        sizes[-1] += BIG_SIZE - sum(sizes)
        for i, size in enumerate(sizes):
            (src / f"part-{i:03d}.bin").write_bytes(os.urandom(size))
        self.cli(["upload", SWIFT_CONTAINER, str(src), "--object-name", "home/bench/data"])
        shutil.rmtree(src)
        self.check_prefix("home/bench/data/", "seeding")

    def check_prefix(self, prefix: str, what: str) -> None:
        _, objects = self.conn.get_container(SWIFT_CONTAINER, prefix=prefix, full_listing=True)
        got = (len(objects), sum(int(o["bytes"]) for o in objects))
        if got != (SWIFT_OBJECTS, BIG_SIZE):
            raise JobFailed(f"{what}: {got[0]} objects / {got[1]} bytes under {prefix}, "
                            f"expected {SWIFT_OBJECTS} / {BIG_SIZE}")  # fmt: skip

    def delete_prefix(self, prefix: str) -> None:
        _, objects = self.conn.get_container(SWIFT_CONTAINER, prefix=prefix, full_listing=True)
        for obj in objects:
            self.conn.delete_object(SWIFT_CONTAINER, obj["name"])

    def cli(self, args: list[str], timeout: float = JOB_TIMEOUT) -> CliRun:
        """The ``swift`` command line client; its peak RSS from ``wait4``."""
        argv = [str(BIN / "swift"), "-A", self.swift.auth_url, "-U", self.swift.user,
                "-K", self.swift.key, *args]  # fmt: skip
        err_path = self.scratch / "swift-cli.err"
        with open(err_path, "wb") as err:
            t0 = time.monotonic()
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=err)  # fmt: skip
            deadline = t0 + timeout
            for _ in range(int(timeout / 0.002) + 2):
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if time.monotonic() > deadline:
                    proc.kill()
                    pid, status, usage = os.wait4(proc.pid, 0)
                    break
                time.sleep(0.002)
            took = time.monotonic() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise JobFailed(f"swift {args[0]} failed ({proc.returncode}): "
                            f"{err_path.read_text(errors='replace')[-500:]}")  # fmt: skip
        return CliRun(took, usage.ru_maxrss)

    def round(self, rep: int) -> None:
        jid = f"sw-{rep}"
        out = f"home/bench/out/pf-{rep}"
        key = self.deployment.storebase / f"key-{jid}"
        dl = self.scratch / f"dl-{rep}"

        def cli_download() -> None:
            settle([self.swift.workdir], "warm", self.can_drop)
            run = self.cli(["download", SWIFT_CONTAINER, "-p", "home/bench/data/", "-D", str(dl)])
            got = tree_stats(dl)
            if got != (SWIFT_OBJECTS, BIG_SIZE):
                raise JobFailed(f"swift download: {got}")
            self.cli_download.append(run)

        def copy_job() -> None:
            settle([self.swift.workdir], "warm", self.can_drop)
            run = timed_job(self.deployment, self.http, "copy", {
                "jid": jid, "input_dirs": ["home/bench/data"], "output_dir": out,
                "cpu_limit": CPU_LIMIT, "memory_limit": MEMORY_LIMIT})  # fmt: skip
            got = tree_stats(key / "incoming")
            if got != (SWIFT_OBJECTS, BIG_SIZE):
                raise JobFailed(f"swift copy job: {got}")
            self.copy_runs.append(run)

        for step in (cli_download, copy_job) if rep % 2 == 0 else (copy_job, cli_download):
            step()
        remove(dl)
        # the plugin: busybox true; then its "outputs" are the 100 files, renamed
        descriptors = {**plugin_descriptors(["true"], BUSYBOX_IMAGE),
                       "input_dirs": ["home/bench/data"], "output_dir": out}  # fmt: skip
        self.http.submit(jid, descriptors, tiny_zip())
        done = self.http.wait(jid, interval=0.2, timeout=120.0)
        if done["status"] != "finishedSuccessfully":
            raise JobFailed(f"plugin job {jid}: {done}")
        outgoing = key / "outgoing"
        for path in (key / "incoming").iterdir():
            path.rename(outgoing / path.name)
        cli_prefix = f"home/bench/out/cli-{rep}"

        def cli_upload() -> None:
            settle([outgoing], "warm", self.can_drop)
            run = self.cli(["upload", SWIFT_CONTAINER, str(outgoing), "--object-name",
                            cli_prefix])  # fmt: skip
            self.check_prefix(cli_prefix + "/", "swift upload")
            self.cli_upload.append(run)

        def upload_job() -> None:
            settle([outgoing], "warm", self.can_drop)
            run = timed_job(self.deployment, self.http, "upload", {
                "jid": jid, "job_output_path": out, "cpu_limit": CPU_LIMIT,
                "memory_limit": MEMORY_LIMIT})  # fmt: skip
            self.check_prefix(out + "/", "upload job")
            self.upload_runs.append(run)

        for step in (cli_upload, upload_job) if rep % 2 == 0 else (upload_job, cli_upload):
            step()
        # clean up: the job's data (deletejobs, as CUBE), the jobs, the uploaded objects
        post_form(self.http, "deletejobs/", {"jid": jid})
        gone = self.http.wait(jid, kind="delete", interval=0.2, timeout=120.0)
        if gone["status"] != "finishedSuccessfully":
            raise JobFailed(f"delete job {jid}: {gone}")
        forget_jobs(self.http, jid, ("copy", "plugin", "upload", "delete"))
        self.delete_prefix(out + "/")
        self.delete_prefix(cli_prefix + "/")


def swift_report(bench: SwiftBench, floor: tuple[float, int]) -> Report:
    report = Report(6, f"swift copy/upload, 1 GiB in {SWIFT_OBJECTS} objects, vs the swift "
                    f"client (median of {REPS})")  # fmt: skip
    floor_mib = floor[1] / 1024
    rows = (
        ("copy (Swift -> incoming)", bench.copy_runs, bench.cli_download, "swift download"),
        ("upload (outgoing -> Swift)", bench.upload_runs, bench.cli_upload, "swift upload"),
    )
    worker_growth: list[float] = []
    for label, runs, cli, cli_name in rows:
        job_s = median([r.total_s for r in runs])
        cli_s = median([r.seconds for r in cli])
        report.add(f"{label}: job (s)", job_s, cli_s, cli_name, f"<= {TARGET_SWIFT:.2f}x",
                   job_s <= TARGET_SWIFT * cli_s, fmt="{:.2f}")  # fmt: skip
        report.add(f"  {label}: job throughput (MB/s)", BIG_SIZE / job_s / 1e6,
                   BIG_SIZE / cli_s / 1e6, cli_name, ratio=cli_s / job_s,
                   fmt="{:.0f}")  # fmt: skip
        for phase in PHASES:
            values = [v for r in runs if (v := r.phases()[phase]) is not None]
            if values:
                report.add(f"  job: {phase} (s)", median(values), fmt="{:.2f}")
        hwm = [r.worker_hwm_kib / 1024 for r in runs if r.worker_hwm_kib]
        if hwm:
            growth = max(hwm) - floor_mib
            worker_growth.append(growth)
            report.add(f"  {label}: op worker peak RSS (MiB)", max(hwm),
                       max(r.maxrss_kib for r in cli) / 1024, f"{cli_name} maxrss")  # fmt: skip
        anon = [r.cg_anon_peak_bytes / MIB for r in runs if r.cg_anon_peak_bytes]
        cg = [r.cg_peak_bytes / MIB for r in runs if r.cg_peak_bytes]
        if anon:
            report.add(f"  {label}: op cgroup peak anon/rss (MiB)", max(anon))
        if cg:
            report.add(f"  {label}: op cgroup peak incl. page cache (MiB)", max(cg))
    growth = [r.controller_growth_kib / 1024 for r in bench.copy_runs + bench.upload_runs
              if r.controller_growth_kib is not None]  # fmt: skip
    if growth:
        report.add("controller peak RSS growth (MiB)", max(growth), None, "",
                   f"< {TARGET_GROWTH_MIB:.0f} MiB", max(growth) < TARGET_GROWTH_MIB)  # fmt: skip
    if worker_growth:
        report.add("agent op worker RSS growth (MiB)", max(worker_growth), None, "",
                   f"< {TARGET_GROWTH_MIB:.0f} MiB",
                   max(worker_growth) < TARGET_GROWTH_MIB)  # fmt: skip
    report.add("  idle op worker after imports: VmRSS (MiB)", floor_mib)
    report.add("  idle op worker: start + imports (s)", floor[0], fmt="{:.2f}")
    report.note(
        "op worker growth = its peak VmHWM (polled every 20 ms) - VmRSS of an idle "
        "interpreter that imported agent.op_worker, agent.ops, agent.ops_swift"
    )
    report.note(
        "pfleet: 4 threads per op (ops_swift default); swift client: its default 10 "
        "object threads; before each run: sync, drop_caches, reload the tools, then read "
        "the source once (Swift's files, or outgoing/): warm source on both sides"
    )
    report.note(load_note())
    return report


@pytest.mark.bench
@pytest.mark.timeout(1200)
def test_swift_copy_upload_vs_swift_cli(bench_engine: Engine, scratch: Path) -> None:
    workdir = scratch / "swift"
    workdir.mkdir()
    try:
        swift_cm = start_swift(workdir)
        swift = swift_cm.__enter__()
    except SwiftStartError as exc:
        pytest.fail(f"could not start Swift: {exc}", pytrace=False)
    deployment: BenchDeployment | None = None
    bench: SwiftBench | None = None
    try:
        env = {"PFCON_INNETWORK": "true", "STORAGE_ENV": "swift",
               "SWIFT_AUTH_URL": swift.auth_url, "SWIFT_USERNAME": swift.user,
               "SWIFT_KEY": swift.key, "SWIFT_CONTAINER_NAME": SWIFT_CONTAINER}  # fmt: skip
        deployment = BenchDeployment(workdir, bench_engine, env)
        bench = SwiftBench(deployment, swift, workdir)
        t0 = time.monotonic()
        bench.seed()
        print(f"\nswift seeded with 1 GiB in {time.monotonic() - t0:.1f} s", flush=True)
        for rep in range(REPS):
            bench.round(rep)
        floor = worker_floor(["agent.op_worker", "agent.ops", "agent.ops_swift"])
        report = swift_report(bench, floor)
        report.extra = {
            "copy_jobs": [vars(r) for r in bench.copy_runs],
            "upload_jobs": [vars(r) for r in bench.upload_runs],
            "swift_download": [vars(r) for r in bench.cli_download],
            "swift_upload": [vars(r) for r in bench.cli_upload],
        }
        publish(report)
    finally:
        if bench is not None:
            bench.close()
        if deployment is not None:
            deployment.stop()
        swift_cm.__exit__(None, None, None)
        shutil.rmtree(workdir, ignore_errors=True)
