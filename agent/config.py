"""Agent settings: a TOML file (default ``/etc/pfleet/agent.toml``) with environment
overrides.  Runtime settings keep pfcon's names (``CONTAINER_ENV``, ``STOREBASE``,
``CONTAINER_USER``, ...) so a pfcon host's environment carries over; the rest start
with ``PFLEET_``.  In the TOML file every key is the lower-case environment name
without the ``PFLEET_``/``PFLEET_AGENT_`` prefix (see ``agent.toml.example``).

``load_agent_config`` collects every problem and raises one ``AgentConfigError``.
"""

from __future__ import annotations

import os
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from agent.runtimes.slurm_config import LAUNCHERS, parse_rules

DEFAULT_CONFIG_PATH = Path("/etc/pfleet/agent.toml")
RUNTIMES = ("docker", "podman", "swarm", "kubernetes", "slurm", "fake")
VOLUME_TYPES = ("host", "docker_local_volume", "kubernetes_pvc")
# Volume types each runtime can mount (the first is its default), as pfcon allows.
RUNTIME_VOLUME_TYPES = {"swarm": ("host",), "kubernetes": ("kubernetes_pvc",),
                        "slurm": ("host",)}

_TRUE = {"1", "true", "t", "yes", "y", "on"}
_FALSE = {"0", "false", "f", "no", "n", "off"}


class AgentConfigError(Exception):
    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid agent configuration:\n  - " + "\n  - ".join(problems))


@dataclass(frozen=True)
class AgentConfig:
    name: str
    controller_url: str  # ws(s)://host:port/api/v1/fleet/connect ("" = discover: zeroconf)
    token: str
    state_dir: Path
    runtime: str = "docker"
    docker_host: str | None = None
    compute_volume_type: str = "host"
    storebase: str = "/var/local/storeBase"  # host path the engine binds from
    storebase_mount: Path = Path("/var/local/storeBase")  # the agent's own view of it
    volume_name: str | None = None
    container_user: str | None = None
    job_labels: dict[str, str] = field(default_factory=dict)
    ignore_limits: bool = False
    shm_size_mib: int | None = None
    enable_home_workaround: bool = False
    remove_jobs: bool = True
    labels: dict[str, str] = field(default_factory=dict)
    health_listen: str = "127.0.0.1:30006"  # "" disables the local /health endpoint
    cpu_millicores: int | None = None  # capacity overrides (default: what the engine has)
    memory_mib: int | None = None
    gpus: int = 0
    poll_interval: float = 5.0
    min_free_mib: int = 1024
    ca_file: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    found_by: str = "configured"
    job_namespace: str = "default"  # kubernetes: where the Jobs go
    node_selector: dict[str, str] = field(default_factory=dict)
    image_pull_secrets: str | None = None  # kubernetes: comma-separated secret names
    kubeconfig: str | None = None  # kubernetes: unset = in-cluster, else ~/.kube/config
    kubernetes_context: str | None = None
    kubernetes_job_ttl: int = 86_400  # seconds a finished Job is kept
    kubernetes_active_deadline: int = 604_800  # seconds a Job may run (0: no limit)
    slurm_launcher: str = "docker"  # slurm: docker, podman, charliecloud, apptainer, none
    slurm_partition: str | None = None
    slurm_account: str | None = None
    slurm_qos: str | None = None
    timelimit_minutes: int | None = None  # slurm --time (pfcon's TIMELIMIT_MINUTES)
    slurm_rules: tuple[Any, ...] = ()  # slurm: SlurmRule, chosen by image glob
    slurm_image_dir: str | None = None  # slurm: charliecloud/apptainer images
    slurm_work_dir: Path | None = None  # slurm: scripts and output (default <state>/slurm)
    slurm_command_timeout: float = 10.0  # slurm: seconds per sbatch/squeue/... call


