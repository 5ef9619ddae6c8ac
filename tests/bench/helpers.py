"""Shared pieces of the benchmarks: a controller deployment, an HTTP client for the
pfcon API, /proc readings, statistics, and the printed result tables.

Nothing here asserts a timing: a benchmark fails only when what it measures did
not work (a job failed, a request was refused).
"""

from __future__ import annotations

import io
import json
import math
import os
import statistics
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import requests

from tests.conftest import free_port
from tests.support.engines import Engine
from tests.support.processes import ControllerProc, controller_proc

# Controller log level for the benchmarks (INFO logs a few lines per job).
LOG_LEVEL = os.environ.get("PFLEET_BENCH_LOG_LEVEL", "WARNING")
TERMINAL_STATUSES = ("finishedSuccessfully", "finishedWithError", "undefined")
HTTP_TIMEOUT = 60.0


# ------------------------------------------------------------------ deployment


def engine_env(engine: Engine, storebase: Path) -> dict[str, str]:
    """The embedded agent's runtime settings (as ``tests/e2e``: host-path storeBase)."""
    return {
        "DOCKER_HOST": engine.url,
        "CONTAINER_ENV": engine.kind,
        "COMPUTE_VOLUME_TYPE": "host",
        "STOREBASE": str(storebase),
        "STOREBASE_MOUNT": str(storebase),
        "PFLEET_AGENT_POLL_INTERVAL": "1",
        # 8 concurrent 1000-millicore jobs must fit on this 2-core machine.
        "PFLEET_AGENT_CPU_MILLICORES": "32000",
        "PFLEET_HEARTBEAT_INTERVAL": "5",
    }


class BenchDeployment:
    """``pfleet-controller --dev --local-agent`` on ``engine``, plus a pfcon client."""

    def __init__(
        self, workdir: Path, engine: Engine, extra_env: dict[str, str] | None = None
    ) -> None:
        self.workdir = workdir
        self.engine = engine
        self.storebase = workdir / "storeBase"
        self.storebase.mkdir(parents=True, exist_ok=True)
        env = {
            **engine_env(engine, self.storebase),
            "PFLEET_HEALTH_LISTEN": f"127.0.0.1:{free_port()}",
            **(extra_env or {}),
        }
        if os.environ.get("PYTHONPATH"):  # e.g. benchmarking another checkout's code
            env.setdefault("PYTHONPATH", os.environ["PYTHONPATH"])
        self.controller: ControllerProc = controller_proc(
            workdir, free_port(), env, local_agent=True, extra_args=["--log-level", LOG_LEVEL]
        )
        self.controller.start()
        try:
            self.controller.wait_ready()
            self.controller.wait_agent("local")
            self.token = self.controller.token()
        except BaseException:
            self.controller.stop()
            raise

    @property
    def base(self) -> str:
        return self.controller.base

    @property
    def pid(self) -> int:
        return self.controller.pid

    @property
    def state_dir(self) -> Path:
        return self.workdir / "state"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def client(self) -> PfconHttp:
        return PfconHttp(self.base, self.token)

    def stop(self) -> None:
        self.controller.stop()


def plugin_descriptors(
    entrypoint: list[str],
    image: str,
    *,
    plugin_type: str = "fs",
    cpu_limit: int = 1000,
    memory_limit: int = 200,
) -> dict[str, Any]:
    return {
        "entrypoint": entrypoint,
        "args": [],
        "auid": "cube",
        "number_of_workers": 1,
        "cpu_limit": cpu_limit,
        "memory_limit": memory_limit,
        "gpu_limit": 0,
        "image": image,
        "type": plugin_type,
    }


def tiny_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("in.txt", b"benchmark input\n")
    return buf.getvalue()


class JobFailed(AssertionError):
    """A job (or request) the benchmark needed did not work: the benchmark fails."""


