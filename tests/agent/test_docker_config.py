"""The Docker runtime's pure translations: settings, CONTAINER_USER, create kwargs, states."""

from __future__ import annotations

import random

import pytest

from agent.protocol import JobSpec, Mount
from agent.runtimes.base import (
    LABEL_AGENT,
    LABEL_ATTEMPT,
    LABEL_JID,
    LABEL_JOB,
    LABEL_JOB_TYPE,
)
from agent.runtimes.docker_config import (
    ContainerUser,
    DockerSettings,
    build_create_kwargs,
    is_name_conflict,
    is_permanent_create_error,
    parse_container_user,
    shm_size_arg,
    status_from_inspect,
    storebase_source,
)

SB = "/srv/storebase"


def spec(**overrides: object) -> JobSpec:
    values: dict[str, object] = {
        "job": "j-1",
        "attempt": 2,
        "name": "chris-jid-7",
        "jid": "chris-jid-7",
        "kind": "plugin",
        "image": "localhost/pfleet-test/busybox:1",
        "command": ["sh", "-c", "echo hi"],
        "env": ["CHRIS_JID=chris-jid-7"],
        "cpu_limit": 1500,
        "memory_limit": 300,
        "mounts": [
            Mount("key-chris-jid-7/incoming", "/share/incoming", True),
            Mount("key-chris-jid-7/outgoing", "/share/outgoing", False),
        ],
    }
    values.update(overrides)
    return JobSpec(**values)  # type: ignore[arg-type]


def settings(**overrides: object) -> DockerSettings:
    values: dict[str, object] = {"storebase": SB, "agent_name": "h1"}
    values.update(overrides)
    return DockerSettings(**values)  # type: ignore[arg-type]


# ------------------------------------------------------------------ CONTAINER_USER


@pytest.mark.parametrize("text", [None, "", ":", " : "])
def test_container_user_empty_asks_for_nothing(text: str | None) -> None:
    assert parse_container_user(text) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1000:", ContainerUser((1000, 1000), None)),
        ("1000", ContainerUser((1000, 1000), None)),
        (":5678", ContainerUser(None, (5678, 5678))),
        ("1234:5678", ContainerUser((1234, 1234), (5678, 5678))),
        ("1000-1234:", ContainerUser((1000, 1234), None)),
        ("1000-1234:5678", ContainerUser((1000, 1234), (5678, 5678))),
        ("1000-1234:2000-2999", ContainerUser((1000, 1234), (2000, 2999))),
        ("0:0", ContainerUser((0, 0), (0, 0))),
    ],
)
def test_container_user_parses(text: str, expected: ContainerUser) -> None:
    assert parse_container_user(text) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("abc:1", "UID 'abc'"),
        ("1:abc", "GID 'abc'"),
        ("5-2:", "UID range '5-2' is empty"),
        ("1:9-3", "GID range '9-3' is empty"),
        ("-1:", "UID '-1'"),
        ("1-:", "UID '1-'"),
        ("1:2:3", "GID '2:3'"),
        ("99999999999:", "out of range"),
    ],
)
def test_container_user_malformed_is_refused_clearly(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match="CONTAINER_USER") as info:
        parse_container_user(text)
    assert fragment in str(info.value)


def test_container_user_ranges_pick_values_inside_them() -> None:
    user = parse_container_user("1000-1009:2000-2001")
    assert user is not None
    rng = random.Random(7)
    picks = [user.pick(rng) for _ in range(200)]
    uids = {int(u) for u, _ in picks if u is not None}
    gids = {int(g) for _, g in picks if g is not None}
    assert uids <= set(range(1000, 1010)) and len(uids) > 1
    assert gids == {2000, 2001}


# ----------------------------------------------------------------------- settings


def test_settings_problems_are_all_named() -> None:
    bad = DockerSettings(
        volume_type="host",
        storebase="relative/path",
        container_user="x:1",
        shm_size_mib=0,
        max_concurrency=0,
    )
    problems = bad.validate()
    assert len(problems) == 4
    assert any("STOREBASE" in p for p in problems)
    assert any("CONTAINER_USER" in p for p in problems)
    assert any("SHM_SIZE" in p for p in problems)
    assert DockerSettings(volume_type="docker_local_volume").validate() == [
        "VOLUME_NAME is required when the volume type is docker_local_volume"
    ]
    assert settings().validate() == []


# ----------------------------------------------------------------- create kwargs