# (field, environment name, TOML key, kind)
_SETTINGS: tuple[tuple[str, str, str, str], ...] = (
    ("name", "PFLEET_AGENT_NAME", "name", "str"),
    ("controller_url", "PFLEET_CONTROLLER_URL", "controller_url", "str"),
    ("token", "PFLEET_AGENT_TOKEN", "token", "str"),
    ("token_file", "PFLEET_AGENT_TOKEN_FILE", "token_file", "str"),
    ("state_dir", "PFLEET_AGENT_STATE_DIR", "state_dir", "path"),
    ("runtime", "CONTAINER_ENV", "container_env", "str"),
    ("docker_host", "DOCKER_HOST", "docker_host", "str"),
    ("compute_volume_type", "COMPUTE_VOLUME_TYPE", "compute_volume_type", "str"),
    ("storebase", "STOREBASE", "storebase", "str"),
    ("storebase_mount", "STOREBASE_MOUNT", "storebase_mount", "path"),
    ("volume_name", "VOLUME_NAME", "volume_name", "str"),
    ("container_user", "CONTAINER_USER", "container_user", "str"),
    ("job_labels", "JOB_LABELS", "job_labels", "labels"),
    ("ignore_limits", "IGNORE_LIMITS", "ignore_limits", "bool"),
    ("shm_size_mib", "SHM_SIZE", "shm_size", "int"),
    ("enable_home_workaround", "ENABLE_HOME_WORKAROUND", "enable_home_workaround", "bool"),
    ("remove_jobs", "REMOVE_JOBS", "remove_jobs", "bool"),
    ("labels", "PFLEET_AGENT_LABELS", "labels", "labels"),
    ("health_listen", "PFLEET_HEALTH_LISTEN", "health_listen", "str_or_empty"),
    ("cpu_millicores", "PFLEET_AGENT_CPU_MILLICORES", "cpu_millicores", "int"),
    ("memory_mib", "PFLEET_AGENT_MEMORY_MIB", "memory_mib", "int"),
    ("gpus", "PFLEET_AGENT_GPUS", "gpus", "int"),
    ("poll_interval", "PFLEET_AGENT_POLL_INTERVAL", "poll_interval", "float"),
    ("min_free_mib", "PFLEET_AGENT_MIN_FREE_MIB", "min_free_mib", "int"),
    ("ca_file", "PFLEET_CA_FILE", "ca_file", "str"),
    ("client_cert", "PFLEET_CLIENT_CERT", "client_cert", "str"),
    ("client_key", "PFLEET_CLIENT_KEY", "client_key", "str"),
    ("job_namespace", "JOB_NAMESPACE", "job_namespace", "str"),
    ("node_selector", "NODE_SELECTOR", "node_selector", "labels"),
    ("image_pull_secrets", "IMAGE_PULL_SECRETS", "image_pull_secrets", "str"),
    ("kubeconfig", "KUBECONFIG", "kubeconfig", "str"),
    ("kubernetes_context", "PFLEET_KUBERNETES_CONTEXT", "kubernetes_context", "str"),
    ("kubernetes_job_ttl", "PFLEET_KUBERNETES_JOB_TTL", "kubernetes_job_ttl", "int"),
    ("kubernetes_active_deadline", "PFLEET_KUBERNETES_ACTIVE_DEADLINE",
     "kubernetes_active_deadline", "int"),
    ("slurm_launcher", "PFLEET_SLURM_LAUNCHER", "slurm_launcher", "str"),
    ("slurm_partition", "PFLEET_SLURM_PARTITION", "slurm_partition", "str"),
    ("slurm_account", "PFLEET_SLURM_ACCOUNT", "slurm_account", "str"),
    ("slurm_qos", "PFLEET_SLURM_QOS", "slurm_qos", "str"),
    ("timelimit_minutes", "TIMELIMIT_MINUTES", "timelimit_minutes", "int"),
    ("slurm_rules", "PFLEET_SLURM_RULES", "slurm_rules", "slurm_rules"),
    ("slurm_image_dir", "PFLEET_SLURM_IMAGE_DIR", "slurm_image_dir", "str"),
    ("slurm_work_dir", "PFLEET_SLURM_WORK_DIR", "slurm_work_dir", "path"),
    ("slurm_command_timeout", "PFLEET_SLURM_COMMAND_TIMEOUT", "slurm_command_timeout",
     "float"),
)


def parse_labels(value: str) -> dict[str, str]:
    """``k=v,k2=v2`` (pfcon's JOB_LABELS form)."""
    out: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        key, sep, val = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"expected key=value, got {item!r}")
        out[key.strip()] = val.strip()
    return out


def connect_url(url: str) -> str:
    """Accept the controller's base URL (http[s]://host:port[/api/v1/]) or the full
    WebSocket URL; return the WebSocket URL of ``/api/v1/fleet/connect``."""
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise ValueError(f"expected http(s):// or ws(s):// URL, got {url!r}")
    path = parts.path
    if not path.rstrip("/").endswith("/fleet/connect"):
        path = "/api/v1/fleet/connect"
    return urlunsplit((scheme, parts.netloc, path.rstrip("/"), "", ""))


