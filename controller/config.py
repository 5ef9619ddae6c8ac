"""Controller settings, read once from the environment and validated at start.

pfcon's variable names are kept wherever pfcon has one, so an existing pfcon
deployment's environment works unchanged; settings pfcon lacks start with
``PFLEET_``.  ``load_config`` collects every problem and raises one ``ConfigError``
naming each bad variable, so an operator fixes them all in one go.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from controller.errors import ConfigError

DEV_SECRET_KEY = "pfleet-dev-secret-key-not-for-production"
DEV_USER = "pfcon"
DEV_PASSWORD = "pfcon1234"

StorageEnv = Literal["zipfile", "filesystem", "fslink", "swift"]
INNETWORK_STORAGES = ("swift", "filesystem", "fslink")
CONTAINER_ENVS = ("docker", "podman", "swarm", "kubernetes")
VOLUME_TYPES_BY_ENV = {
    "docker": ("host", "docker_local_volume"),
    "podman": ("host", "docker_local_volume"),
    "swarm": ("host",),
    "kubernetes": ("kubernetes_pvc",),
}

# (variable, Config field, dev default): pfcon's names and dev values
SWIFT_SETTINGS = (
    ("SWIFT_AUTH_URL", "swift_auth_url", "http://swift_service:8080/auth/v1.0"),
    ("SWIFT_USERNAME", "swift_username", "chris:chris1234"),
    ("SWIFT_KEY", "swift_key", "testing"),
    ("SWIFT_CONTAINER_NAME", "swift_container", "users"),
)

WILDCARD_HOSTS = ("0.0.0.0", "::", "")

_TRUE = {"1", "true", "t", "yes", "y", "on"}
_FALSE = {"0", "false", "f", "no", "n", "off"}


@dataclass(frozen=True)
class Config:
    dev: bool = False
    secret_key: str = DEV_SECRET_KEY
    pfcon_user: str = DEV_USER
    pfcon_password: str = DEV_PASSWORD
    innetwork: bool = False
    storage_env: str = "zipfile"
    storebase_mount: Path = Path("/var/local/storeBase")
    container_env: str = "docker"
    compute_volume_type: str = "host"
    job_logs_tail: int = 1000
    remove_jobs: bool = True
    listen_host: str = "0.0.0.0"
    listen_port: int = 30005
    state_dir: Path = Path("/var/lib/pfleet")
    max_files: int = 100_000
    max_upload_mb: int = 10_240
    agent_lease: float = 600.0
    heartbeat_interval: float = 5.0
    placement: str = "spread"
    agent_selector: dict[str, str] = field(default_factory=dict)
    swift_auth_url: str = ""
    swift_username: str = ""
    swift_key: str = ""
    swift_container: str = ""
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    zeroconf: bool = False
    zeroconf_interfaces: tuple[str, ...] = ()
    server_version: str = "0.0.0+unknown"

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def agent_secret(self) -> str:
        """Key for agent tokens: derived from SECRET_KEY, never equal to it, so a
        client token can never pass as an agent token or the reverse."""
        return "pfleet-agent:" + self.secret_key

    @property
    def requires_copy_job(self) -> bool:
        return self.innetwork and self.storage_env in ("fslink", "swift")

    @property
    def requires_upload_job(self) -> bool:
        return self.innetwork and self.storage_env == "swift"


def parse_bool(value: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError(f"not a boolean: {value!r} (use true/false, yes/no, 1/0, on/off)")


def parse_labels(value: str) -> dict[str, str]:
    """``k=v,k2=v2`` (pfcon's JOB_LABELS form)."""
    out: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        key, sep, val = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"expected key=value, got {item!r}")
        out[key.strip()] = val.strip()
    return out


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    port_num = int(port)
    if not 0 <= port_num <= 65535:
        raise ValueError(f"port out of range in {value!r}")
    return host.strip("[]"), port_num


def _is_ipv4(value: str) -> bool:
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        return False
    return True


def parse_ipv4_list(value: str) -> tuple[str, ...]:
    """``198.51.100.10,198.51.100.11``: local IPv4 addresses (zeroconf advertises on IPv4
    only)."""
    out: list[str] = []
    for item in filter(None, (part.strip() for part in value.split(","))):
        try:
            out.append(str(ipaddress.IPv4Address(item)))
        except ValueError:
            raise ValueError(f"not an IPv4 address: {item!r}") from None
    return tuple(out)


