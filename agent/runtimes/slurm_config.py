"""Settings of the SLURM runtime, and the rules that pick a partition, account, QOS
and time limit by image name (no I/O; ``agent.config`` reads them from TOML or the
environment, ``agent.runtimes.factories`` builds ``SlurmSettings``).

Rules, in ``agent.toml``::

    slurm_rules = [
      { image = "ghcr.io/fnndsc/*gpu*", partition = "gpu", qos = "gpu" },
      { image = "*", timelimit_minutes = 120 },
    ]

or the same list as JSON in ``PFLEET_SLURM_RULES``.  The first rule whose glob
(``fnmatch``, case-sensitive) matches the job's image decides; a key it leaves out
falls back to the agent-wide setting (``PFLEET_SLURM_PARTITION`` ...).
"""

from __future__ import annotations

import fnmatch
import json
import posixpath
from dataclasses import dataclass, field
from typing import Any

LAUNCHERS = ("docker", "podman", "charliecloud", "apptainer", "none")
RULE_KEYS = ("image", "partition", "account", "qos", "timelimit_minutes")
# Characters that would break an ``#SBATCH`` line or a SLURM name (values are not quoted).
_UNSAFE = set(" \t\r\n\"'#\\")


@dataclass(frozen=True)
class SlurmRule:
    """Where jobs whose image matches ``image`` go (None: the agent-wide setting)."""

    image: str
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    timelimit_minutes: int | None = None

    def matches(self, image: str) -> bool:
        return fnmatch.fnmatchcase(image, self.image)


