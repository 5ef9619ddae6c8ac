"""Pure translations between pfleet and the Docker Engine API (no I/O).

``agent.runtimes.docker`` does the talking; this module only decides what to
say and how to read the answer, so all of it is unit-tested without an engine:

* ``DockerSettings``: the runtime's configuration (pfcon's variable names in
  the comments).
* ``parse_container_user``: ``CONTAINER_USER`` ("UID:GID", either side empty or a
  range ``lo-hi``), validated once at start.
* ``build_create_kwargs``: a ``JobSpec`` -> keyword arguments for
  ``docker.DockerClient.containers.create``.
* ``status_from_inspect``: a container inspect document -> ``JobStatus``
  (pfcon-api.md §2.2).
* ``classify_api_error``: whether an engine error is the job's fault (permanent)
  or the engine's (transient).
"""

from __future__ import annotations

import posixpath
import random
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from docker.types import DeviceRequest, Mount

from agent.protocol import JobSpec
from agent.runtimes.base import (
    LABEL_AGENT,
    LABEL_ATTEMPT,
    LABEL_JID,
    LABEL_JOB,
    LABEL_JOB_TYPE,
    JobStatus,
)

MIB = 1024 * 1024
ZERO_TIME_PREFIX = "0001-01-01"  # Docker's and Podman's "never happened" timestamp


@dataclass(frozen=True)
class DockerSettings:
    """Configuration of one Docker or Podman runtime.

    ``base_url`` is a DOCKER_HOST-style URL (``unix:///run/podman/podman.sock``);
    ``None`` reads the standard Docker client environment (``DOCKER_HOST``,
    ``DOCKER_TLS_VERIFY``, ``DOCKER_CERT_PATH``).
    """

    base_url: str | None = None
    engine: Literal["docker", "podman"] = "docker"  # quirks + the runtime name reported
    agent_name: str = "local"  # value of LABEL_AGENT; list_ours()/status() filter on it
    volume_type: Literal["host", "docker_local_volume"] = "host"  # COMPUTE_VOLUME_TYPE
    storebase: str | None = None  # STOREBASE: host path of the storeBase (volume_type host)
    volume_name: str | None = None  # VOLUME_NAME: local-driver volume holding the storeBase
    container_user: str | None = None  # CONTAINER_USER
    job_labels: dict[str, str] = field(default_factory=dict)  # JOB_LABELS
    ignore_limits: bool = False  # IGNORE_LIMITS: no cpu/memory limits (GPUs still requested)
    shm_size_mib: int | None = None  # SHM_SIZE
    enable_home_workaround: bool = False  # ENABLE_HOME_WORKAROUND: HOME=/tmp when env has none
    max_concurrency: int = 8  # threads for blocking SDK calls
    gpus: int = 0  # GPUs this host offers (reported by probe(); the engine is not asked)
    request_timeout: float = 60.0  # seconds per engine API request (streams excepted)

    def validate(self) -> list[str]:
        """Every problem with these settings, as readable sentences ([] when fine)."""
        problems: list[str] = []
        if self.engine not in ("docker", "podman"):
            problems.append(f"engine must be docker or podman, not {self.engine!r}")
        if self.volume_type == "host":
            if not self.storebase or not self.storebase.startswith("/"):
                problems.append(
                    "STOREBASE must be an absolute host path when the volume type is host"
                )
        elif self.volume_type == "docker_local_volume":
            if not self.volume_name:
                problems.append(
                    "VOLUME_NAME is required when the volume type is docker_local_volume"
                )
        else:
            problems.append(
                f"volume type must be host or docker_local_volume, not {self.volume_type!r}"
            )
        try:
            parse_container_user(self.container_user)
        except ValueError as exc:
            problems.append(str(exc))
        if self.shm_size_mib is not None and self.shm_size_mib <= 0:
            problems.append(f"SHM_SIZE must be a positive number of MiB, not {self.shm_size_mib}")
        if self.max_concurrency < 1:
            problems.append("max_concurrency must be at least 1")
        if self.gpus < 0:
            problems.append("gpus must not be negative")
        return problems


# ------------------------------------------------------------------ CONTAINER_USER


@dataclass(frozen=True)
class ContainerUser:
    """Parsed CONTAINER_USER: an inclusive (low, high) range for each side, or None."""

    uid: tuple[int, int] | None = None
    gid: tuple[int, int] | None = None

    def pick(self, rng: random.Random) -> tuple[str | None, str | None]:
        """One (uid, gid) for one job; a range yields a random value inside it."""
        return _pick(self.uid, rng), _pick(self.gid, rng)