class PfconHttp:
    """The pfcon v6 calls the benchmarks make, as python-pfconclient makes them
    (multipart form, repeated keys for lists), on one keep-alive session."""

    def __init__(self, base: str, token: str) -> None:
        self.base = base
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"

    def close(self) -> None:
        self.session.close()

    def prepare_submit(
        self, jid: str, descriptors: dict[str, Any], data: bytes
    ) -> requests.PreparedRequest:
        """The POST, fully encoded, so a timer can start right before it is sent."""
        request = requests.Request(
            "POST",
            self.base + "pluginjobs/",
            data={**descriptors, "jid": jid},
            files={"data_file": ("data.zip", data, "application/zip")},
        )
        return self.session.prepare_request(request)

    def send(self, prepared: requests.PreparedRequest) -> requests.Response:
        return self.session.send(prepared, timeout=HTTP_TIMEOUT)

    def submit(self, jid: str, descriptors: dict[str, Any], data: bytes) -> dict[str, Any]:
        response = self.send(self.prepare_submit(jid, descriptors, data))
        if response.status_code != 201:
            raise JobFailed(f"submit {jid}: {response.status_code} {response.text[:300]}")
        return response.json()

    def status(self, jid: str, kind: str = "plugin") -> dict[str, Any]:
        response = self.session.get(f"{self.base}{kind}jobs/{jid}/", timeout=HTTP_TIMEOUT)
        if response.status_code != 200:
            raise JobFailed(f"status {kind} {jid}: {response.status_code} {response.text[:300]}")
        return response.json()["compute"]

    def wait(
        self,
        jid: str,
        *,
        kind: str = "plugin",
        until: tuple[str, ...] = TERMINAL_STATUSES,
        interval: float = 0.2,
        timeout: float = 120.0,
    ) -> dict[str, Any]:
        """Poll (first at once, then every ``interval``) until the status is in ``until``."""
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / max(interval, 0.01)) + 2):
            compute = self.status(jid, kind)
            if compute["status"] in until:
                return compute
            if time.monotonic() >= deadline:
                break
            time.sleep(interval)
        raise JobFailed(f"{kind} job {jid} not in {until} after {timeout:g} s: {compute}")

    def delete_data(self, jid: str, interval: float = 0.2) -> None:
        """POST deletejobs/, wait for it, then DELETE the plugin and delete jobs (CUBE's
        order of calls)."""
        response = self.session.post(
            self.base + "deletejobs/", data={"jid": jid}, timeout=HTTP_TIMEOUT
        )
        if response.status_code != 201:
            raise JobFailed(f"deletejobs {jid}: {response.status_code} {response.text[:300]}")
        if response.json()["compute"]["message"] != "deleteSkipped":
            done = self.wait(jid, kind="delete", interval=interval, timeout=60.0)
            if done["status"] != "finishedSuccessfully":
                raise JobFailed(f"delete job {jid}: {done}")
        self.remove(jid, "plugin")
        self.remove(jid, "delete")

    def remove(self, jid: str, kind: str = "plugin") -> None:
        response = self.session.delete(f"{self.base}{kind}jobs/{jid}/", timeout=HTTP_TIMEOUT)
        if response.status_code != 204:
            raise JobFailed(f"DELETE {kind} {jid}: {response.status_code} {response.text[:300]}")


# ---------------------------------------------------------------------- /proc


def cpu_seconds(pid: int, *, children: bool = False) -> float:
    """User + system CPU time of a process (all its threads) so far; with
    ``children``, plus that of its children it has waited for (e.g. the agent's
    operation workers)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state): utime, stime, cutime, cstime are fields 14-17.
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


def status_kib(pid: int, key: str) -> int:
    """A ``VmXxx`` value of /proc/<pid>/status, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (``echo 5 > clear_refs``); False if refused."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


# ---------------------------------------------------------------- statistics


def median(values: list[float]) -> float:
    return statistics.median(values)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100)."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


# -------------------------------------------------------------------- tables


