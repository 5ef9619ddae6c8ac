"""Parsing SLURM 22.05's answers (captured from the test cluster) and mapping them to
job states with their reasons."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from agent.runtimes.slurm_state import (
    LauncherResult,
    SlurmJob,
    capacity,
    gres_gpus,
    launch_failure,
    parse_result,
    parse_sacct,
    parse_sinfo,
    parse_squeue,
    result_status,
    slurm_time,
    to_status,
)

# squeue -h --states=all -O JobID:|,Name:|,State:|,Reason:|,exit_code:|,StartTime:|,...
SQUEUE = """\
4|cancelme|CANCELLED|Resources|0|2026-11-24T17:18:08|2026-11-24T17:18:08|(null)|
1|ok|FAILED|NonZeroExitCode|768|2026-11-24T17:18:05|2026-11-24T17:18:06|pfleet;agent=a;job=J;attempt=1;kind=plugin;jid=ok|
2|oom|OUT_OF_MEMORY|OutOfMemory|253|2026-11-24T17:18:07|2026-11-24T17:18:08|(null)|
3|to|TIMEOUT|TimeLimit|15|2026-11-24T17:18:08|2026-11-24T17:19:29|(null)|
5|run|RUNNING|None|0|2026-11-24T17:19:30|2026-11-24T17:20:30|a|comment with | bar|
6|wait|PENDING|Resources|0|N/A|N/A|(null)|
7|done|COMPLETED|None|0|2026-11-24T17:25:39|2026-11-24T17:25:39|(null)|
"""
# sacct -c -X -n -P -o JobID,State,ExitCode,Start,End,Reason (the jobcomp file)
JOBCOMP = """\
1|FAILED|3:0|2026-11-24T17:18:05|2026-11-24T17:18:06|
2|OUT_OF_MEMORY|0:125|2026-11-24T17:18:07|2026-11-24T17:18:08|
3|TIMEOUT|0:0|2026-11-24T17:18:08|2026-11-24T17:19:29|
6|CANCELLED by 0|0:15|2026-11-24T17:21:23|2026-11-24T17:21:25|
"""
# sinfo -h -N -o %N|%P|%c|%m|%G|%t
SINFO = """\
n1|debug*|2|4000|(null)|idle
n2|debug*|2|4000|(null)|mix
n2|gpu|2|4000|(null)|mix
g1|gpu|8|64000|gpu:a100:4(S:0-1)|alloc
g2|gpu|8|64000|gpu:a100:4(S:0-1)|drain
n3|debug*|2|4000|(null)|down*
n4|debug*|2|4000|(null)|idle*
"""


@pytest.fixture
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """SLURM prints local time: pin the zone so the expected RFC 3339 values hold."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def by_id(text: str) -> dict[str, SlurmJob]:
    return {j.job_id: j for j in parse_squeue(text)}


def test_squeue_lines_parse(utc: None) -> None:
    jobs = by_id(SQUEUE)
    assert jobs["1"] == SlurmJob("1", "FAILED", "NonZeroExitCode", 3, None,
                                 "2026-11-24T17:18:05Z", "2026-11-24T17:18:06Z", "ok",
                                 "pfleet;agent=a;job=J;attempt=1;kind=plugin;jid=ok")
    assert (jobs["3"].exit_code, jobs["3"].signal) == (0, 15)
    assert jobs["5"].comment == "a|comment with | bar"  # the last field keeps its bars
    assert (jobs["6"].started_at, jobs["6"].reason) == ("", "Resources")
    assert jobs["4"].comment == "" and jobs["5"].reason == ""
    assert parse_squeue("garbage\n\n1|x\n") == []


def test_states_map_with_reasons(utc: None) -> None:
    jobs = by_id(SQUEUE)
    failed = to_status(jobs["1"])
    assert (failed.state, failed.exit_code, failed.oom, failed.message) == \
        ("exited", 3, False, "exited")
    assert failed.finished_at == "2026-11-24T17:18:06Z"
    oom = to_status(jobs["2"])
    assert (oom.exit_code, oom.oom) == (137, True) and "OUT_OF_MEMORY" in oom.message
    timeout = to_status(jobs["3"])
    assert (timeout.exit_code, timeout.oom) == (143, False)
    assert timeout.message.startswith("TIMEOUT")
    cancelled = to_status(jobs["4"])
    assert cancelled.exit_code == 143 and cancelled.message.startswith("CANCELLED")
    assert to_status(jobs["5"]).state == "running"
    assert to_status(jobs["5"]).started_at == "2026-11-24T17:19:30Z"
    pending = to_status(jobs["6"])
    assert (pending.state, pending.message) == ("pending", "PENDING (Resources)")
    done = to_status(jobs["7"])
    assert (done.state, done.exit_code, done.message) == ("exited", 0, "exited")
    for state, start in (("NODE_FAIL", "NODE_FAIL"), ("PREEMPTED", "PREEMPTED"),
                         ("BOOT_FAIL", "BOOT_FAIL"), ("DEADLINE", "DEADLINE")):
        status = to_status(SlurmJob("9", state, exit_code=0))
        assert status.state == "exited" and status.exit_code != 0
        assert status.message.startswith(start)
    assert to_status(SlurmJob("9", "FAILED", "JobLaunchFailure", 1)).message == \
        "FAILED (JobLaunchFailure)"
    odd = to_status(SlurmJob("9", "SOMETHING_NEW"))
    assert (odd.state, odd.message) == ("unknown", "SLURM state SOMETHING_NEW")
    assert to_status(SlurmJob("9", "SUSPENDED")).state == "running"
    assert to_status(SlurmJob("9", "REQUEUE_HOLD")).state == "pending"


