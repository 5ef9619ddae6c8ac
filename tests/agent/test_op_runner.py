"""Operations run in a child process with the job's limits (agent.op_runner), and the
supervisor reports them like containers, across a ``kill -9`` of the agent.

Everything is real: worker processes, cgroups when this host lets the agent create
them (tests needing them are skipped otherwise), ``/proc``.  A worker that a test
must catch alive is frozen with SIGSTOP from ``on_started`` (called before the
runner waits), so nothing depends on how fast the machine is.  Every process a
test starts is killed by PID in teardown.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import protocol as p
from agent.op_runner import (
    INLINE_DELETE_ENTRIES,
    ChildRef,
    OpResult,
    OpRunner,
    process_start_time,
)
from agent.outbox import Outbox
from agent.runtimes.fake import FakeRuntime
from agent.supervisor import Supervisor

MiB = 1 << 20
DATA = "home/alice/feeds/feed_1/pl-dircopy_1/data"
OUTPUT = "home/alice/feeds/feed_1/pl-app_2/data"
WAIT = 20.0


def copy_spec(job: str = "job1", *, attempt: int = 1, memory: int = 300, cpu: int = 1000,
              input_dirs: tuple[str, ...] = (DATA,), output_dir: str = OUTPUT) -> p.JobSpec:
    op = {"op": "copy", "storage": "fslink", "key_dir": "key-jid1",
          "input_dirs": list(input_dirs), "output_dir": output_dir}
    return p.JobSpec(job=job, attempt=attempt, name="jid1-copy", jid="jid1", kind="copy",
                     image="", command=[], cpu_limit=cpu, memory_limit=memory, op=op)


def make_tree(sb: Path, files: int = 20) -> None:
    for i in range(files):
        path = sb / DATA / f"d{i % 10}" / f"f{i}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{i}\n")


def incoming_files(sb: Path) -> int:
    return sum(1 for q in (sb / "key-jid1" / "incoming").rglob("*") if q.is_file())


class Pids:
    """Processes started by a test, killed by PID (and start time) in teardown."""

    def __init__(self) -> None:
        self.refs: list[ChildRef] = []
        self.popens: list[subprocess.Popen[bytes]] = []

    def add(self, ref: ChildRef) -> None:
        self.refs.append(ref)

    def stop(self) -> None:
        for proc in self.popens:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        for ref in self.refs:
            if process_start_time(ref.pid) == ref.start_time:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(ref.pid, signal.SIGKILL)
                    os.kill(ref.pid, signal.SIGCONT)


@pytest.fixture
def pids() -> Iterator[Pids]:
    tracker = Pids()
    yield tracker
    tracker.stop()


@pytest.fixture
def sb(tmp_path: Path) -> Path:
    root = tmp_path / "storeBase"
    root.mkdir()
    make_tree(root)
    return root


@pytest.fixture
def big_sb(tmp_path: Path) -> Iterator[Path]:
    """3000 files, so that a worker is caught long before it ends; on tmpfs when there
    is one, so the test does not wait for a busy disk."""
    base = Path("/dev/shm")
    parent = Path(tempfile.mkdtemp(prefix="pfleet-test-", dir=base)) \
        if base.is_dir() and os.access(base, os.W_OK) else tmp_path
    root = parent / "storeBase"
    make_tree(root, 3000)
    try:
        yield root
    finally:
        if parent != tmp_path:
            shutil.rmtree(parent, ignore_errors=True)


@pytest.fixture
async def make_runner() -> AsyncIterator[Callable[..., OpRunner]]:
    """OpRunners that are closed (their fork server stopped) when the test ends."""
    made: list[OpRunner] = []

    def make(*args: Any, **kwargs: Any) -> OpRunner:
        made.append(OpRunner(*args, **kwargs))
        return made[-1]

    yield make
    for r in made:
        await r.close()


@pytest.fixture(params=[True, False], ids=["forked", "spawned"])
def runner(request: pytest.FixtureRequest, tmp_path: Path, sb: Path,
           make_runner: Callable[..., OpRunner]) -> Iterator[OpRunner]:
    """Workers forked by the fork server, and started as new processes (its fallback)."""
    r = make_runner(tmp_path / "state" / "ops", sb, poll_interval=0.05,
                    fork_server=request.param)
    yield r
    r.prune([])  # leftover cgroups of a failed test


def cgroups_usable(runner: OpRunner) -> bool:
    h = runner.hierarchies()
    if "memory" not in h or "cpu" not in h:
        return False
    try:
        for ctrl in ("memory", "cpu"):
            (h[ctrl].own / "pfleet").mkdir(exist_ok=True)
    except OSError:
        return False
    return True


def needs_cgroups(runner: OpRunner) -> None:
    if not cgroups_usable(runner):
        pytest.skip("this host does not let the agent create memory and cpu cgroups")


def proc_file(pid: int, name: str) -> str:
    return Path(f"/proc/{pid}/{name}").read_text()


def start_script(script: str, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", script, *args])


def alive(ref: ChildRef) -> bool:
    stat = Path(f"/proc/{ref.pid}/stat")
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return int(fields[19]) == ref.start_time and fields[0] not in ("Z", "X")


def freeze(pids: Pids, seen: list[ChildRef]):  # type: ignore[no-untyped-def]
    """An on_started callback that stops the worker before it does anything."""
    def started(ref: ChildRef) -> None:
        os.kill(ref.pid, signal.SIGSTOP)
        pids.add(ref)
        seen.append(ref)
    return started


async def until(predicate: Any, what: str, seconds: float = WAIT) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


# ---------------------------------------------------------------- the runner


async def test_a_copy_runs_in_its_own_process_and_session(runner: OpRunner, sb: Path,
                                                          pids: Pids) -> None:
    seen: list[ChildRef] = []
    task = asyncio.create_task(runner.run(copy_spec(), on_started=freeze(pids, seen)))
    await until(lambda: seen, "the worker to start")
    ref = seen[0]
    assert ref.pid != os.getpid()
    assert os.getsid(ref.pid) == ref.pid  # its own session: a signal to the agent's group
    assert process_start_time(ref.pid) == ref.start_time
    request = json.loads((runner.op_dir(copy_spec()) / "request.json").read_text())
    assert request["op"]["op"] == "copy" and request["storebase"] == str(sb)
    os.kill(ref.pid, signal.SIGCONT)
    result = await asyncio.wait_for(task, WAIT)
    assert result == OpResult(0, "copied 20 files (0.0 MiB) from 1 input dirs\n", "", False)
    assert incoming_files(sb) == 20
    runner.forget(copy_spec())
    assert not runner.op_dir(copy_spec()).exists()


async def test_cgroup_limits_are_set_and_removed(runner: OpRunner, pids: Pids) -> None:
    needs_cgroups(runner)
    spec = copy_spec(memory=200, cpu=500)
    seen: list[ChildRef] = []
    task = asyncio.create_task(runner.run(spec, on_started=freeze(pids, seen)))
    await until(lambda: seen, "the worker to start")
    memory, cpu = runner.cgroup_dir(spec, "memory"), runner.cgroup_dir(spec, "cpu")
    assert memory is not None and cpu is not None
    membership = proc_file(seen[0].pid, "cgroup")
    assert f"/pfleet/{memory.name}\n" in membership
    assert runner.hierarchies()["memory"].version in (1, 2)
    if runner.hierarchies()["memory"].version == 1:
        # the page cache is reserved, not capped: the cap is on the worker's own memory
        assert int((memory / "memory.soft_limit_in_bytes").read_text()) == 200 * MiB
        assert int((memory / "memory.limit_in_bytes").read_text()) > 1 << 40
        assert int((cpu / "cpu.cfs_quota_us").read_text()) == 50_000
        assert int((cpu / "cpu.cfs_period_us").read_text()) == 100_000
    else:
        assert (memory / "memory.max").read_text().strip() == "max"
        assert (cpu / "cpu.max").read_text().split() == ["50000", "100000"]
    assert str(seen[0].pid) in (memory / "cgroup.procs").read_text().split()
    os.kill(seen[0].pid, signal.SIGCONT)
    result = await asyncio.wait_for(task, WAIT)
    assert result.exit_code == 0, result
    assert "memory limit 200 MiB (RLIMIT_DATA)" in worker_log(runner, spec)
    assert not memory.exists() and not cpu.exists()


def worker_log(runner: OpRunner, spec: p.JobSpec) -> str:
    return (runner.op_dir(spec) / "stderr.log").read_text()


@pytest.mark.parametrize("use_cgroups", [True, False])
async def test_a_limit_below_the_worker_itself_is_refused_at_once(
        tmp_path: Path, sb: Path, use_cgroups: bool,
        make_runner: Callable[..., OpRunner]) -> None:
    runner = make_runner(tmp_path / "ops", sb, use_cgroups=use_cgroups, poll_interval=0.05)
    spec = copy_spec(memory=1)
    result = await asyncio.wait_for(runner.run(spec), WAIT)
    assert (result.exit_code, result.oom, result.message) == (137, True, "OOMKilled")
    assert "more than its memory limit of 1 MiB" in result.log, result.log
    assert incoming_files(sb) == 0  # refused before it copied anything
    memory = runner.cgroup_dir(spec, "memory")
    assert memory is None or not memory.exists()


@pytest.mark.parametrize("use_cgroups", [True, False])
async def test_the_worker_runs_under_its_memory_limit(
        tmp_path: Path, sb: Path, use_cgroups: bool,
        make_runner: Callable[..., OpRunner]) -> None:
    runner = make_runner(tmp_path / "ops", sb, use_cgroups=use_cgroups, poll_interval=0.05)
    assert runner.describe_limits().startswith("memory=RLIMIT_DATA")
    spec = copy_spec(memory=700)
    result = await asyncio.wait_for(runner.run(spec), WAIT)
    assert result.exit_code == 0, result
    assert "memory limit 700 MiB (RLIMIT_DATA)" in worker_log(runner, spec)


def test_an_operation_that_outgrows_its_limit_ends_oomkilled(tmp_path: Path) -> None:
    """The kernel refuses the allocation, and the worker says so in its result."""
    request, result = tmp_path / "request.json", tmp_path / "result.json"
    request.write_text(json.dumps({"op": {}, "storebase": str(tmp_path), "jid": "j",
                                   "limits": {"memory": 200 * MiB}}))
    script = textwrap.dedent("""
        import sys
        import agent.ops
        from agent import op_worker

        def greedy(op, storebase):
            return str(len(bytearray(400 << 20)))  # twice the limit

        agent.ops.run_op = greedy
        sys.exit(op_worker.main(["op_worker", sys.argv[1], sys.argv[2]]))
    """)
    proc = subprocess.run([sys.executable, "-c", script, str(request), str(result)],
                          capture_output=True, timeout=WAIT, check=False)
    assert proc.returncode == 137, proc.stderr
    data = json.loads(result.read_text())
    assert (data["exit_code"], data["message"], data["oom"]) == (137, "OOMKilled", True)
    assert data["log"] == ("the operation needed more memory than its memory limit "
                           "of 200 MiB\n")


@pytest.mark.parametrize(("enforce", "memory", "cpu"), [(False, 300, 1000), (True, 0, 0)])
async def test_ignored_or_zero_limits_leave_the_worker_unlimited(
        tmp_path: Path, sb: Path, pids: Pids, enforce: bool, memory: int, cpu: int,
        make_runner: Callable[..., OpRunner]) -> None:
    runner = make_runner(tmp_path / "ops", sb, enforce_limits=enforce, poll_interval=0.05)
    seen: list[ChildRef] = []
    spec = copy_spec(memory=memory, cpu=cpu)
    task = asyncio.create_task(runner.run(spec, on_started=freeze(pids, seen)))
    await until(lambda: seen, "the worker to start")
    assert "/pfleet/" not in proc_file(seen[0].pid, "cgroup")
    os.kill(seen[0].pid, signal.SIGCONT)
    result = await asyncio.wait_for(task, WAIT)
    assert result.exit_code == 0, result
    assert "memory limit none" in worker_log(runner, spec)


async def test_a_failing_operation_reports_its_message(runner: OpRunner, sb: Path) -> None:
    (sb / DATA / "evil.chrislink").write_text("home/alice")
    result = await asyncio.wait_for(runner.run(copy_spec()), WAIT)
    assert result.exit_code == 1 and not result.oom
    assert result.message == (
        f"ChRIS link '{DATA}/evil.chrislink' points to 'home/alice', which is the job's "
        f"output dir or one of its ancestors ('{OUTPUT}')")
    assert result.log == result.message + "\n"


def delete_spec(key_dir: str = "key-jid1") -> p.JobSpec:
    return p.JobSpec(job="job-d", attempt=1, name="jid1-delete", jid="jid1", kind="delete",
                     image="", command=[], cpu_limit=1000, memory_limit=300,
                     op={"op": "delete", "key_dir": key_dir})


def fill_key_dir(sb: Path, files: int) -> None:
    for i in range(files):
        path = sb / "key-jid1" / ("incoming" if i % 2 else "outgoing") / f"f{i}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")


async def test_a_small_delete_is_done_by_the_agent_without_a_worker(runner: OpRunner,
                                                                     sb: Path) -> None:
    fill_key_dir(sb, INLINE_DELETE_ENTRIES - 3)  # + 2 dirs + the link: exactly at the bound
    (sb / "key-jid1" / "to-data").symlink_to(sb / DATA)  # counted once, never followed
    started: list[ChildRef] = []
    result = await asyncio.wait_for(runner.run(delete_spec(), on_started=started.append), WAIT)
    assert result == OpResult(0, "deleted key-jid1\n", "")
    assert started == [] and not runner.op_dir(delete_spec()).exists()
    assert not (sb / "key-jid1").exists() and incoming_files(sb) == 0
    assert sum(1 for q in (sb / DATA).rglob("*") if q.is_file()) == 20  # the link's target


async def test_a_larger_delete_runs_in_a_limited_worker(runner: OpRunner, sb: Path,
                                                        pids: Pids) -> None:
    fill_key_dir(sb, INLINE_DELETE_ENTRIES)
    started: list[ChildRef] = []

    def on_started(ref: ChildRef) -> None:
        pids.add(ref)
        started.append(ref)

    result = await asyncio.wait_for(runner.run(delete_spec(), on_started=on_started), WAIT)
    assert result.exit_code == 0 and result.log == "deleted key-jid1\n"
    assert len(started) == 1 and not (sb / "key-jid1").exists()


async def test_a_small_delete_reports_a_refusal_like_a_worker(runner: OpRunner, sb: Path,
                                                              tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (sb / "key-jid1").symlink_to(tmp_path / "elsewhere")
    started: list[ChildRef] = []
    result = await asyncio.wait_for(runner.run(delete_spec(), on_started=started.append), WAIT)
    message = "refusing to delete 'key-jid1': it is a symbolic link"
    assert result == OpResult(1, message + "\n", message) and started == []
    assert (tmp_path / "elsewhere").is_dir()


async def test_a_worker_killed_by_a_signal_reports_it(runner: OpRunner, pids: Pids) -> None:
    def started(ref: ChildRef) -> None:
        pids.add(ref)
        os.kill(ref.pid, signal.SIGTERM)

    result = await asyncio.wait_for(runner.run(copy_spec(), on_started=started), WAIT)
    assert (result.exit_code, result.oom) == (143, False)
    assert result.message == "operation worker killed by SIGTERM"


async def test_kill_stops_a_running_worker(runner: OpRunner, pids: Pids) -> None:
    seen: list[ChildRef] = []
    spec = copy_spec()
    task = asyncio.create_task(runner.run(spec, on_started=freeze(pids, seen)))
    await until(lambda: seen, "the worker to start")
    runner.kill(spec)
    result = await asyncio.wait_for(task, WAIT)
    assert (result.exit_code, result.message) == (137, "killed by the agent")
    assert not alive(seen[0])


def parent_pid(pid: int) -> int:
    stat = proc_file(pid, "stat")
    return int(stat[stat.rindex(")") + 2:].split()[1])


async def test_a_forked_worker_outlives_its_fork_server(
        tmp_path: Path, big_sb: Path, pids: Pids,
        make_runner: Callable[..., OpRunner]) -> None:
    runner = make_runner(tmp_path / "ops", big_sb, poll_interval=0.05)
    seen: list[ChildRef] = []
    task = asyncio.create_task(runner.run(copy_spec(), on_started=freeze(pids, seen)))
    await until(lambda: seen, "the worker to start")
    server = runner.fork_server_pid
    assert server is not None and parent_pid(seen[0].pid) == server
    os.kill(server, signal.SIGKILL)
    await until(lambda: runner.fork_server_pid is None, "the runner to notice")
    os.kill(seen[0].pid, signal.SIGCONT)
    result = await asyncio.wait_for(task, WAIT)
    assert result == OpResult(0, "copied 3000 files (0.0 MiB) from 1 input dirs\n", "", False)
    # the next operation gets a new fork server
    again: list[ChildRef] = []
    result = await asyncio.wait_for(runner.run(copy_spec("job2"), on_started=again.append),
                                    WAIT)
    assert result.exit_code == 0, result
    assert runner.fork_server_pid not in (None, server)
    assert parent_pid_or_none(again[0].pid) in (None, runner.fork_server_pid)


def parent_pid_or_none(pid: int) -> int | None:
    with contextlib.suppress(OSError):
        return parent_pid(pid)
    return None


# --------------------------------------------------------- after a restart


AGENT_SCRIPT = textwrap.dedent("""
    import asyncio, json, os, signal, sys
    from pathlib import Path
    from agent import protocol as p
    from agent.op_runner import OpRunner

    work, sb, spec_json, ref_file = sys.argv[1:5]
    spec = p.JobSpec.from_dict(json.loads(spec_json))

    def started(ref):
        os.kill(ref.pid, signal.SIGSTOP)  # caught alive, whatever the machine's speed
        tmp = ref_file + ".tmp"
        Path(tmp).write_text(json.dumps(ref.to_dict()))
        os.replace(tmp, ref_file)

    asyncio.run(OpRunner(Path(work), Path(sb)).run(spec, on_started=started))
