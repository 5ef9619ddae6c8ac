"""Runs a built-in operation (copy/upload/delete) in a child process with the job's
limits, and finds it again after an agent restart.

pfcon runs these operations in op containers with the job's ``cpu_limit`` and
``memory_limit``; pfleet runs each in a worker process of its own session, forked
from a warm fork server (``agent.op_forkserver``: a few ms instead of ~0.1 s of CPU
for a new interpreter) or, when that is not available, started as
``python -m agent.op_worker``.  Either way the worker is limited like this:

* **memory**: ``RLIMIT_DATA`` of ``memory_limit`` MiB, set by the worker before it
  reads any operation data.  It bounds what the operation itself allocates (heap,
  buffers, thread stacks); beyond it an allocation fails and the op ends
  ``OOMKilled``, exit code 137, ``oom`` set; a limit smaller than the worker
  already is (about 40 MiB) is refused the same way at once.  The page cache of
  the files the operation moves is not counted: with a hard memory cgroup of 300
  MiB a copy of 1 GiB had to wait for its writes to reach the disk (1.7x ``cp``)
  and evicted most of ``incoming`` before the plugin could read it.  pfcon asks
  Docker for ``memory_limit`` only as a reservation for its op containers.  On
  cgroup v1 the worker's memory cgroup
  (``<memory mount>/<agent's cgroup>/pfleet/<leaf>``) gets that reservation as
  ``memory.soft_limit_in_bytes``, so under memory pressure its cache is reclaimed
  first; on v2 the leaf only accounts.  The leaf lives *under the agent's own
  cgroup*, so the agent's own limits still hold.
* **cpu**: a CFS quota of ``cpu_limit`` millicores (v1 ``cpu.cfs_quota_us`` /
  ``cpu.cfs_period_us``, v2 ``cpu.max``) when the cpu controller is usable,
  otherwise none (logged once).

A delete of a key dir of at most ``INLINE_DELETE_ENTRIES`` entries (zipfile mode's
usual job: a few inputs, a few outputs) is done by the agent itself, in a thread:
it costs a few syscalls, far less than the worker it would need (a fork, two
cgroups made and removed, a result file synced), and stays far below any limit.

Crash safety: the request (``request.json``), the worker's stderr and its result
(``result.json``, written atomically by the worker) live in
``<work_dir>/<job>.<attempt>/``.  The caller persists the :class:`ChildRef` (pid
and kernel start time, which guards against pid reuse) handed to ``on_started``
before anything is awaited; :meth:`OpRunner.run` given that ref after a restart
reports an existing result, waits for a live worker (polling ``/proc``), and
otherwise runs the operation again (operations are idempotent).  The worker also
holds ``worker.lock`` (flock) for its whole life, so a worker started just before
a crash, whose pid never got recorded, is waited for instead of doubled.

Under systemd the agent's unit needs ``KillMode=process`` (or ``mixed``) for a
worker to outlive an agent restart; otherwise it is killed with the agent and
simply run again.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import agent
from agent import op_worker
from agent.op_forkserver import ForkServer, ForkServerError
from agent.ops import small_delete
from agent.protocol import JobSpec

__all__ = ["OOM_EXIT_CODE", "ChildRef", "OpResult", "OpRunner",
           "detect_cgroups", "process_start_time", "set_cpu_quota", "set_memory_limit",
           "set_memory_reservation"]

log = logging.getLogger("pfleet.agent.op_runner")

OWN_CHILD_POLL_CAP = 0.02  # seconds between exit checks of a worker we started

MIB = 1024 * 1024
CPU_PERIOD_US = 100_000
MIN_CPU_QUOTA_US = 1_000
CGROUP_PARENT = "pfleet"
OOM_EXIT_CODE = 137
STDERR_TAIL_BYTES = 4000
RMDIR_TRIES = 40
INLINE_DELETE_ENTRIES = 64
LOCK_FILE = "worker.lock"
_SAFE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,100}")
# where the ``agent`` package is, for the worker's PYTHONPATH
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(agent.__file__)))
_CONTROLLERS = ("memory", "cpu")


@dataclass(frozen=True)
class ChildRef:
    """A worker process: its pid and kernel start time (``/proc/<pid>/stat``)."""

    pid: int
    start_time: int

    def to_dict(self) -> dict[str, int]:
        return {"pid": self.pid, "start_time": self.start_time}

    @classmethod
    def from_dict(cls, data: Any) -> ChildRef | None:
        if not isinstance(data, dict):
            return None
        try:
            return cls(int(data["pid"]), int(data["start_time"]))
        except (KeyError, TypeError, ValueError):
            return None


@dataclass(frozen=True)
class OpResult:
    exit_code: int
    log: str
    message: str
    oom: bool = False


_KILLED = OpResult(128 + signal.SIGKILL, "", "killed by the agent")


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of a process, None if none."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    try:
        fields = data[data.rindex(b")") + 2:].split()
        return fields[0].decode(), int(fields[19])
    except (ValueError, IndexError):
        return None


def process_start_time(pid: int) -> int | None:
    found = _proc_stat(pid)
    return found[1] if found else None


def _locked(path: Path) -> bool:
    """Whether a worker holds the attempt's lock file (it does for its whole life)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also releases the lock if we got it
    return False