def test_create_kwargs_basics() -> None:
    kwargs = build_create_kwargs(spec(), settings(), SB)
    assert kwargs["image"] == "localhost/pfleet-test/busybox:1"
    assert kwargs["command"] == ["sh", "-c", "echo hi"]
    assert kwargs["name"] == "chris-jid-7"
    assert kwargs["environment"] == ["CHRIS_JID=chris-jid-7"]
    assert kwargs["restart_policy"] == {"Name": "no"}
    assert kwargs["detach"] is True
    assert "entrypoint" not in kwargs  # the image's ENTRYPOINT stays, as in pfcon
    assert "user" not in kwargs and "group_add" not in kwargs
    assert "device_requests" not in kwargs and "shm_size" not in kwargs


def test_create_kwargs_bind_mounts_below_the_storebase() -> None:
    mounts = build_create_kwargs(
        spec(
            mounts=[
                Mount("key-x/incoming", "/share/incoming", True),
                Mount("", "/share/root", False),
            ]
        ),
        settings(),
        SB,
    )["mounts"]
    assert [dict(m) for m in mounts] == [
        {
            "Target": "/share/incoming",
            "Source": "/srv/storebase/key-x/incoming",
            "Type": "bind",
            "ReadOnly": True,
        },
        {"Target": "/share/root", "Source": "/srv/storebase", "Type": "bind", "ReadOnly": False},
    ]


def test_mount_source_may_not_escape_the_storebase() -> None:
    assert storebase_source(SB, "/key-x/out") == "/srv/storebase/key-x/out"
    assert storebase_source(SB + "/", "a/../b") == "/srv/storebase/b"
    for bad in ("..", "../etc", "key-x/../../etc"):
        with pytest.raises(ValueError, match="outside the storeBase"):
            storebase_source(SB, bad)
    with pytest.raises(ValueError):
        build_create_kwargs(spec(mounts=[Mount("../x", "/share/incoming", True)]), settings(), SB)


def test_create_kwargs_hard_limits() -> None:
    kwargs = build_create_kwargs(spec(memory_limit=300, cpu_limit=1500), settings(), SB)
    assert kwargs["mem_limit"] == 300 * 1048576
    assert kwargs["memswap_limit"] == 300 * 1048576  # no swap on top
    assert kwargs["nano_cpus"] == 1_500_000_000
    no_swap = build_create_kwargs(spec(), settings(), SB, swap_limit=False)
    assert "memswap_limit" not in no_swap and no_swap["mem_limit"] == 300 * 1048576


def test_ignore_limits_drops_cpu_and_memory_but_not_gpus() -> None:
    kwargs = build_create_kwargs(spec(gpu_limit=2), settings(ignore_limits=True), SB)
    for key in ("mem_limit", "memswap_limit", "nano_cpus"):
        assert key not in kwargs
    (request,) = kwargs["device_requests"]
    assert request["Count"] == 2 and request["Capabilities"] == [["gpu"]]


def test_gpu_device_request() -> None:
    kwargs = build_create_kwargs(spec(gpu_limit=1), settings(), SB)
    (request,) = kwargs["device_requests"]
    assert dict(request) == {
        "Driver": "",
        "Count": 1,
        "DeviceIDs": [],
        "Capabilities": [["gpu"]],
        "Options": {},
    }


@pytest.mark.parametrize(("mib", "arg"), [(128, "134m"), (1, "1m"), (1024, "1073m")])
def test_shm_size_is_scaled_like_pfcon(mib: int, arg: str) -> None:
    assert shm_size_arg(mib) == arg
    assert build_create_kwargs(spec(), settings(shm_size_mib=mib), SB)["shm_size"] == arg


def test_labels_carry_job_labels_job_type_and_pfleet_labels() -> None:
    labels = build_create_kwargs(
        spec(kind="copy", name="chris-jid-7-copy"),
        settings(job_labels={"team": "fnndsc", LABEL_JOB: "spoofed"}),
        SB,
    )["labels"]
    assert labels == {
        "team": "fnndsc",
        LABEL_JOB_TYPE: "copy",
        LABEL_JOB: "j-1",
        LABEL_ATTEMPT: "2",
        LABEL_AGENT: "h1",
        LABEL_JID: "chris-jid-7",
    }


def test_home_workaround_adds_home_exactly_once() -> None:
    on = settings(enable_home_workaround=True)
    env = build_create_kwargs(spec(env=["A=1"]), on, SB)["environment"]
    assert env == ["A=1", "HOME=/tmp"]
    # building twice from the same spec does not accumulate
    assert build_create_kwargs(spec(env=["A=1"]), on, SB)["environment"] == env
    assert build_create_kwargs(spec(env=["HOME=/home/x"]), on, SB)["environment"] == [
        "HOME=/home/x"
    ]
    assert build_create_kwargs(spec(env=["A=1"]), settings(), SB)["environment"] == ["A=1"]