""")


def spec_json(spec: p.JobSpec) -> str:
    return json.dumps(p.encode_dict(p.Run(spec=spec))["spec"])


async def test_a_new_runner_reattaches_to_a_live_worker_after_kill_9(
        tmp_path: Path, sb: Path, pids: Pids,
        make_runner: Callable[..., OpRunner]) -> None:
    work, ref_file = tmp_path / "state" / "ops", tmp_path / "ref.json"
    spec = copy_spec()
    agent_proc = start_script(AGENT_SCRIPT, str(work), str(sb), spec_json(spec), str(ref_file))
    pids.popens.append(agent_proc)
    await until(ref_file.exists, "the old agent to start its worker")
    ref = ChildRef.from_dict(json.loads(ref_file.read_text()))
    assert ref is not None
    pids.add(ref)
    server = parent_pid(ref.pid)  # the old agent's fork server
    assert proc_file(server, "cmdline").split("\0")[1:3] == ["-m", "agent.op_forkserver"]
    agent_proc.kill()  # kill -9 of the agent
    await until(lambda: agent_proc.poll() is not None, "the old agent to die")
    assert alive(ref), "the worker must outlive its agent"
    await until(lambda: not os.path.exists(f"/proc/{server}/cmdline")
                or "op_forkserver" not in proc_file(server, "cmdline"),
                "the fork server to leave with its agent")

    runner = make_runner(work, sb, poll_interval=0.05)
    started: list[ChildRef] = []
    task = asyncio.create_task(runner.run(spec, child=ref, on_started=started.append))
    await asyncio.sleep(0.5)
    assert not task.done(), "the new runner must wait for the live worker"
    os.kill(ref.pid, signal.SIGCONT)
    result = await asyncio.wait_for(task, WAIT)
    assert result == OpResult(0, "copied 20 files (0.0 MiB) from 1 input dirs\n", "", False)
    assert started == [], "the operation must not run twice"
    assert incoming_files(sb) == 20
    for ctrl in ("memory", "cpu"):
        leaf = runner.cgroup_dir(spec, ctrl)
        assert leaf is None or not leaf.exists()
    runner.prune([])


async def test_a_result_left_at_restart_is_reported_without_rerunning(
        tmp_path: Path, sb: Path, runner: OpRunner,
        make_runner: Callable[..., OpRunner]) -> None:
    spec = copy_spec()
    refs: list[ChildRef] = []
    first = await asyncio.wait_for(runner.run(spec, on_started=refs.append), WAIT)
    assert first.exit_code == 0
    (sb / "key-jid1").rename(tmp_path / "moved-away")  # a re-run would recreate it
    again = make_runner(runner.work_dir, sb)
    started: list[ChildRef] = []
    second = await asyncio.wait_for(again.run(spec, child=refs[0], on_started=started.append),
                                    WAIT)
    assert second == first
    assert started == []
    assert not (sb / "key-jid1").exists()


async def test_a_dead_worker_without_result_is_run_again(runner: OpRunner, sb: Path) -> None:
    # our own pid with another start time: a recycled pid must not pass for the worker
    stale = ChildRef(os.getpid(), (process_start_time(os.getpid()) or 0) + 1)
    started: list[ChildRef] = []
    result = await asyncio.wait_for(runner.run(copy_spec(), child=stale,
                                               on_started=started.append), WAIT)
    assert result.exit_code == 0
    assert len(started) == 1 and started[0].pid != os.getpid()
    assert incoming_files(sb) == 20


# --------------------------------------------------------------- supervisor


def outbox_events(directory: Path) -> list[p.Event]:
    return sorted(Outbox(directory).pending(), key=lambda e: e.seq)


async def wait_final(box: Outbox, job: str) -> p.Event:
    def final() -> p.Event | None:
        return next((e for e in box.pending() if e.job == job and e.state != "running"), None)

    await until(lambda: final() is not None, f"the final event of {job}")
    event = final()
    assert event is not None
    return event


async def test_the_supervisor_reports_an_op_like_a_container(tmp_path: Path, sb: Path) -> None:
    box = Outbox(tmp_path / "outbox")
    sup = Supervisor(FakeRuntime(), box, tmp_path / "state", sb)
    sup.op_runner.poll_interval = 0.05
    await sup.startup()
    try:
        await sup.run(copy_spec())
        final = await wait_final(box, "job1")
        (sb / DATA / "evil.chrislink").write_text(OUTPUT)
        await sup.run(copy_spec("job2"))
        failed = await wait_final(box, "job2")
    finally:
        await sup.close()
    states = [(e.job, e.state) for e in box.pending()]
    assert states == [("job1", "running"), ("job1", "exited"), ("job2", "running"),
                      ("job2", "exited")]
    assert (final.exit_code, final.oom, final.message) == (0, False, "")
    assert final.logs == "copied 20 files (0.0 MiB) from 1 input dirs\n"
    assert final.started_at and final.finished_at
    assert (failed.exit_code, failed.oom) == (1, False)
    assert failed.message.startswith(f"ChRIS link '{DATA}/evil.chrislink' points to")
    assert failed.logs == failed.message + "\n"
    assert sup.active == {}
    assert list((tmp_path / "state" / "jobs").iterdir()) == []
    assert list((tmp_path / "state" / "ops").iterdir()) == []


async def test_the_supervisor_reports_an_oom_killed_op(tmp_path: Path, sb: Path) -> None:
    box = Outbox(tmp_path / "outbox")
    sup = Supervisor(FakeRuntime(), box, tmp_path / "state", sb)
    needs_cgroups(sup.op_runner)
    await sup.startup()
    try:
        await sup.run(copy_spec(memory=1))
        final = await wait_final(box, "job1")
    finally:
        await sup.close()
    assert (final.state, final.exit_code, final.oom, final.message) == (
        "exited", 137, True, "OOMKilled")


SUPERVISOR_SCRIPT = textwrap.dedent("""
    import asyncio, json, sys
    from pathlib import Path
    from agent import protocol as p
    from agent.outbox import Outbox
    from agent.runtimes.fake import FakeRuntime
    from agent.supervisor import Supervisor

    state, sb, spec_json = sys.argv[1:4]

    async def main():
        sup = Supervisor(FakeRuntime(), Outbox(Path(state) / "outbox"), Path(state), Path(sb))
        await sup.startup()
        await sup.run(p.JobSpec.from_dict(json.loads(spec_json)))
        await asyncio.sleep(3600)

    asyncio.run(main())