def load_agent_config(path: Path | None = None, env: Mapping[str, str] | None = None,
                      **overrides: Any) -> AgentConfig:
    env = dict(os.environ if env is None else env)
    problems: list[str] = []
    file_values: dict[str, Any] = {}
    config_path = path or (Path(env["PFLEET_AGENT_CONFIG"]) if env.get("PFLEET_AGENT_CONFIG")
                           else DEFAULT_CONFIG_PATH)
    if config_path.exists():
        try:
            file_values = tomllib.loads(config_path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            problems.append(f"{config_path}: {exc}")
    elif path is not None:
        problems.append(f"{config_path}: no such file")

    raw: dict[str, Any] = {}
    for attr, env_name, toml_key, kind in _SETTINGS:
        value: Any = env.get(env_name)
        where = env_name
        unset = (None,) if kind == "str_or_empty" else (None, "")  # "" may mean "off"
        if value in unset:
            value = file_values.get(toml_key)
            where = f"{config_path.name}:{toml_key}"
        if value in unset:
            continue
        try:
            raw[attr] = _convert(value, kind)
        except (TypeError, ValueError) as exc:
            problems.append(f"{where}: {exc}")
    unknown = set(file_values) - {t for _, _, t, _ in _SETTINGS}
    if unknown:
        problems.append(f"{config_path}: unknown keys {sorted(unknown)}")
    raw.update({k: v for k, v in overrides.items() if v is not None})

    token_file = raw.pop("token_file", None)
    if "token" not in raw and token_file:
        try:
            raw["token"] = Path(token_file).read_text().strip()
        except OSError as exc:
            problems.append(f"PFLEET_AGENT_TOKEN_FILE: cannot read {token_file}: {exc}")
    raw.setdefault("name", socket.gethostname().split(".")[0])
    raw.setdefault("state_dir", Path("/var/lib/pfleet-agent"))
    if not raw.get("token"):
        problems.append("PFLEET_AGENT_TOKEN / PFLEET_AGENT_TOKEN_FILE: an agent token is "
                        "required (make one with `pfleet token create NAME`)")
    if raw.get("controller_url"):
        try:
            raw["controller_url"] = connect_url(raw["controller_url"])
        except ValueError as exc:
            problems.append(f"PFLEET_CONTROLLER_URL: {exc}")
    else:
        raw["controller_url"] = ""
    runtime = raw.get("runtime", "docker")
    if runtime not in RUNTIMES:
        problems.append(f"CONTAINER_ENV: must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    allowed = RUNTIME_VOLUME_TYPES.get(runtime, ("host", "docker_local_volume"))
    volume_type = raw.setdefault("compute_volume_type", allowed[0])
    if volume_type not in VOLUME_TYPES:
        problems.append(f"COMPUTE_VOLUME_TYPE: must be one of {', '.join(VOLUME_TYPES)}, "
                        f"got {volume_type!r}")
    elif volume_type not in allowed and runtime in RUNTIMES:
        problems.append(f"COMPUTE_VOLUME_TYPE: CONTAINER_ENV={runtime} supports "
                        f"{', '.join(allowed)}, got {volume_type!r}")
    if volume_type in ("docker_local_volume", "kubernetes_pvc") and not raw.get("volume_name"):
        problems.append(f"VOLUME_NAME: required with COMPUTE_VOLUME_TYPE={volume_type}")
    if "storebase" in raw and "storebase_mount" not in raw:
        raw["storebase_mount"] = Path(raw["storebase"])
    if "storebase_mount" in raw and "storebase" not in raw:
        raw["storebase"] = str(raw["storebase_mount"])
    for attr, env_name in (("ca_file", "PFLEET_CA_FILE"), ("client_cert", "PFLEET_CLIENT_CERT"),
                           ("client_key", "PFLEET_CLIENT_KEY")):
        if raw.get(attr) and not Path(raw[attr]).is_file():
            problems.append(f"{env_name}: no such file: {raw[attr]}")
    if raw.get("client_key") and not raw.get("client_cert"):
        problems.append("PFLEET_CLIENT_KEY: needs PFLEET_CLIENT_CERT")
    if runtime == "slurm":
        problems += _slurm_problems(raw)
    if raw.get("poll_interval", 5.0) <= 0:
        problems.append("PFLEET_AGENT_POLL_INTERVAL: must be positive")
    if problems:
        raise AgentConfigError(problems)
    return AgentConfig(**raw)


def _convert(value: Any, kind: str) -> Any:
    if kind in ("str", "str_or_empty"):
        return str(value)
    if kind == "path":
        return Path(str(value))
    if kind == "int":
        if isinstance(value, bool):
            raise ValueError(f"not an integer: {value!r}")
        number = int(value)
        if number < 0:
            raise ValueError(f"must not be negative: {number}")
        return number
    if kind == "float":
        return float(value)
    if kind == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ValueError(f"not a boolean: {value!r}")
    if kind == "labels":
        if isinstance(value, dict):
            return {str(k): str(v) for k, v in value.items()}
        return parse_labels(str(value))
    if kind == "slurm_rules":
        return parse_rules(value)
    raise AssertionError(kind)


def _slurm_problems(raw: dict[str, Any]) -> list[str]:
    launcher = raw.get("slurm_launcher", "docker")
    if launcher not in LAUNCHERS:
        return [f"PFLEET_SLURM_LAUNCHER: must be one of {', '.join(LAUNCHERS)}, "
                f"got {launcher!r}"]
    if launcher == "charliecloud" and not raw.get("slurm_image_dir"):
        return ["PFLEET_SLURM_IMAGE_DIR: required with PFLEET_SLURM_LAUNCHER=charliecloud "
                "(ch-run runs directory images)"]
    if raw.get("slurm_command_timeout", 10.0) <= 0:
        return ["PFLEET_SLURM_COMMAND_TIMEOUT: must be positive"]
    return []