def test_container_user_becomes_user_and_supplementary_group() -> None:
    user = parse_container_user("1234:5678")
    kwargs = build_create_kwargs(spec(), settings(), SB, user=user)
    assert kwargs["user"] == "1234" and kwargs["group_add"] == ["5678"]
    only_gid = build_create_kwargs(spec(), settings(), SB, user=parse_container_user(":7"))
    assert "user" not in only_gid and only_gid["group_add"] == ["7"]
    ranged = build_create_kwargs(
        spec(), settings(), SB, user=parse_container_user("10-12:"), rng=random.Random(1)
    )
    assert 10 <= int(ranged["user"]) <= 12 and "group_add" not in ranged


# ------------------------------------------------------------------------ states

ZERO = "0001-01-01T00:00:00Z"
T1, T2 = "2026-11-24T13:39:20.1Z", "2026-11-24T13:39:21.447218621Z"


def inspect(memory: int = 0, **state: object) -> dict[str, object]:
    base: dict[str, object] = {
        "Status": "exited",
        "Running": False,
        "Paused": False,
        "Restarting": False,
        "OOMKilled": False,
        "Dead": False,
        "ExitCode": 0,
        "StartedAt": T1,
        "FinishedAt": T2,
    }
    base.update(state)
    return {"State": base, "HostConfig": {"Memory": memory}}


def test_state_running_and_paused() -> None:
    running = status_from_inspect(inspect(Status="running", Running=True, FinishedAt=ZERO))
    assert (running.state, running.started_at, running.finished_at) == ("running", T1, "")
    assert status_from_inspect(inspect(Status="paused", Paused=True)).state == "running"


def test_state_created_is_pending() -> None:
    status = status_from_inspect(inspect(Status="created", StartedAt=ZERO, FinishedAt=ZERO))
    assert (status.state, status.started_at, status.finished_at) == ("pending", "", "")


def test_state_exited_with_code_and_times() -> None:
    status = status_from_inspect(inspect(ExitCode=3))
    assert (status.state, status.exit_code, status.oom) == ("exited", 3, False)
    assert (status.started_at, status.finished_at) == (T1, T2)


def test_state_oom_and_dead() -> None:
    oom = status_from_inspect(inspect(OOMKilled=True, ExitCode=137))
    assert (oom.state, oom.exit_code, oom.oom, oom.message) == ("exited", 137, True, "OOMKilled")
    dead = status_from_inspect(inspect(Status="dead", Dead=True, ExitCode=1))
    assert (dead.state, dead.exit_code, dead.oom, dead.message) == ("exited", 1, False, "dead")


@pytest.mark.parametrize("native", ["restarting", "removing", "weird"])
def test_state_other_is_unknown_with_the_engine_status(native: str) -> None:
    status = status_from_inspect(inspect(Status=native, Restarting=native == "restarting"))
    assert (status.state, status.message) == ("unknown", native)


def test_podman_exit_137_under_a_memory_limit_is_oom() -> None:
    state = inspect(memory=16 * 1048576, ExitCode=137)
    assert status_from_inspect(state, engine="podman").oom is True
    assert status_from_inspect(state, engine="podman", stopped_by_us=True).oom is False
    assert status_from_inspect(state, engine="docker").oom is False
    assert status_from_inspect(inspect(ExitCode=137), engine="podman").oom is False


# ------------------------------------------------------------------------ errors


def test_create_errors_are_classified() -> None:
    assert is_permanent_create_error(400, "Minimum memory limit allowed is 6MB")
    assert is_permanent_create_error(404, "No such image")
    assert is_permanent_create_error(
        500, 'could not select device driver "" with capabilities: [[gpu]]'
    )
    assert is_permanent_create_error(
        500,
        "runc: runc create failed: unable to start container process: exec: "
        '"/nonexist": stat /nonexist: no such file or directory: OCI runtime '
        "attempted to invoke a command that was not found",
    )
    assert not is_permanent_create_error(500, "context deadline exceeded")
    assert not is_permanent_create_error(None, "")
    assert is_name_conflict(409, "Conflict")
    assert is_name_conflict(500, 'the container name "x" is already in use by abc')
    assert not is_name_conflict(500, "boom")