def _alive(child: ChildRef) -> bool:
    """The same process (pid *and* start time) still exists and has not ended."""
    found = _proc_stat(child.pid)
    return found is not None and found[1] == child.start_time and found[0] not in ("Z", "X")


# ----------------------------------------------------------------- cgroups


@dataclass(frozen=True)
class _Hierarchy:
    version: int  # 1 or 2
    own: Path  # the agent's own cgroup directory in this hierarchy


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _inside(path: str, root: str) -> str | None:
    if path == root:
        return "."
    if root == "/":
        return path.lstrip("/")
    if path.startswith(root.rstrip("/") + "/"):
        return path[len(root.rstrip("/")) + 1:]
    return None


def detect_cgroups() -> dict[str, _Hierarchy]:
    """Where the agent's own memory and cpu cgroups are (v1 preferred per controller,
    as a hybrid system mounts each controller in one hierarchy only)."""
    v1_mounts: dict[str, tuple[str, str]] = {}
    v2_mount: tuple[str, str] | None = None
    try:
        mountinfo = Path("/proc/self/mountinfo").read_text().splitlines()
        membership = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return {}
    for line in mountinfo:
        left, sep, right = line.partition(" - ")
        lf, rf = left.split(), right.split()
        if not sep or len(lf) < 5 or len(rf) < 3:
            continue
        root, mountpoint = _unescape(lf[3]), _unescape(lf[4])
        if rf[0] == "cgroup":
            for ctrl in set(rf[2].split(",")) & set(_CONTROLLERS):
                v1_mounts.setdefault(ctrl, (mountpoint, root))
        elif rf[0] == "cgroup2" and v2_mount is None:
            v2_mount = (mountpoint, root)
    v1_paths: dict[str, str] = {}
    v2_path: str | None = None
    for line in membership:
        hid, _, rest = line.partition(":")
        ctrls, _, path = rest.partition(":")
        if hid == "0" and ctrls == "":
            v2_path = path
        for ctrl in ctrls.split(","):
            v1_paths[ctrl] = path
    found: dict[str, _Hierarchy] = {}
    for ctrl in _CONTROLLERS:
        if ctrl in v1_mounts and ctrl in v1_paths:
            mountpoint, root = v1_mounts[ctrl]
            rel = _inside(v1_paths[ctrl], root)
            if rel is not None:
                found[ctrl] = _Hierarchy(1, Path(mountpoint) / rel)
        elif v2_mount is not None and v2_path is not None:
            rel = _inside(v2_path, v2_mount[1])
            if rel is None:
                continue
            own = Path(v2_mount[0]) / rel
            try:
                available = (own / "cgroup.controllers").read_text().split()
            except OSError:
                continue
            if ctrl in available:
                found[ctrl] = _Hierarchy(2, own)
    return found


def _write(path: Path, value: str) -> None:
    with open(path, "w") as fh:
        fh.write(value)


def _enable_v2(directory: Path, ctrl: str) -> None:
    if ctrl not in (directory / "cgroup.subtree_control").read_text().split():
        _write(directory / "cgroup.subtree_control", f"+{ctrl}")


def set_memory_limit(leaf: Path, version: int, limit: int) -> None:
    """A hard memory limit, swap included where the kernel accounts it."""
    if version == 1:
        memsw = leaf / "memory.memsw.limit_in_bytes"
        if memsw.exists():  # lift it first: it may never be below the memory limit
            with contextlib.suppress(OSError):
                _write(memsw, "-1")
        _write(leaf / "memory.limit_in_bytes", str(limit))
        if memsw.exists():
            with contextlib.suppress(OSError):
                _write(memsw, str(limit))
    else:
        _write(leaf / "memory.max", str(limit))
        with contextlib.suppress(OSError):
            _write(leaf / "memory.swap.max", "0")