def test_jobcomp_lines_parse(utc: None) -> None:
    jobs = {j.job_id: j for j in parse_sacct(JOBCOMP, "jobcomp")}
    assert (jobs["1"].exit_code, jobs["1"].signal, jobs["1"].source) == (3, None, "jobcomp")
    assert to_status(jobs["1"]).exit_code == 3
    assert to_status(jobs["2"]).oom
    assert (jobs["6"].state, jobs["6"].by, jobs["6"].signal) == ("CANCELLED", "0", 15)
    status = to_status(jobs["6"])
    assert status.exit_code == 143 and status.message.startswith("CANCELLED by uid 0")
    assert to_status(jobs["3"]).exit_code == 143


def test_container_launcher_results(utc: None) -> None:
    assert parse_result("task=0 exit=137 oom=true\n") == LauncherResult(137, True)
    assert parse_result("task=0 exit=0 oom=false\ntask=1 exit=4 oom=unknown\n") == \
        LauncherResult(4, False)
    assert parse_result("") is None and parse_result("junk\n") is None
    failed137 = SlurmJob("1", "FAILED", "NonZeroExitCode", 137)
    docker_oom = to_status(failed137, LauncherResult(137, True), launcher="docker")
    assert (docker_oom.oom, docker_oom.exit_code) == (True, 137)
    assert "docker" in docker_oom.message
    podman = to_status(failed137, LauncherResult(137, False), launcher="podman")
    assert podman.oom and podman.extra["oom_inferred"]
    assert not to_status(failed137, None, launcher="podman", limited=False).oom
    assert not to_status(failed137, None, launcher="docker").oom
    # A job SLURM forgot: the result file alone.
    assert result_status(LauncherResult(0, False)).message == "exited"
    assert result_status(LauncherResult(5, False)).exit_code == 5
    assert result_status(LauncherResult(137, True)).oom


def test_launch_failures_are_told_apart_from_plugin_failures() -> None:
    ch = ("hello\nch-run[123]: error: can't stat: /images/x: No such file or directory "
          "(ch_core.c:255 2)\n")
    assert launch_failure("charliecloud", 1, ch) == \
        "ch-run: can't stat: /images/x: No such file or directory (ch_core.c:255 2)"
    assert launch_failure("charliecloud", 1, "plugin said no\n") is None
    docker = ("Unable to find image 'x:1' locally\ndocker: Error response from daemon: "
              "pull access denied for x.\nSee 'docker run --help'.\n")
    assert launch_failure("docker", 125, docker, "x:1") == \
        "image not found: x:1: docker: Error response from daemon: pull access denied for x."
    assert launch_failure("podman", 125, "Error: invalid reference format\n") == \
        "podman could not start the container: Error: invalid reference format"
    assert launch_failure("docker", 1, docker) is None  # the plugin's own exit code
    assert launch_failure("none", 127, "env: 'x': No such file or directory") is None


def test_sinfo_capacity_by_partition() -> None:
    nodes = parse_sinfo(SINFO)
    assert [n.name for n in nodes if n.default] == ["n1", "n2", "n3", "n4"]
    # default partition: n1 idle, n2 mix; n3 down, n4 not responding
    assert capacity(nodes, []) == (4000, 8000, 0, 2)
    # gpu: n2 and g1 (g2 drained); a node in two partitions counts once
    assert capacity(nodes, ["gpu"]) == (10_000, 68_000, 4, 2)
    assert capacity(nodes, ["debug", "gpu"]) == (12_000, 72_000, 4, 3)
    assert capacity(nodes, ["nope"]) == (0, 0, 0, 0)
    assert [gres_gpus(g) for g in ("(null)", "gpu:2", "gpu:a:1,gpu:b:2(S:0)", "mps:100")] == \
        [0, 2, 3, 0]


def test_slurm_times(utc: None) -> None:
    assert slurm_time("2026-11-24T17:18:05") == "2026-11-24T17:18:05Z"
    assert [slurm_time(t) for t in ("N/A", "Unknown", "NONE", "", "junk")] == [""] * 5
