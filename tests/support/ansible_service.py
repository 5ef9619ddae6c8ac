#!/usr/bin/python3
"""Stand-in for systemd inside the Ansible test hosts (containers without systemd).

Bind-mounted read-only into every target container as ``/usr/local/sbin/pfleet-test-service``
and used in two ways:

* as the container's PID 1 (``init``): reaps orphans, exits on SIGTERM;
* as the roles' service command (``<role>_service_manager: command``), with systemctl's
  argument order: ``pfleet-test-service start|restart|stop|status|show UNIT``.

pfleet's own units run **exactly the ExecStart line of the rendered unit file**, with its
User/Group, Environment, EnvironmentFile, WorkingDirectory, UMask and RuntimeDirectory, in
a clean environment, and only the main PID is signalled on stop (KillMode=process, as
the agent's unit sets). Lines needing systemd's ``$VAR`` or ``%`` expansion are refused
rather than run differently. The engines' and munge's units need what only systemd
provides (socket activation: ``-H fd://``, ``podman.socket``; a forking daemon; ``$OPTIONS``):
their daemons run in the foreground instead, with the unit's user (``FOREGROUND`` below).

``start`` prints ``started PID`` when it started the service, ``running PID`` when it
already ran; ``status`` exits 0 when running, 3 otherwise. Stdlib only (runs on the
target's python3).
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shlex
import signal
import sys
import time
from pathlib import Path

RUN_DIR = Path("/run/pfleet-test-service")
LOG_DIR = Path("/var/log/pfleet-test-service")
UNIT_DIRS = (Path("/etc/systemd/system"), Path("/lib/systemd/system"),
             Path("/usr/lib/systemd/system"))
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
STOP_TIMEOUT = 30.0

# Units whose ExecStart only systemd can run (socket activation, a forking daemon, $VAR
# expansion): the daemon in the foreground, with the unit's user and environment.
FOREGROUND = {
    "docker": ["/usr/sbin/dockerd"],
    "podman.socket": ["/usr/bin/podman", "system", "service", "--time=0",
                      "unix:///run/podman/podman.sock"],
    "munge": ["/usr/sbin/munged", "--foreground"],
}
# What systemd would create for those (a socket unit's listening directory).
FOREGROUND_RUNTIME_DIRS = {"podman.socket": ["podman"]}


class UnitError(Exception):
    pass


def unit_path(unit: str) -> Path:
    name = unit if "." in unit else unit + ".service"
    for d in UNIT_DIRS:
        if (d / name).is_file():
            return d / name
    raise UnitError(f"no unit file for {unit} in {', '.join(map(str, UNIT_DIRS))}")


def parse_unit(text: str) -> dict[str, list[str]]:
    """The [Service] section: key -> every value given, in order."""
    section = ""
    values: dict[str, list[str]] = {}
    logical: list[str] = []
    buffered = ""
    for raw in text.splitlines():
        if buffered:
            raw = buffered + " " + raw.lstrip()
            buffered = ""
        if raw.endswith("\\"):
            buffered = raw[:-1]
            continue
        logical.append(raw)
    for line in logical:
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        if section != "Service" or "=" not in line:
            continue
        key, _, value = line.partition("=")
        values.setdefault(key.strip(), []).append(value.strip())
    return values


def parse_env_file(text: str) -> dict[str, str]:
    """systemd EnvironmentFile: KEY=VALUE, VALUE optionally in double quotes with
    backslash escapes or in single quotes."""
    env: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise UnitError(f"bad EnvironmentFile line: {raw!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == "'":
            value = value[1:-1]
        elif len(value) >= 2 and value[0] == value[-1] == '"':
            out, i, inner = [], 0, value[1:-1]
            while i < len(inner):
                if inner[i] == "\\" and i + 1 < len(inner):
                    i += 1
                out.append(inner[i])
                i += 1
            value = "".join(out)
        env[key.strip()] = value
    return env


def service_of(unit: str) -> dict[str, object]:
    """What the unit runs: argv, user, group, environment, working directory, umask and
    runtime directories (``/run/<name>``, made for it as systemd would)."""
    try:
        path: Path | None = unit_path(unit)
    except UnitError:
        if unit not in FOREGROUND:
            raise
        path = None
    values = parse_unit(path.read_text()) if path is not None and path.suffix == ".service" \
        else {}
    if unit in FOREGROUND:
        argv = FOREGROUND[unit]
    else:
        starts = values.get("ExecStart", [])
        if len(starts) != 1:
            raise UnitError(f"{path}: expected one ExecStart line, found {len(starts)}")
        line = starts[0].lstrip("@-:+!")
        if "$" in line or "%" in line:
            raise UnitError(f"{path}: ExecStart needs systemd's expansion: {line!r}")
        argv = shlex.split(line)
    env: dict[str, str] = {}
    for item in values.get("Environment", []):
        for assignment in shlex.split(item):
            key, _, value = assignment.partition("=")
            env[key] = value
    for item in values.get("EnvironmentFile", []):
        optional = item.startswith("-")
        file = Path(item.lstrip("-"))
        if not file.is_file():
            if optional:
                continue
            raise UnitError(f"{path}: EnvironmentFile {file} is missing")
        env.update(parse_env_file(file.read_text()))
    return {"argv": argv, "user": (values.get("User") or ["root"])[-1],
            "group": (values.get("Group") or [""])[-1], "env": env,
            "workdir": (values.get("WorkingDirectory") or ["/"])[-1].lstrip("-"),
            "umask": int((values.get("UMask") or ["0022"])[-1], 8),
            "runtime_dirs": " ".join(values.get("RuntimeDirectory", [])).split()
            + FOREGROUND_RUNTIME_DIRS.get(unit, []),
            "runtime_mode": int((values.get("RuntimeDirectoryMode") or ["0755"])[-1], 8),
            "exact": unit not in FOREGROUND, "unit_file": str(path or "")}


def pid_file(unit: str) -> Path:
    return RUN_DIR / f"{unit}.pid"


def running_pid(unit: str) -> int | None:
    try:
        pid = int(pid_file(unit).read_text())
    except (OSError, ValueError):
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return None if stat.rsplit(")", 1)[1].split()[0] == "Z" else pid


def start(unit: str) -> int:
    pid = running_pid(unit)
    if pid is not None:
        print(f"running {pid}")
        return 0
    service = service_of(unit)
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    user = pwd.getpwnam(str(service["user"]))
    gid = grp.getgrnam(str(service["group"])).gr_gid if service["group"] else user.pw_gid
    env = {"PATH": DEFAULT_PATH, "LANG": "C.UTF-8"}
    if user.pw_uid != 0:
        env.update(HOME=user.pw_dir, USER=user.pw_name, LOGNAME=user.pw_name)
    env.update(service["env"])  # type: ignore[arg-type]
    for name in service["runtime_dirs"]:  # type: ignore[attr-defined]
        directory = Path("/run") / name
        directory.mkdir(parents=True, exist_ok=True)
        os.chown(directory, user.pw_uid, gid)
        directory.chmod(int(service["runtime_mode"]))  # type: ignore[call-overload]
    argv = list(service["argv"])  # type: ignore[call-overload]
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # the service
        try:
            os.close(read_end)
            os.set_inheritable(write_end, False)
            os.setsid()
            log = os.open(LOG_DIR / f"{unit}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(log, 1)
            os.dup2(log, 2)
            os.chdir(str(service["workdir"]))
            os.umask(int(service["umask"]))  # type: ignore[call-overload]
            if user.pw_uid != 0:
                os.initgroups(user.pw_name, gid)
                os.setgid(gid)
                os.setuid(user.pw_uid)
            os.execve(argv[0], argv, env)
        except BaseException as exc:  # report to the parent, never return into it
            os.write(write_end, f"{type(exc).__name__}: {exc}".encode())
        finally:
            os._exit(127)
    os.close(write_end)
    error = os.read(read_end, 4096).decode()  # EOF at exec (close-on-exec)
    os.close(read_end)
    if error:
        print(f"{unit}: cannot start {argv[0]}: {error}", file=sys.stderr)
        return 1
    pid_file(unit).write_text(f"{child}\n")
    print(f"started {child}")
    return 0


def stop(unit: str) -> int:
    pid = running_pid(unit)
    if pid is None:
        print("stopped")
        return 0
    os.kill(pid, signal.SIGTERM)  # the main PID only (KillMode=process)
    deadline = time.monotonic() + STOP_TIMEOUT
    while running_pid(unit) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    if running_pid(unit) is not None:
        os.kill(pid, signal.SIGKILL)
        for _ in range(50):
            if running_pid(unit) is None:
                break
            time.sleep(0.1)
    pid_file(unit).unlink(missing_ok=True)
    print(f"stopped {pid}")
    return 0


def init() -> int:
    """PID 1 of the container: reap every orphan until SIGTERM."""
    stopping = False

    def on_term(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    while not stopping:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            pid = 0
        if pid == 0:
            time.sleep(0.2)
    return 0


def main(argv: list[str]) -> int:
    if argv == ["init"]:
        return init()
    if len(argv) != 2 or argv[0] not in ("start", "restart", "stop", "status", "show"):
        print("usage: pfleet-test-service init | start|restart|stop|status|show UNIT",
              file=sys.stderr)
        return 2
    action, unit = argv
    try:
        if action == "start":
            return start(unit)
        if action == "stop":
            return stop(unit)
        if action == "restart":
            stop(unit)
            return start(unit)
        if action == "show":
            service = service_of(unit)
            service["env"] = sorted(service["env"])  # type: ignore[call-overload]
            print(json.dumps({**service, "pid": running_pid(unit)}))
            return 0
        pid = running_pid(unit)
        print(f"running {pid}" if pid else "stopped")
        return 0 if pid else 3
    except (UnitError, OSError, KeyError) as exc:
        print(f"pfleet-test-service: {unit}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