def _pick(bounds: tuple[int, int] | None, rng: random.Random) -> str | None:
    if bounds is None:
        return None
    return str(rng.randint(bounds[0], bounds[1]))


_ID_RE = re.compile(r"^(\d+)(?:-(\d+))?$")


def parse_container_user(text: str | None) -> ContainerUser | None:
    """Parse CONTAINER_USER ("UID:GID"); None when it asks for nothing.

    Either side may be empty or a range ``lo-hi`` (a random value per job, as pfcon
    does).  A value without ":" is a UID alone.  Raises ``ValueError`` naming the
    variable and the bad part.
    """
    if text is None:
        return None
    text = text.strip()
    uid_text, _, gid_text = text.partition(":")
    uid = _parse_id_range(uid_text.strip(), "UID", text)
    gid = _parse_id_range(gid_text.strip(), "GID", text)
    if uid is None and gid is None:
        return None
    return ContainerUser(uid, gid)


def _parse_id_range(part: str, what: str, whole: str) -> tuple[int, int] | None:
    if part == "":
        return None
    match = _ID_RE.match(part)
    if match is None:
        raise ValueError(
            f"CONTAINER_USER {whole!r}: {what} {part!r} is not a number or a "
            "range lo-hi of numbers (expected UID:GID, e.g. 1000:1000 or "
            "1000-1999:)"
        )
    low = int(match.group(1))
    high = int(match.group(2)) if match.group(2) is not None else low
    if low > high:
        raise ValueError(
            f"CONTAINER_USER {whole!r}: {what} range {part!r} is empty (low is above high)"
        )
    if high > 2**32 - 2:
        raise ValueError(f"CONTAINER_USER {whole!r}: {what} {part!r} is out of range")
    return low, high


# --------------------------------------------------------------- create arguments


def storebase_source(storebase: str, source: str) -> str:
    """The host path of a storeBase sub-path; ``ValueError`` if it escapes the storeBase."""
    root = posixpath.normpath(storebase)
    path = posixpath.normpath(posixpath.join(root, source.lstrip("/"))) if source else root
    if path != root and not path.startswith(root.rstrip("/") + "/"):
        raise ValueError(f"mount source {source!r} is outside the storeBase")
    return path


def shm_size_arg(mib: int) -> str:
    """SHM_SIZE in MiB as pfcon hands it to Docker: 128 -> "134m" (MiB scaled to MB)."""
    return f"{int(mib * 1.048576)}m"


def container_labels(spec: JobSpec, settings: DockerSettings) -> dict[str, str]:
    """JOB_LABELS plus pfcon's job_type and pfleet's own labels (which win on a clash)."""
    labels = dict(settings.job_labels)
    labels.update(
        {
            LABEL_JOB_TYPE: spec.kind,
            LABEL_JOB: spec.job,
            LABEL_ATTEMPT: str(spec.attempt),
            LABEL_AGENT: settings.agent_name,
            LABEL_JID: spec.jid,
        }
    )
    return labels


def job_environment(spec: JobSpec, settings: DockerSettings) -> list[str]:
    """The job's env, plus HOME=/tmp once when the workaround is on and env has no HOME."""
    env = list(spec.env)
    if settings.enable_home_workaround and not any(e.startswith("HOME=") for e in env):
        env.append("HOME=/tmp")
    return env


def build_create_kwargs(
    spec: JobSpec,
    settings: DockerSettings,
    storebase: str,
    *,
    swap_limit: bool = True,
    user: ContainerUser | None = None,
    rng: random.Random | None = None,
) -> dict[str, Any]:
    """Keyword arguments for ``DockerClient.containers.create`` running ``spec``.

    ``storebase`` is the storeBase's host path; ``swap_limit`` says whether the
    engine can limit swap (then memory+swap equals memory: no swapping).  The
    command is the container Cmd, so an image ENTRYPOINT stays in force (as in
    pfcon).  CONTAINER_USER's GID is added as a *supplementary* group, as pfcon
    does: the primary group stays the image's.  Raises ``ValueError`` for a mount
    source outside the storeBase.
    """
    kwargs: dict[str, Any] = {
        "image": spec.image,
        "command": list(spec.command),
        "name": spec.name,
        "environment": job_environment(spec, settings),
        "labels": container_labels(spec, settings),
        "mounts": [
            Mount(
                target=m.target,
                source=storebase_source(storebase, m.source),
                type="bind",
                read_only=m.read_only,
            )
            for m in spec.mounts
        ],
        "restart_policy": {"Name": "no"},
        "detach": True,
    }
    if not settings.ignore_limits:
        kwargs["mem_limit"] = spec.memory_limit * MIB
        if swap_limit:
            kwargs["memswap_limit"] = spec.memory_limit * MIB
        kwargs["nano_cpus"] = spec.cpu_limit * 1_000_000
    if spec.gpu_limit > 0:  # requested even with IGNORE_LIMITS, as pfcon does
        kwargs["device_requests"] = [DeviceRequest(count=spec.gpu_limit, capabilities=[["gpu"]])]
    if settings.shm_size_mib:
        kwargs["shm_size"] = shm_size_arg(settings.shm_size_mib)
    if user is not None:
        uid, gid = user.pick(rng or random.Random())
        if uid is not None:
            kwargs["user"] = uid
        if gid is not None:
            kwargs["group_add"] = [gid]
    return kwargs