def server_ssl_context(config: Config) -> ssl.SSLContext | None:
    """The listener's TLS context (TLS 1.2 or later), or None without TLS.

    With ``tls_client_ca`` the server asks every client for a certificate but does not
    insist (``CERT_OPTIONAL``): a certificate that is presented must chain to that CA
    or the handshake fails, and the agent endpoint refuses a connection without one.
    The pfcon API stays usable by CUBE, which has no client certificate.
    """
    if config.tls_cert is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(config.tls_cert, config.tls_key, password=_no_password)
    if config.tls_client_ca is not None:
        context.load_verify_locations(cafile=config.tls_client_ca)
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def _no_password() -> bytes:
    """An encrypted key fails to load instead of prompting on the terminal."""
    return b""


def _load_tls(env: Mapping[str, str], values: dict[str, object], problems: list[str]) -> None:
    """PFLEET_TLS_CERT and PFLEET_TLS_KEY (both or neither), PFLEET_TLS_CLIENT_CA: the
    files must exist and load, so a broken file stops the start, not the first client."""
    cert, key = env.get("PFLEET_TLS_CERT") or "", env.get("PFLEET_TLS_KEY") or ""
    client_ca = env.get("PFLEET_TLS_CLIENT_CA") or ""
    if not cert and not key:
        if client_ca:
            problems.append("PFLEET_TLS_CLIENT_CA: needs TLS (set PFLEET_TLS_CERT and "
                            "PFLEET_TLS_KEY)")
        return
    if not cert or not key:
        missing = "PFLEET_TLS_KEY" if cert else "PFLEET_TLS_CERT"
        problems.append(f"{missing}: PFLEET_TLS_CERT and PFLEET_TLS_KEY go together "
                        f"(set both or neither)")
        return
    ok = True
    for name, path in (("PFLEET_TLS_CERT", cert), ("PFLEET_TLS_KEY", key),
                       ("PFLEET_TLS_CLIENT_CA", client_ca)):
        if path and not Path(path).is_file():
            problems.append(f"{name}: no such file: {path}")
            ok = False
    if not ok:
        return
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except (ssl.SSLError, OSError) as exc:
        problems.append(f"PFLEET_TLS_CERT / PFLEET_TLS_KEY: cannot load {cert} with key {key} "
                        f"(PEM certificate and matching unencrypted PEM key expected): {exc}")
        ok = False
    if client_ca:
        try:
            context.load_verify_locations(cafile=client_ca)
        except (ssl.SSLError, OSError) as exc:
            problems.append(f"PFLEET_TLS_CLIENT_CA: cannot load {client_ca} "
                            f"(PEM CA certificates expected): {exc}")
            ok = False
    if ok:
        values["tls_cert"], values["tls_key"] = Path(cert), Path(key)
        values["tls_client_ca"] = Path(client_ca) if client_ca else None


