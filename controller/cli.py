"""``pfleet``: the operator's command line, a client of the controller's admin API.

    pfleet token create NAME [--ttl SECONDS]
                                 print a new agent token for NAME
    pfleet token revoke NAME     revoke every token of NAME (and drop its link)
    pfleet agents                the fleet as a table (state, how found, load)
    pfleet agents drain NAME [--deadline SECONDS]
                                 no new work on NAME; with a deadline, wait until its
                                 jobs have ended (exit 1 if they have not by then)
    pfleet agents undrain NAME   place work on NAME again
    pfleet jobs [--limit N]      recent jobs with their state

Credentials are pfcon's (``PFCON_USER``/``PFCON_PASSWORD``; the dev pair when unset);
the controller is ``--url`` or ``PFLEET_URL`` (default http://127.0.0.1:30005/api/v1/).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from controller.config import DEV_PASSWORD, DEV_USER

DEFAULT_URL = "http://127.0.0.1:30005/api/v1/"


class CliError(Exception):
    pass


class AdminClient:
    def __init__(self, url: str, user: str, password: str, timeout: float = 30.0) -> None:
        self.url = url if url.endswith("/") else url + "/"
        self.timeout = timeout
        token = self._call("POST", "auth-token/", {"pfcon_user": user,
                                                   "pfcon_password": password})["token"]
        self.headers = {"Authorization": f"Bearer {token}"}

    def _call(self, method: str, path: str, body: Any = None,
              headers: dict[str, str] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        for key, value in (headers or {}).items():
            request.add_header(key, value)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                text = response.read().decode()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace").strip()
            with contextlib.suppress(ValueError, KeyError, TypeError):
                detail = json.loads(detail)["message"]
            raise CliError(f"{method} {path}: {exc.code} {detail}") from None
        except urllib.error.URLError as exc:
            raise CliError(f"cannot reach the controller at {self.url}: {exc.reason}") from None
        return json.loads(text) if text.strip() else None

    def get(self, path: str) -> Any:
        return self._call("GET", path, headers=self.headers)

    def post(self, path: str, body: Any) -> Any:
        return self._call("POST", path, body, headers=self.headers)

    def delete(self, path: str) -> Any:
        return self._call("DELETE", path, headers=self.headers)


def format_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    cells = [[title for _, title in columns]]
    cells += [[_cell(row.get(key)) for key, _ in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in cells)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return "; ".join(map(str, value)) or "-"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "-"
    return str(value)


def _agents_rows(agents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for a in agents:
        cap = a.get("capacity") or {}
        rows.append({**a, "cpu": f"{cap.get('cpu_millicores', 0)}m",
                     "memory": f"{cap.get('memory_mib', 0)}Mi", "gpus": cap.get("gpus", 0),
                     "load": f"{a['cpu_percent']:.0f}%" if a.get("cpu_percent") is not None
                     else "-"})
    return rows


def _drain(client: AdminClient, name: str, deadline: float | None) -> int:
    result = client.post(f"agents/{name}/drain/", {})
    active = int(result["active_jobs"])
    print(f"{name}: draining, {active} job(s) still active")
    if deadline is None:
        return 0
    end = time.monotonic() + deadline
    while active and time.monotonic() < end:
        time.sleep(min(2.0, max(0.1, end - time.monotonic())))
        agent = {a["name"]: a for a in client.get("agents/")["agents"]}.get(name, {})
        active = int(agent.get("active_jobs", 0))
        if active and not agent.get("draining", True):
            # undrained meanwhile: new work lands there, so waiting means nothing now
            print(f"{name}: undrained while waiting, {active} job(s) active",
                  file=sys.stderr)
            return 1
    if active:
        print(f"{name}: deadline reached with {active} job(s) still active", file=sys.stderr)
        return 1
    print(f"{name}: drained")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pfleet", description="pfleet fleet administration")
    parser.add_argument("--url", default=os.environ.get("PFLEET_URL", DEFAULT_URL))
    parser.add_argument("--user", default=os.environ.get("PFCON_USER", DEV_USER))
    parser.add_argument("--password", default=os.environ.get("PFCON_PASSWORD", DEV_PASSWORD))
    parser.add_argument("--json", action="store_true", help="print the raw JSON")
    sub = parser.add_subparsers(dest="command", required=True)
    token = sub.add_parser("token", help="agent tokens")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    create = token_sub.add_parser("create", help="print a new token for an agent")
    create.add_argument("name")
    create.add_argument("--ttl", type=int, default=None,
                        help="seconds until the token expires (default: never)")
    token_sub.add_parser("revoke", help="revoke an agent's tokens").add_argument("name")
    agents = sub.add_parser("agents", help="list agents with their health; drain, undrain, "
                                            "forget")
    agents_sub = agents.add_subparsers(dest="agents_command")
    drain = agents_sub.add_parser("drain", help="stop new placements on an agent")
    drain.add_argument("name")
    drain.add_argument("--deadline", type=float, default=None,
                       help="wait up to this many seconds for its jobs to end")
    agents_sub.add_parser("undrain", help="place work on an agent again").add_argument("name")
    agents_sub.add_parser("forget", help="decommission an agent that is gone: forget it and "
                          "revoke its tokens").add_argument("name")
    jobs = sub.add_parser("jobs", help="list recent jobs")
    jobs.add_argument("--limit", type=int, default=50)
    jobs.add_argument("--all", action="store_true", help="include jobs clients deleted")
    args = parser.parse_args(argv)
    try:
        client = AdminClient(args.url, args.user, args.password)
        if args.command == "token" and args.token_command == "create":
            body: dict[str, Any] = {"name": args.name}
            if args.ttl is not None:
                body["ttl_seconds"] = args.ttl
            result = client.post("agents/tokens/", body)
            print(result["token"])
        elif args.command == "token":
            result = client.delete(f"agents/{args.name}/tokens/")
            print(f"revoked {result['revoked']} token(s) of {args.name}")
        elif args.command == "agents" and args.agents_command == "drain":
            return _drain(client, args.name, args.deadline)
        elif args.command == "agents" and args.agents_command == "forget":
            client.delete(f"agents/{args.name}/")
            print(f"{args.name}: forgotten, its tokens revoked")
        elif args.command == "agents" and args.agents_command == "undrain":
            client.post(f"agents/{args.name}/undrain/", {})
            print(f"{args.name}: accepting work again")
        elif args.command == "agents":
            agents = client.get("agents/")["agents"]
            print(json.dumps(agents, indent=2) if args.json else format_table(
                _agents_rows(agents),
                [("name", "NAME"), ("state", "STATE"), ("found_by", "FOUND BY"),
                 ("runtime", "RUNTIME"), ("cpu", "CPU"), ("memory", "MEMORY"),
                 ("gpus", "GPUS"), ("load", "LOAD"), ("running", "RUNNING"),
                 ("disk_free_mib", "DISK FREE MiB"), ("problems", "PROBLEMS")]))
        else:
            query = f"fleet/jobs/?limit={args.limit}" + ("&all=1" if args.all else "")
            rows = client.get(query)["jobs"]
            print(json.dumps(rows, indent=2) if args.json else format_table(
                rows, [("name", "NAME"), ("kind", "KIND"), ("state", "STATE"),
                       ("status", "STATUS"), ("attempt", "ATTEMPT"), ("agent", "AGENT"),
                       ("message", "MESSAGE")]))
    except CliError as exc:
        print(f"pfleet: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