# ----------------------------------------------------------------------- status

# Podman (4.3, runc, cgroup v1) never sets State.OOMKilled: an out-of-memory kill
# shows only as exit code 137 (SIGKILL).  Under a memory limit, and when pfleet did
# not stop the container itself, that is taken as OOM and the message says so.
PODMAN_OOM_EXIT_CODE = 137


def _time(value: Any) -> str:
    text = str(value or "")
    return "" if text.startswith(ZERO_TIME_PREFIX) else text


def status_from_inspect(
    attrs: dict[str, Any], *, engine: str = "docker", stopped_by_us: bool = False
) -> JobStatus:
    """Map a container inspect document to a ``JobStatus`` (pfcon-api.md §2.2 order).

    Running/Paused -> running; created -> pending; OOMKilled or Dead -> exited
    (oom only for OOMKilled); exited -> exited with its code; anything else
    (restarting, removing, ...) -> unknown with the engine's status as message.
    """
    state = attrs.get("State") or {}
    status = str(state.get("Status") or "")
    started = _time(state.get("StartedAt"))
    finished = _time(state.get("FinishedAt"))
    code = state.get("ExitCode")
    exit_code = int(code) if isinstance(code, int) else None
    if state.get("Running") or state.get("Paused"):
        return JobStatus("running", started_at=started, message=status or "running")
    if status == "created":
        return JobStatus("pending", message=status)
    if state.get("OOMKilled"):
        return JobStatus(
            "exited",
            exit_code=exit_code,
            oom=True,
            started_at=started,
            finished_at=finished,
            message="OOMKilled",
        )
    if state.get("Dead"):
        return JobStatus(
            "exited",
            exit_code=exit_code,
            started_at=started,
            finished_at=finished,
            message="dead",
            extra={"dead": True},
        )
    if status == "exited":
        memory = ((attrs.get("HostConfig") or {}).get("Memory")) or 0
        if (
            engine == "podman"
            and exit_code == PODMAN_OOM_EXIT_CODE
            and memory > 0
            and not stopped_by_us
        ):
            return JobStatus(
                "exited",
                exit_code=exit_code,
                oom=True,
                started_at=started,
                finished_at=finished,
                message="OOMKilled (inferred: podman reports exit 137 under a "
                "memory limit, not OOMKilled)",
                extra={"oom_inferred": True},
            )
        return JobStatus(
            "exited", exit_code=exit_code, started_at=started, finished_at=finished, message=status
        )
    return JobStatus(
        "unknown",
        exit_code=exit_code,
        started_at=started,
        finished_at=finished,
        message=status or "no state reported",
    )


# ----------------------------------------------------------------------- errors

# Fragments of engine errors during create/start that no retry can cure.  Docker
# answers most of these with 4xx, but Podman's compat API answers 500 for nearly
# everything (name conflicts, bad names, OCI runtime failures), so the text decides.
PERMANENT_ERROR_MARKERS: tuple[str, ...] = (
    "could not select device driver",  # GPU requested on a host without GPU support
    "oci runtime",
    "runc create failed",
    "executable file not found",
    "no such file or directory",
    "permission denied",
    "invalid argument",
    "invalid reference format",
    "unable to set memory limit",
    "minimum memory limit",
    "names must match",
    "is not a valid",
)

GPU_ERROR_MARKER = "could not select device driver"


def short_error(text: str, limit: int = 300) -> str:
    """One line of at most ``limit`` characters."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def is_permanent_create_error(status_code: int | None, explanation: str) -> bool:
    """True when a create/start failure is the job's fault (reject) rather than the
    engine's (retry later)."""
    if status_code is not None and 400 <= status_code < 500:
        return True
    lowered = explanation.lower()
    return any(marker in lowered for marker in PERMANENT_ERROR_MARKERS)


def is_name_conflict(status_code: int | None, explanation: str) -> bool:
    """Docker answers 409; Podman 500 with "... is already in use"."""
    return status_code == 409 or "already in use" in explanation.lower()