""")


async def test_the_supervisor_finds_its_op_worker_after_kill_9(tmp_path: Path, big_sb: Path,
                                                               pids: Pids) -> None:
    sb = big_sb
    state = tmp_path / "state"
    spec = copy_spec()
    record = state / "jobs" / "job1.json"
    agent_proc = start_script(SUPERVISOR_SCRIPT, str(state), str(sb), spec_json(spec))
    pids.popens.append(agent_proc)

    ref = await recorded_worker(record)
    os.kill(ref.pid, signal.SIGSTOP)
    pids.add(ref)
    agent_proc.kill()
    await until(lambda: agent_proc.poll() is not None, "the old agent to die")
    assert alive(ref)

    box = Outbox(state / "outbox")
    assert [e.state for e in box.pending()] == ["running"]
    sup = Supervisor(FakeRuntime(), box, state, sb)
    sup.op_runner.poll_interval = 0.05
    await sup.startup()
    try:
        await asyncio.sleep(0.3)
        assert "job1" in sup.active and sup.active["job1"].op_child == ref
        os.kill(ref.pid, signal.SIGCONT)
        final = await wait_final(box, "job1")
    finally:
        await sup.close()
    assert [e.state for e in box.pending()] == ["running", "exited"]  # running only once
    assert (final.exit_code, final.logs) == (0, "copied 3000 files (0.0 MiB) from 1 input dirs\n")
    assert not record.exists()


def read_recorded(record: Path) -> ChildRef | None:
    with contextlib.suppress(OSError, ValueError):
        return ChildRef.from_dict(json.loads(record.read_text()).get("op_child"))
    return None


async def recorded_worker(record: Path) -> ChildRef:
    """The worker pid the supervisor persisted, as soon as it is there."""
    deadline = time.monotonic() + WAIT
    while True:
        ref = read_recorded(record)
        if ref is not None:
            return ref
        assert time.monotonic() < deadline, "the supervisor never recorded its worker"
        await asyncio.sleep(0.002)


@pytest.mark.parametrize("how", ["remove", "cancel"])
async def test_removing_or_cancelling_an_op_kills_its_worker(tmp_path: Path, big_sb: Path,
                                                             pids: Pids, how: str) -> None:
    sb = big_sb
    box = Outbox(tmp_path / "outbox")
    sup = Supervisor(FakeRuntime(), box, tmp_path / "state", sb)
    sup.op_runner.poll_interval = 0.05
    await sup.startup()
    try:
        await sup.run(copy_spec())
        ref = await recorded_worker(tmp_path / "state" / "jobs" / "job1.json")
        os.kill(ref.pid, signal.SIGSTOP)
        pids.add(ref)
        if how == "remove":
            await sup.remove("job1", 1, "jid1-copy")
            await until(lambda: not alive(ref), "the worker to die")
            await until(lambda: not list((tmp_path / "state" / "ops").iterdir()),
                        "the op's files to go")
            states = [(e.state, e.exit_code) for e in box.pending()]
            assert states == [("running", None), ("removed", None)]
        else:
            await sup.cancel("job1", 1)
            final = await wait_final(box, "job1")
            assert (final.state, final.exit_code, final.oom, final.message) == (
                "exited", 137, False, "killed by the agent")
            assert not alive(ref)
    finally:
        await sup.close()
    assert sup.active == {}


@pytest.mark.parametrize("use_cgroups", [True, False])
async def test_swift_ops_fit_in_a_small_memory_limit(tmp_path: Path, swift_service: Any,
                                                     use_cgroups: bool,
        make_runner: Callable[..., OpRunner]) -> None:
    # 100 MiB of RLIMIT_DATA: the interpreter, swiftclient and its threads fit in it
    container = f"ops-{os.urandom(5).hex()}"
    swift_service.put_objects(container, {f"{DATA}/a.txt": b"a", f"{DATA}/b/c.txt": b"c"})
    creds = {"auth_url": swift_service.auth_url, "username": swift_service.user,
             "key": swift_service.key, "container": container}
    sb = tmp_path / "storeBase"
    sb.mkdir()
    runner = make_runner(tmp_path / "ops", sb, use_cgroups=use_cgroups, poll_interval=0.05)
    if use_cgroups:
        needs_cgroups(runner)
    copy = {"op": "copy", "storage": "swift", "key_dir": "key-jid1", "input_dirs": [DATA],
            "output_dir": OUTPUT, "swift": creds}
    spec = dataclasses.replace(copy_spec(memory=100), op=copy)
    result = await asyncio.wait_for(runner.run(spec), WAIT)
    assert result == OpResult(0, "copied 2 files from 1 input dirs\n", "", False)
    (sb / "key-jid1" / "outgoing" / "out.txt").write_text("out")
    upload = {"op": "upload", "storage": "swift", "key_dir": "key-jid1",
              "job_output_path": OUTPUT, "swift": creds}
    spec = dataclasses.replace(copy_spec(memory=100), op=upload, kind="upload",
                               name="jid1-upload", job="job2")
    result = await asyncio.wait_for(runner.run(spec), WAIT)
    assert result == OpResult(0, "uploaded 1, skipped 0\n", "", False)
    runner.prune([])


def reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def lock_held(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


async def test_an_unrecorded_worker_is_waited_for_not_doubled(tmp_path: Path, big_sb: Path,
                                                              pids: Pids,
        make_runner: Callable[..., OpRunner]) -> None:
    # the agent died right after starting the worker, before its pid was persisted
    sb = big_sb
    spec = copy_spec()
    first = make_runner(tmp_path / "ops", sb, poll_interval=0.05)
    seen: list[ChildRef] = []
    task = asyncio.create_task(first.run(spec, on_started=seen.append))
    await until(lambda: seen, "the worker to start")
    pids.add(seen[0])
    lock = first.op_dir(spec) / "worker.lock"
    await until(lambda: lock_held(lock), "the worker to take its lock")
    os.kill(seen[0].pid, signal.SIGSTOP)
    task.cancel()  # the old agent is gone; its worker is not
    with contextlib.suppress(asyncio.CancelledError):
        await task

    second = make_runner(tmp_path / "ops", sb, poll_interval=0.05)
    started: list[ChildRef] = []
    resumed = asyncio.create_task(second.run(spec, child=None, on_started=started.append))
    await asyncio.sleep(0.5)
    assert not resumed.done()
    os.kill(seen[0].pid, signal.SIGCONT)
    result = await asyncio.wait_for(resumed, WAIT)
    assert result == OpResult(0, "copied 3000 files (0.0 MiB) from 1 input dirs\n", "", False)
    assert started == []
    reap(seen[0].pid)  # the first runner's child, which nobody waits for any more
    second.prune([])