def load_config(env: Mapping[str, str] | None = None, *, dev: bool = False) -> Config:
    """Build the controller's Config from ``env`` (default: os.environ).

    ``dev`` (the ``--dev`` flag) or ``PFLEET_DEV`` selects development mode: the
    documented dev credentials apply when the variables are absent.
    """
    env = dict(os.environ if env is None else env)
    problems: list[str] = []
    values: dict[str, object] = {}

    def get_bool(name: str, default: bool) -> bool:
        raw = env.get(name)
        if raw is None or raw == "":
            return default
        try:
            return parse_bool(raw)
        except ValueError as exc:
            problems.append(f"{name}: {exc}")
            return default

    def get_number(name: str, default: float, minimum: float, kind: type = int) -> Any:
        raw = env.get(name)
        if raw is None or raw == "":
            return default
        try:
            number = kind(raw)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            problems.append(f"{name}: not {what}: {raw!r}")
            return default
        if number < minimum:
            problems.append(f"{name}: must be at least {minimum}, got {number}")
        return number

    def get_int(name: str, default: int, minimum: int = 0) -> int:
        return int(get_number(name, default, minimum, int))

    def get_float(name: str, default: float, minimum: float) -> float:
        return float(get_number(name, default, minimum, float))

    is_dev = dev or get_bool("PFLEET_DEV", False)
    values["dev"] = is_dev
    for name, attr, dev_default in (("SECRET_KEY", "secret_key", DEV_SECRET_KEY),
                                    ("PFCON_USER", "pfcon_user", DEV_USER),
                                    ("PFCON_PASSWORD", "pfcon_password", DEV_PASSWORD)):
        value = env.get(name, "")
        if value:
            values[attr] = value
        elif is_dev:
            values[attr] = dev_default
        else:
            problems.append(f"{name}: required outside dev mode (set it, or run with --dev "
                            "/ PFLEET_DEV=1 for the documented dev credentials)")

    innetwork = get_bool("PFCON_INNETWORK", False)
    values["innetwork"] = innetwork
    storage = env.get("STORAGE_ENV") or ("swift" if innetwork else "zipfile")
    if innetwork and storage not in INNETWORK_STORAGES:
        problems.append(f"STORAGE_ENV: in-network mode (PFCON_INNETWORK=true) needs one of "
                        f"{', '.join(INNETWORK_STORAGES)}, got {storage!r}")
    elif not innetwork and storage != "zipfile":
        problems.append(f"STORAGE_ENV: out-of-network mode supports only 'zipfile', got "
                        f"{storage!r} (set PFCON_INNETWORK=true for in-network storage)")
    values["storage_env"] = storage
    if innetwork and storage == "swift":
        for name, attr, dev_default in SWIFT_SETTINGS:
            value = env.get(name, "")
            if value:
                values[attr] = value
            elif is_dev:
                values[attr] = dev_default
            else:
                problems.append(f"{name}: required with STORAGE_ENV=swift outside dev mode")

    container_env = env.get("CONTAINER_ENV") or "docker"
    if container_env not in CONTAINER_ENVS:
        problems.append(f"CONTAINER_ENV: must be one of {', '.join(CONTAINER_ENVS)}, "
                        f"got {container_env!r}")
        container_env = "docker"
    values["container_env"] = container_env
    allowed_volumes = VOLUME_TYPES_BY_ENV[container_env]
    volume_type = env.get("COMPUTE_VOLUME_TYPE") or allowed_volumes[0]
    if volume_type not in allowed_volumes:
        problems.append(f"COMPUTE_VOLUME_TYPE: {container_env} supports "
                        f"{', '.join(allowed_volumes)}, got {volume_type!r}")
    values["compute_volume_type"] = volume_type

    values["storebase_mount"] = Path(env.get("STOREBASE_MOUNT") or "/var/local/storeBase")
    values["state_dir"] = Path(env.get("PFLEET_STATE_DIR") or "/var/lib/pfleet")
    values["job_logs_tail"] = get_int("JOB_LOGS_TAIL", 1000, minimum=0)
    values["remove_jobs"] = get_bool("REMOVE_JOBS", True)
    values["max_files"] = get_int("PFLEET_MAX_FILES", 100_000, minimum=1)
    values["max_upload_mb"] = get_int("PFLEET_MAX_UPLOAD_MB", 10_240, minimum=1)
    values["agent_lease"] = get_float("PFLEET_AGENT_LEASE", 600.0, minimum=1.0)
    values["heartbeat_interval"] = get_float("PFLEET_HEARTBEAT_INTERVAL", 5.0, minimum=0.1)
    values["placement"] = env.get("PFLEET_PLACEMENT") or "spread"
    if values["placement"] not in ("spread", "binpack"):
        problems.append(f"PFLEET_PLACEMENT: must be spread or binpack, got "
                        f"{values['placement']!r}")
    try:
        values["agent_selector"] = parse_labels(env.get("PFLEET_AGENT_SELECTOR") or "")
    except ValueError as exc:
        problems.append(f"PFLEET_AGENT_SELECTOR: {exc}")
    try:
        values["listen_host"], values["listen_port"] = parse_listen(
            env.get("PFLEET_LISTEN") or "0.0.0.0:30005")
    except ValueError as exc:
        problems.append(f"PFLEET_LISTEN: {exc}")

    _load_tls(env, values, problems)
    values["zeroconf"] = get_bool("PFLEET_ZEROCONF", False)
    try:
        values["zeroconf_interfaces"] = parse_ipv4_list(env.get("PFLEET_ZEROCONF_INTERFACES")
                                                        or "")
    except ValueError as exc:
        problems.append(f"PFLEET_ZEROCONF_INTERFACES: {exc}")
    else:
        listen = str(values.get("listen_host", ""))
        if (values["zeroconf"] and not values["zeroconf_interfaces"]
                and listen not in WILDCARD_HOSTS and not _is_ipv4(listen)):
            problems.append(f"PFLEET_ZEROCONF_INTERFACES: required with PFLEET_ZEROCONF when "
                            f"PFLEET_LISTEN's host is not an IPv4 address (got {listen!r})")

    if problems:
        raise ConfigError(problems)
    values["server_version"] = _installed_version()
    return Config(**values)  # type: ignore[arg-type]


def _installed_version() -> str:
    try:
        from importlib.metadata import version

        return version("pfleet")
    except Exception:  # a source checkout without metadata is normal
        return "0.0.0+unknown"