def set_memory_reservation(leaf: Path, version: int, limit: int) -> None:
    """What the operation's cache should be reclaimed down to first under memory
    pressure (cgroup v1 soft limit; v2 has no such knob and only accounts)."""
    if version == 1:
        _write(leaf / "memory.soft_limit_in_bytes", str(limit))


def set_cpu_quota(leaf: Path, version: int, millicores: int) -> None:
    """A CFS quota of ``millicores`` (1000 = one CPU)."""
    quota = max(MIN_CPU_QUOTA_US, millicores * CPU_PERIOD_US // 1000)
    if version == 1:
        _write(leaf / "cpu.cfs_period_us", str(CPU_PERIOD_US))
        _write(leaf / "cpu.cfs_quota_us", str(quota))
    else:
        _write(leaf / "cpu.max", f"{quota} {CPU_PERIOD_US}")


def _oom_kills(leaf: Path, version: int) -> int | None:
    name = "memory.oom_control" if version == 1 else "memory.events"
    try:
        lines = (leaf / name).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            with contextlib.suppress(ValueError):
                return int(value)
    return None


# ------------------------------------------------------------------ runner


@dataclass
class _Limits:
    cgroup_procs: list[str]
    memory: int | None  # RLIMIT_DATA, bytes


class OpRunner:
    """Starts operation workers, waits for them, and re-attaches after a restart.

    ``work_dir`` holds one directory per attempt (kept until :meth:`forget`);
    ``use_cgroups=False`` runs them without cgroups (no CPU limit); ``enforce_limits=False``
    runs operations unlimited (the agent's ``IGNORE_LIMITS``).  Workers are forked
    from a warm fork server (``agent.op_forkserver``) unless ``fork_server=False``
    or it cannot run; then each is a new ``python -m agent.op_worker``.
    """

    def __init__(self, work_dir: Path, storebase: Path, *, use_cgroups: bool = True,
                 enforce_limits: bool = True, poll_interval: float = 0.25,
                 python: str | None = None, fork_server: bool = True) -> None:
        self.work_dir = work_dir
        self.storebase = storebase
        self.use_cgroups = use_cgroups
        self.enforce_limits = enforce_limits
        self.poll_interval = poll_interval
        self.python = python or sys.executable
        self.namespace = hashlib.sha256(
            os.fsencode(os.path.abspath(work_dir))).hexdigest()[:10]
        self._hierarchies: dict[str, _Hierarchy] | None = None
        self._procs: dict[tuple[str, int], subprocess.Popen[bytes]] = {}
        self._forked: dict[tuple[str, int], int] = {}  # live workers from the fork server
        self._forks = ForkServer(self.python, self._worker_env()) if fork_server else None
        self._killed: set[tuple[str, int]] = set()
        self._warned: set[str] = set()

    # --------------------------------------------------------------- naming

    @staticmethod
    def _job_name(spec: JobSpec) -> str:
        job = spec.job if _SAFE_NAME.fullmatch(spec.job) and spec.job[0] != "." else \
            hashlib.sha256(spec.job.encode()).hexdigest()[:32]
        return f"{job}.{spec.attempt}"

    def op_dir(self, spec: JobSpec) -> Path:
        return self.work_dir / self._job_name(spec)

    def _leaf_name(self, spec: JobSpec) -> str:
        return f"{self.namespace}-{self._job_name(spec)}"

    def hierarchies(self) -> dict[str, _Hierarchy]:
        if self._hierarchies is None:
            self._hierarchies = detect_cgroups() if self.use_cgroups else {}
        return self._hierarchies

    def cgroup_dir(self, spec: JobSpec, ctrl: str) -> Path | None:
        """Where an op's cgroup for ``ctrl`` ("memory" or "cpu") is, if cgroups are used."""
        h = self.hierarchies().get(ctrl)
        return h.own / CGROUP_PARENT / self._leaf_name(spec) if h else None

    def _warn_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, *args)

    # ------------------------------------------------------------------ API

    async def run(self, spec: JobSpec, *, child: ChildRef | None = None,
                  on_started: Callable[[ChildRef], None] | None = None) -> OpResult:
        """Run ``spec.op`` to its end (or resume it) and return what happened.

        ``child`` is the worker recorded before a restart, if any: its result is
        reported when it exists, a live worker is waited for, and otherwise the
        operation runs again.  ``on_started`` gets a new worker's :class:`ChildRef`
        before anything is awaited, to be persisted.  Raises ``OSError`` when the
        worker cannot be started at all.  Cancelling leaves the worker running.
        """
        if spec.op is None:
            raise ValueError(f"{spec.name} is not a built-in operation")
        work = self.op_dir(spec)
        if child is None and not work.exists():  # no worker was ever started for it
            if (spec.job, spec.attempt) in self._killed:
                return _KILLED
            done_here = await asyncio.to_thread(self._delete_here, spec)
            if done_here is not None:
                return done_here
        work.mkdir(parents=True, exist_ok=True)
        result = self._read_result(work)
        if result is None and child is not None:
            if _alive(child):
                log.info("re-attached to operation worker jid=%s name=%s pid=%s", spec.jid,
                         spec.name, child.pid)
                await self._wait_foreign(child)
                result = self._read_result(work)
            if result is None and (spec.job, spec.attempt) in self._killed:
                result = _KILLED
            if result is None and self._oom_evidence(spec):
                result = self._oom_result(spec)
            if result is None:
                log.warning("operation worker ended without a result, running it again "
                            "jid=%s name=%s pid=%s", spec.jid, spec.name, child.pid)
        if result is None and _locked(work / LOCK_FILE):
            # a worker started just before a crash, before its pid was recorded
            log.warning("an unrecorded operation worker is running, waiting for it jid=%s "
                        "name=%s", spec.jid, spec.name)
            delay = 0.01
            while _locked(work / LOCK_FILE):
                await asyncio.sleep(delay)
                delay = min(delay * 1.5, self.poll_interval)
            result = self._read_result(work)
        if result is not None:
            await self._remove_cgroups(spec)
            return result
        return await self._start_and_wait(spec, work, on_started)

    def kill(self, spec: JobSpec, child: ChildRef | None = None) -> None:
        """Kill the worker of an attempt (ours, or the recorded one if still the same)."""
        key = (spec.job, spec.attempt)
        self._killed.add(key)
        proc = self._procs.get(key)
        forked = self._forked.get(key)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            elif forked is not None:  # not yet reaped by the fork server: still that process
                os.killpg(forked, signal.SIGKILL)
            elif child is not None and _alive(child):
                os.kill(child.pid, signal.SIGKILL)
            else:
                return
            log.info("killed operation worker jid=%s name=%s", spec.jid, spec.name)

    @property
    def fork_server_pid(self) -> int | None:
        return self._forks.pid if self._forks is not None else None

    async def close(self) -> None:
        """Stop the fork server (running workers carry on)."""
        if self._forks is not None:
            await self._forks.close()

    def forget(self, spec: JobSpec) -> None:
        """Drop an attempt's files once its final event is safely in the outbox."""
        self._killed.discard((spec.job, spec.attempt))
        shutil.rmtree(self.op_dir(spec), ignore_errors=True)

    def prune(self, keep: Iterable[JobSpec]) -> None:
        """Remove work dirs and empty cgroups of attempts that are no longer tracked."""
        names = {self._job_name(s) for s in keep}
        with contextlib.suppress(FileNotFoundError):
            for path in self.work_dir.iterdir():
                if path.name not in names and path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
        leaves = {f"{self.namespace}-{n}" for n in names}
        for h in self.hierarchies().values():
            with contextlib.suppress(OSError):
                for path in (h.own / CGROUP_PARENT).iterdir():
                    if (path.name.startswith(f"{self.namespace}-") and path.name not in leaves
                            and path.is_dir()):
                        with contextlib.suppress(OSError):
                            path.rmdir()

    def describe_limits(self) -> str:
        if not self.enforce_limits:
            return "memory=none cpu=none (limits ignored)"
        h = self.hierarchies()
        memory = "RLIMIT_DATA"
        if "memory" in h and h["memory"].version == 1:
            memory += " + cgroup v1 soft limit"
        cpu = f"cgroup v{h['cpu'].version}" if "cpu" in h else "none"
        return f"memory={memory} cpu={cpu}"

    # ------------------------------------------------------------- internals

    def _delete_here(self, spec: JobSpec) -> OpResult | None:
        """Run a small delete in this thread; None when it is not one."""
        if not small_delete(spec.op, self.storebase, INLINE_DELETE_ENTRIES):
            return None
        result = op_worker.run({"op": spec.op, "storebase": os.fspath(self.storebase)})
        log.info("operation done in the agent jid=%s name=%s exit_code=%s", spec.jid,
                 spec.name, result["exit_code"])
        return OpResult(int(result["exit_code"]), str(result["log"]), str(result["message"]),
                        bool(result["oom"]))

    async def _start_and_wait(self, spec: JobSpec, work: Path,
                              on_started: Callable[[ChildRef], None] | None) -> OpResult:
        key = (spec.job, spec.attempt)
        if key in self._killed:
            return _KILLED  # killed before it even started
        for name in ("result.json", "result.json.tmp", "stderr.log"):
            (work / name).unlink(missing_ok=True)
        await self._remove_cgroups(spec)  # fresh counters: a leftover may hold old OOM kills
        limits = self._prepare_limits(spec)
        request_path = self._write_request(spec, work, limits)
        pid = await self._fork(work, request_path)
        proc = None
        if pid is None:
            proc = self._launch(work, request_path, limits)
            self._procs[key] = proc
            pid = proc.pid
        else:
            self._forked[key] = pid
        self._attach(pid, limits)
        ref = ChildRef(pid, process_start_time(pid) or 0)
        log.info("operation started jid=%s name=%s pid=%s cpu=%sm memory=%sMiB limits=%s",
                 spec.jid, spec.name, pid, spec.cpu_limit, spec.memory_limit,
                 "cgroup" if limits.cgroup_procs else "rlimit")
        try:
            if on_started is not None:
                on_started(ref)
        except BaseException:
            self.kill(spec)
            raise
        if proc is not None:
            code: int | None = await self._wait_own(proc)
            self._procs.pop(key, None)
        else:
            assert self._forks is not None
            try:
                code = await self._forks.exited(pid)
            finally:
                self._forked.pop(key, None)
                self._forks.release(pid)
            if code is None:  # the fork server went away first
                await self._wait_foreign(ref)
        result = self._read_result(work) or self._from_exit(spec, work, code)
        await self._remove_cgroups(spec)
        return result

    async def _wait_own(self, proc: subprocess.Popen[bytes]) -> int:
        delay = 0.01
        while (code := proc.poll()) is None:
            await asyncio.sleep(delay)
            # Our own child: a 20 ms cap costs a syscall per tick and noticed the end
            # 0.1-0.25 s sooner than the general poll interval did (storage bench).
            delay = min(delay * 1.5, OWN_CHILD_POLL_CAP, self.poll_interval)
        return code

    def _write_request(self, spec: JobSpec, work: Path, limits: _Limits) -> Path:
        request = {"op": spec.op, "storebase": os.fspath(self.storebase), "jid": spec.jid,
                   "job": spec.job, "attempt": spec.attempt,
                   "lock": os.fspath(work / LOCK_FILE),
                   "limits": {"cgroup_procs": limits.cgroup_procs,
                              "memory": limits.memory}}
        request_path = work / "request.json"
        fd = os.open(request_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(request, fh)
        return request_path

    @staticmethod
    def _worker_env() -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH"))
                                            if p)
        # malloc arenas reserve address space per thread, which RLIMIT_AS counts; a
        # forked worker keeps the server's malloc settings, so every worker gets this
        env["MALLOC_ARENA_MAX"] = "2"
        return env

    async def _fork(self, work: Path, request_path: Path) -> int | None:
        """A worker forked by the fork server, or None when it is not available."""
        if self._forks is None:
            return None
        try:
            return await self._forks.spawn(os.fspath(request_path),
                                           os.fspath(work / "result.json"),
                                           os.fspath(work / "stderr.log"))
        except ForkServerError as exc:
            self._warn_once("forkserver", "operation fork server unavailable, starting "
                            "each operation as a new process error=%s", exc)
            return None

    def _launch(self, work: Path, request_path: Path,
                limits: _Limits) -> subprocess.Popen[bytes]:
        """Start the worker as a new process in its own session (fast, no waiting)."""
        with open(work / "stderr.log", "wb") as err:
            return subprocess.Popen(
                [self.python, "-m", "agent.op_worker", os.fspath(request_path),
                 os.fspath(work / "result.json")],
                stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=self._worker_env(),
                start_new_session=True, close_fds=True)

    def _prepare_limits(self, spec: JobSpec) -> _Limits:
        """Create the op's cgroups (best effort) and say how it will be limited.

        A limit of 0 (or less) means none, as for containers."""
        if not self.enforce_limits:
            return _Limits([], None)
        hierarchies = self.hierarchies()
        procs: list[str] = []
        if spec.memory_limit > 0 and "memory" in hierarchies:
            try:
                leaf = self._make_leaf(hierarchies["memory"], spec, "memory")
                set_memory_reservation(leaf, hierarchies["memory"].version,
                                       spec.memory_limit * MIB)
                procs.append(os.fspath(leaf / "cgroup.procs"))
            except OSError as exc:
                self._warn_once("memory", "no memory cgroup for operations (their cache is "
                                "not reserved) error=%s", exc)
        if spec.cpu_limit > 0 and "cpu" in hierarchies:
            try:
                leaf = self._make_leaf(hierarchies["cpu"], spec, "cpu")
                set_cpu_quota(leaf, hierarchies["cpu"].version, spec.cpu_limit)
                if os.fspath(leaf / "cgroup.procs") not in procs:
                    procs.append(os.fspath(leaf / "cgroup.procs"))
            except OSError as exc:
                self._warn_once("cpu", "no cpu cgroup for operations, they run without a "
                                "CPU limit error=%s", exc)
        elif spec.cpu_limit > 0:
            self._warn_once("cpu", "no usable cpu cgroup, operations run without a CPU limit")
        memory = spec.memory_limit * MIB if spec.memory_limit > 0 else None
        return _Limits(procs, memory)

    def _make_leaf(self, h: _Hierarchy, spec: JobSpec, ctrl: str) -> Path:
        parent = h.own / CGROUP_PARENT
        if h.version == 2:
            _enable_v2(h.own, ctrl)
        parent.mkdir(exist_ok=True)
        if h.version == 2:
            _enable_v2(parent, ctrl)
        leaf = parent / self._leaf_name(spec)
        leaf.mkdir(exist_ok=True)
        return leaf

    def _attach(self, pid: int, limits: _Limits) -> None:
        """Put a fresh worker in its cgroups at once (it also does so itself, and sets
        its memory limit before it reads any operation data)."""
        for procs in limits.cgroup_procs:
            try:
                _write(Path(procs), str(pid))
            except ProcessLookupError:
                return  # already gone
            except OSError as exc:
                log.warning("could not move operation worker into its cgroup pid=%s "
                            "error=%s", pid, exc)

    async def _wait_foreign(self, child: ChildRef) -> None:
        """Wait for a worker that is not our child (started before a restart)."""
        delay = 0.01
        while _alive(child):
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, self.poll_interval)

    @staticmethod
    def _read_result(work: Path) -> OpResult | None:
        try:
            data = json.loads((work / "result.json").read_text())
            return OpResult(int(data["exit_code"]), str(data.get("log", "")),
                            str(data.get("message", "")), bool(data.get("oom", False)))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _oom_evidence(self, spec: JobSpec) -> bool:
        h = self.hierarchies().get("memory")
        leaf = self.cgroup_dir(spec, "memory")
        if h is None or leaf is None:
            return False
        return (_oom_kills(leaf, h.version) or 0) > 0

    @staticmethod
    def _oom_result(spec: JobSpec) -> OpResult:
        return OpResult(OOM_EXIT_CODE, "the operation was killed by the kernel's OOM killer "
                        f"(memory_limit {spec.memory_limit} MiB)\n", "OOMKilled", True)

    def _from_exit(self, spec: JobSpec, work: Path, code: int | None) -> OpResult:
        """What happened to a worker that ended without writing a result (``code``
        None: its exit status is not known)."""
        try:
            with open(work / "stderr.log", "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - STDERR_TAIL_BYTES))
                tail = fh.read().decode("utf-8", "replace")
        except OSError:
            tail = ""
        last = tail.strip().splitlines()[-1] if tail.strip() else ""
        if (spec.job, spec.attempt) in self._killed:
            return OpResult(_KILLED.exit_code, tail, _KILLED.message)
        if code is None:
            if self._oom_evidence(spec):
                return self._oom_result(spec)
            return OpResult(1, tail, "operation worker ended without a result"
                            + (f": {last[:300]}" if last else ""))
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return OpResult(128 - code, tail, f"operation worker killed by {name}")
        return OpResult(code or 1, tail, f"operation worker crashed (exit {code})"
                        + (f": {last[:300]}" if last else ""))

    async def _remove_cgroups(self, spec: JobSpec) -> None:
        leaves = {d for c in _CONTROLLERS if (d := self.cgroup_dir(spec, c)) is not None}
        for leaf in leaves:
            for _ in range(RMDIR_TRIES):
                try:
                    leaf.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    await asyncio.sleep(0.05)  # the dead worker is still leaving it
            else:
                log.warning("could not remove cgroup of operation jid=%s name=%s path=%s",
                            spec.jid, spec.name, leaf)