@dataclass
class Row:
    measure: str
    pfleet: float | None
    baseline: float | None = None
    baseline_name: str = ""
    target: str = ""  # e.g. "<= 1.10x", ">= 2000/s"; empty: information only
    ok: bool | None = None  # PASS / MISS against the target; None: no target
    ratio: float | None = None  # pfleet / baseline unless given
    fmt: str = "{:.1f}"

    def __post_init__(self) -> None:
        if self.ratio is None and self.pfleet is not None and self.baseline:
            self.ratio = self.pfleet / self.baseline


@dataclass
class Report:
    """One benchmark's printed table, and its record in the session's JSON file."""

    number: int
    title: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def add(self, *args: Any, **kwargs: Any) -> Row:
        row = Row(*args, **kwargs)
        self.rows.append(row)
        return row

    def note(self, text: str) -> None:
        self.notes.append(text)

    def render(self) -> str:
        header = ("measure", "pfleet", "baseline", "ratio", "target", "result")
        body = []
        for r in self.rows:
            base = "" if r.baseline is None else r.fmt.format(r.baseline)
            if r.baseline_name:
                base = f"{base} ({r.baseline_name})" if base else r.baseline_name
            body.append(
                (
                    r.measure,
                    "-" if r.pfleet is None else r.fmt.format(r.pfleet),
                    base or "-",
                    "-" if r.ratio is None else f"{r.ratio:.2f}x",
                    r.target or "(info)",
                    "" if r.ok is None else ("PASS" if r.ok else "MISS"),
                )
            )
        widths = [max(len(str(x[i])) for x in [header, *body]) for i in range(len(header))]

        def line(cells: tuple[str, ...]) -> str:
            left = f"  {cells[0]:<{widths[0]}}"
            rest = "".join(f"  {c:>{w}}" for c, w in zip(cells[1:], widths[1:], strict=True))
            return left + rest

        out = [f"== bench {self.number}: {self.title}", line(header)]
        out.append("  " + "-" * (sum(widths) + 2 * (len(widths) - 1)))
        out += [line(cells) for cells in body]
        out += [f"  * {n}" for n in self.notes]
        return "\n".join(out)

    def headline(self) -> list[Row]:
        return [r for r in self.rows if r.ok is not None]

    def to_dict(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "title": self.title,
            "rows": [asdict(r) for r in self.rows],
            "notes": self.notes,
            "extra": self.extra,
        }


REPORTS: list[Report] = []
OTHERS_AT_START: list[str] = []
_OTHER_MARKERS = ("pytest", "pfleet-controller", "pfleet-agent", "dockerd", "podman",
                  "containerd", "wrk", "curl")  # fmt: skip


def other_activity() -> list[str]:
    """Test suites, pfleet daemons and engines running that are not this session's
    (its own process tree): they compete for the 2 cores and skew every figure."""
    me = psutil.Process()
    ours = {me.pid, *(c.pid for c in me.children(recursive=True))}
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        if proc.info["pid"] in ours or not cmdline:
            continue
        head = " ".join(os.path.basename(a) for a in cmdline[:4])
        if any(m in head for m in _OTHER_MARKERS) and "containerd-shim" not in head:
            found.append(f"{proc.info['pid']} {head[:60]}")
    return found


def publish(report: Report) -> None:
    """Print the table now (visible with ``-s``) and keep it for the session summary."""
    others = sorted(set(OTHERS_AT_START) | set(other_activity()))
    if others:
        report.note("OTHER WORK ran on this machine during the session (figures are skewed): "
                    + "; ".join(others)[:400])  # fmt: skip
    else:
        report.note(f"no other test suite or engine seen running ({os.cpu_count()} cores)")
    report.extra["other_processes"] = others
    REPORTS.append(report)
    print("\n" + report.render(), flush=True)


def write_json(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "reports": [r.to_dict() for r in REPORTS]}
    path.write_text(json.dumps(data, indent=2) + "\n")