@dataclass(frozen=True)
class Placement:
    """The scheduling options of one job (None: left to SLURM's defaults)."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    timelimit_minutes: int | None = None


@dataclass(frozen=True)
class SlurmSettings:
    """Configuration of one SLURM runtime (pfcon's variable names in the comments)."""

    agent_name: str  # written into each job's --comment; list_ours() matches on it
    work_dir: str  # batch scripts, output and result files; compute nodes must see it
    storebase: str  # STOREBASE: the storeBase path on the compute nodes
    launcher: str = "docker"  # PFLEET_SLURM_LAUNCHER, one of LAUNCHERS
    partition: str | None = None  # PFLEET_SLURM_PARTITION (None: the cluster's default)
    account: str | None = None  # PFLEET_SLURM_ACCOUNT
    qos: str | None = None  # PFLEET_SLURM_QOS
    timelimit_minutes: int | None = None  # TIMELIMIT_MINUTES (None or 0: the partition's)
    rules: tuple[SlurmRule, ...] = ()  # PFLEET_SLURM_RULES
    image_dir: str | None = None  # PFLEET_SLURM_IMAGE_DIR: charliecloud/apptainer images
    docker_host: str | None = None  # DOCKER_HOST: the engine the docker/podman launcher uses
    container_user: str | None = None  # CONTAINER_USER (docker/podman launchers)
    job_labels: dict[str, str] = field(default_factory=dict)  # JOB_LABELS (docker/podman)
    ignore_limits: bool = False  # IGNORE_LIMITS: no --cpus-per-task/--mem, no engine limits
    shm_size_mib: int | None = None  # SHM_SIZE (docker/podman launchers)
    enable_home_workaround: bool = False  # ENABLE_HOME_WORKAROUND
    command_timeout: float = 10.0  # PFLEET_SLURM_COMMAND_TIMEOUT: seconds per SLURM command
    max_concurrency: int = 8  # SLURM commands run at once

    def validate(self) -> list[str]:
        """Every problem with these settings, as readable sentences ([] when fine)."""
        problems: list[str] = []
        if self.launcher not in LAUNCHERS:
            problems.append(f"PFLEET_SLURM_LAUNCHER must be one of {', '.join(LAUNCHERS)}, "
                            f"not {self.launcher!r}")
        if self.launcher == "charliecloud" and not self.image_dir:
            problems.append("PFLEET_SLURM_IMAGE_DIR is required with the charliecloud "
                            "launcher (ch-run runs directory images)")
        for what, value in (("STOREBASE", self.storebase), ("PFLEET_SLURM_WORK_DIR",
                                                             self.work_dir)):
            if not value or not posixpath.isabs(value):
                problems.append(f"{what} must be an absolute path, got {value!r}")
            elif _UNSAFE & set(value):
                problems.append(f"{what} must not contain spaces, quotes, '#' or '\\': "
                                f"{value!r}")
        if self.image_dir is not None and not posixpath.isabs(self.image_dir):
            problems.append(f"PFLEET_SLURM_IMAGE_DIR must be an absolute path, "
                            f"got {self.image_dir!r}")
        problems += _name_problems("PFLEET_SLURM_PARTITION", self.partition, commas=True)
        problems += _name_problems("PFLEET_SLURM_ACCOUNT", self.account)
        problems += _name_problems("PFLEET_SLURM_QOS", self.qos)
        if self.command_timeout <= 0:
            problems.append("PFLEET_SLURM_COMMAND_TIMEOUT must be positive")
        if self.max_concurrency < 1:
            problems.append("max_concurrency must be at least 1")
        return problems

    def placement(self, image: str) -> Placement:
        """Partition, account, QOS and time limit for a job running ``image``."""
        rule = next((r for r in self.rules if r.matches(image)), SlurmRule("*"))
        minutes = (rule.timelimit_minutes if rule.timelimit_minutes is not None
                   else self.timelimit_minutes)
        return Placement(partition=rule.partition or self.partition,
                         account=rule.account or self.account,
                         qos=rule.qos or self.qos,
                         timelimit_minutes=minutes or None)

    def partitions(self) -> list[str]:
        """Every partition jobs may be sent to by name ([] when only the default)."""
        names = [self.partition, *(r.partition for r in self.rules)]
        return list(dict.fromkeys(part for n in names if n for part in n.split(",")))


def parse_rules(value: Any) -> tuple[SlurmRule, ...]:
    """Rules from a TOML array of tables or its JSON text; ``ValueError`` says what is
    wrong with which rule."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ValueError(f"expected a JSON list of rules: {exc}") from None
    if not isinstance(value, list):
        raise ValueError("expected a list of rules like [{image = \"*gpu*\", "
                         "partition = \"gpu\"}]")
    rules = []
    for i, item in enumerate(value, 1):
        if not isinstance(item, dict):
            raise ValueError(f"rule {i}: expected a table, got {item!r}")
        unknown = sorted(set(item) - set(RULE_KEYS))
        if unknown:
            raise ValueError(f"rule {i}: unknown keys {unknown} (known: {', '.join(RULE_KEYS)})")
        image = item.get("image")
        if not isinstance(image, str) or not image:
            raise ValueError(f"rule {i}: 'image' (a glob) is required")
        names = {}
        for key in ("partition", "account", "qos"):
            text = item.get(key)
            if text is not None and not isinstance(text, str):
                raise ValueError(f"rule {i}: {key} must be a string")
            problems = _name_problems(key, text, commas=key == "partition")
            if problems:
                raise ValueError(f"rule {i}: {problems[0]}")
            names[key] = text or None
        minutes = item.get("timelimit_minutes")
        if minutes is not None and (isinstance(minutes, bool) or not isinstance(minutes, int)
                                    or minutes < 0):
            raise ValueError(f"rule {i}: timelimit_minutes must be a whole number >= 0")
        rules.append(SlurmRule(image=image, timelimit_minutes=minutes, **names))
    return tuple(rules)


def _name_problems(what: str, value: str | None, *, commas: bool = False) -> list[str]:
    """A partition may be a comma list (SLURM takes the first that can run the job)."""
    if value is None:
        return []
    parts = value.split(",") if commas else [value]
    if any(not part or _UNSAFE & set(part) or "," in part for part in parts):
        kind = "SLURM names separated by commas" if commas else "one SLURM name"
        return [f"{what} must be {kind}, without spaces or quotes, got {value!r}"]
    return []
