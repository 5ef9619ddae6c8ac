"""Real ansible-playbook runs against four hosts (containers with their own filesystems,
see ``tests.support.ansible_testbed``): site.yml deploys the controller and three agents
(two on Docker, one on Podman), the fleet runs a python-pfconclient plugin flow on every
host, a second run changes nothing, health.yml names a stopped agent, and upgrade.yml
replaces pfleet everywhere while long jobs keep running.

The tests run in file order on one deployment (the module-scoped ``deployed`` fixture).
No systemd runs here: the hosts start the ExecStart line of each rendered unit (the roles'
``command`` service manager), and the units are checked with ``systemd-analyze verify``
inside the hosts."""

from __future__ import annotations

import hashlib
import io
import os
import shlex
import time
import zipfile
from pathlib import Path

import pytest
from pfconclient import client as pfc

from tests.support.ansible_testbed import AGENT_HOSTS, AnsibleTestbed, PlaybookRun
from tests.support.daemons import wait_until
from tests.support.engines import BUSYBOX_IMAGE
from tests.support.processes import http_json
from tests.support.zips import make_zip

TERMINAL = ("finishedSuccessfully", "finishedWithError", "undefined")
UNITS = {"ctl": ["pfleet-controller"], **{h: ["pfleet-agent"] for h in AGENT_HOSTS}}
VENVS = {"pfleet-controller": "/opt/pfleet/controller", "pfleet-agent": "/opt/pfleet/agent"}
# The plugin: waits (bounded) until the test drops a "release" file into its inputs, then
# copies its inputs to its outputs and records that it ran.
GATED = ('i=0; while [ ! -e "$0/release" ] && [ $i -lt 1200 ]; do sleep 0.25; i=$((i+1)); '
         'done; [ -e "$0/release" ] || exit 9; echo run >> "$1/runs.txt"; '
         'for f in $(cd "$0" && find . -type f); do mkdir -p "$1/$(dirname "$f")"; '
         'cp "$0/$f" "$1/$f.out"; done; echo done')


def ok(deployed: tuple[AnsibleTestbed, PlaybookRun]) -> AnsibleTestbed:
    tb, first = deployed
    assert first.returncode == 0, first.describe()
    return tb


def descriptors() -> dict:
    return {"entrypoint": ["sh", "-c", GATED], "args": [], "auid": "cube",
            "number_of_workers": 1, "cpu_limit": 1000, "memory_limit": 64, "gpu_limit": 0,
            "image": BUSYBOX_IMAGE, "type": "ds"}


def client(tb: AnsibleTestbed) -> pfc.Client:
    """A python-pfconclient client; make and use it inside ``tb.call`` (the namespace)."""
    token = pfc.Client.get_auth_token(tb.controller_url + "auth-token/", "pfcon",
                                      tb.secrets["password"])
    c = pfc.Client(tb.controller_url, token)
    c.initial_wait, c.max_wait = 0.5, 4
    return c


def admin(tb: AnsibleTestbed, method: str, path: str, body: object = None) -> dict:
    def call() -> dict:
        creds = {"pfcon_user": "pfcon", "pfcon_password": tb.secrets["password"]}
        status, answer = http_json("POST", tb.controller_url + "auth-token/", creds)
        assert status == 200, answer
        status, answer = http_json(method, tb.controller_url + path, body,
                                   token=answer["token"])  # type: ignore[index]
        assert status in (200, 201), (status, answer)
        return answer  # type: ignore[return-value]

    return tb.call(call)


def statuses(tb: AnsibleTestbed, jids: list[str]) -> dict[str, str]:
    c = tb.call(client, tb)
    return {j: tb.call(c.get_job_status, pfc.JobType.PLUGIN, j)["compute"]["status"]
            for j in jids}


def wait_statuses(tb: AnsibleTestbed, jids: list[str], wanted: tuple[str, ...],
                  timeout: float = 180) -> dict[str, str]:
    seen: dict[str, str] = {}

    def reached() -> bool:
        seen.update(statuses(tb, jids))
        return all(s in wanted for s in seen.values())

    try:
        wait_until(reached, timeout, 0.5, f"jobs {jids} to reach {wanted}")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}: {seen}") from None
    return seen


def submit_gated(tb: AnsibleTestbed, jids: list[str]) -> None:
    c = tb.call(client, tb)
    for jid in jids:
        resp = tb.call(c.submit_job, pfc.JobType.PLUGIN, jid, descriptors(),
                       make_zip({"in.txt": jid.encode(), "sub/b.txt": b"beta\n"}))
        assert resp["compute"]["status"] == "notStarted", resp


def release(tb: AnsibleTestbed, jids: list[str]) -> None:
    for jid in jids:
        (tb.storebase / f"key-{jid}" / "incoming" / "release").write_text("go\n")


def agents_of(tb: AnsibleTestbed, jids: list[str]) -> dict[str, str]:
    jobs = {j["name"]: j for j in admin(tb, "GET", "fleet/jobs/?all=1&limit=200")["jobs"]}
    return {jid: jobs[jid]["agent"] for jid in jids}


def check_outputs(tb: AnsibleTestbed, jid: str) -> None:
    c = tb.call(client, tb)
    data = tb.call(c.get_plugin_job_zip_data, jid)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert zf.read("in.txt.out") == jid.encode()
        assert zf.read("sub/b.txt.out") == b"beta\n"
        assert zf.read("runs.txt") == b"run\n"  # ran exactly once
    status = tb.call(c.get_job_status, pfc.JobType.PLUGIN, jid)["compute"]
    assert status["logs"].endswith("done\n"), status


def unit_exec_start(tb: AnsibleTestbed, host: str, unit: str) -> list[str]:
    text = tb.sh(host, f"cat /etc/systemd/system/{unit}.service")
    lines = [line for line in text.splitlines() if line.startswith("ExecStart=")]
    assert len(lines) == 1, text
    return shlex.split(lines[0].removeprefix("ExecStart="))


def running_argv(tb: AnsibleTestbed, host: str, unit: str) -> list[str]:
    pid = tb.service_pid(host, unit)
    assert pid, f"{unit} does not run on {host}"
    raw = tb.sh(host, f"cat /proc/{pid}/cmdline")
    return [a for a in raw.split("\0") if a]


def installed_version(tb: AnsibleTestbed, host: str, venv: str) -> str:
    return tb.sh(host, f"{venv}/bin/python -c 'import importlib.metadata as m; "
                       "print(m.version(\"pfleet\"))'").strip()


# --------------------------------------------------------------------------- tests


# The first test pays for the deployment: on a clean machine that includes debootstrap.
@pytest.mark.timeout(900)
def test_site_deploys_controller_and_agents(deployed: tuple[AnsibleTestbed, PlaybookRun]) -> None:
    tb = ok(deployed)
    first = deployed[1]
    recap = first.recap()
    assert set(recap) >= {"ctl", *AGENT_HOSTS}, first.describe()
    assert all(r["failed"] == 0 and r["unreachable"] == 0 for r in recap.values()), recap

    # Installed from the checkout's wheel and the offline wheelhouse.
    for host, units in UNITS.items():
        for unit in units:
            assert installed_version(tb, host, VENVS[unit]) == tb.wheels.version

    # Secrets: only in files of mode 0600, never in the play's output. The admin command
    # reads the credentials from the controller's environment file.
    assert tb.sh("ctl", "stat -c '%a %U' /etc/pfleet/controller.env").split() == ["600", "root"]
    secrets = [tb.secrets["secret_key"], tb.secrets["password"]]
    admin_command = tb.sh("ctl", "cat /usr/local/sbin/pfleet-admin")
    assert not any(secret in admin_command for secret in secrets)
    assert "h1" in tb.sh("ctl", "/usr/local/sbin/pfleet-admin agents")
    for host in AGENT_HOSTS:
        for path in ("/etc/pfleet/agent.token", "/etc/pfleet/agent.toml"):
            assert tb.sh(host, f"stat -c '%a' {path}").strip() == "600", (host, path)
        token = tb.sh(host, "cat /etc/pfleet/agent.token").strip()
        assert len(token) > 20
        secrets.append(token)
        tb.secrets[f"token of {host}"] = token  # checked in every later playbook's output
    for secret in secrets:
        assert secret not in first.output

    # The services run the exact ExecStart line of their rendered unit, and the units
    # pass systemd-analyze verify on their host.
    for host, units in UNITS.items():
        for unit in units:
            argv = unit_exec_start(tb, host, unit)
            running = running_argv(tb, host, unit)
            venv_python = f"{VENVS[unit]}/bin/python"
            # A console script runs under its interpreter: [python, script, args...].
            assert running == argv or (running[1:] == argv
                                       and running[0].startswith(venv_python)), (running, argv)
            verify = tb.exec(host, "systemd-analyze", "verify",
                             f"/etc/systemd/system/{unit}.service")
            assert verify.returncode == 0, (host, unit, verify.stdout, verify.stderr)
    agent_unit = tb.sh("h1", "cat /etc/systemd/system/pfleet-agent.service")
    assert "KillMode=process" in agent_unit.splitlines()

    # The engines run with the role's settings (their networks inside 198.18.0.0/15).
    bridges = {"h1": "198.18.43.0/24", "h2": "198.18.45.0/24"}
    for host, subnet in bridges.items():
        assert tb.sh(host, "docker network inspect bridge --format "
                           "'{{(index .IPAM.Config 0).Subnet}}'").strip() == subnet
        assert tb.sh(host, "docker info --format '{{.LiveRestoreEnabled}}'").strip() == "true"
    assert tb.sh("h3", "podman network inspect podman --format "
                       "'{{range .Subnets}}{{.Subnet}}{{end}}'").strip() == "198.18.47.0/24"

    # The controller knows every agent, healthy.
    agents = {a["name"]: a for a in admin(tb, "GET", "agents/")["agents"]}
    assert {n: a["state"] for n, a in agents.items()} == {h: "healthy" for h in AGENT_HOSTS}
    assert {a["runtime"] for a in agents.values()} == {"docker", "podman"}


def test_plugin_flow_runs_on_every_host(deployed: tuple[AnsibleTestbed, PlaybookRun]) -> None:
    tb = ok(deployed)
    jids = [f"ansible-flow-{i}" for i in range(len(AGENT_HOSTS))]
    submit_gated(tb, jids)
    wait_statuses(tb, jids, ("started",))
    # Each agent offers one job's worth of CPU: the three jobs run on three hosts.
    assert sorted(agents_of(tb, jids).values()) == sorted(AGENT_HOSTS)
    release(tb, jids)
    assert set(wait_statuses(tb, jids, TERMINAL).values()) == {"finishedSuccessfully"}
    c = tb.call(client, tb)
    for jid in jids:
        check_outputs(tb, jid)
        tb.call(c.submit_job, pfc.JobType.DELETE, jid, {})
    deleted = {}
    for _ in range(240):
        deleted = {j: tb.call(c.get_job_status, pfc.JobType.DELETE, j)["compute"]["status"]
                   for j in jids}
        if all(s in TERMINAL for s in deleted.values()):
            break
        time.sleep(0.25)
    assert set(deleted.values()) == {"finishedSuccessfully"}, deleted
    for jid in jids:
        assert not (tb.storebase / f"key-{jid}").exists()
        tb.call(c.delete_job, pfc.JobType.PLUGIN, jid)
        tb.call(c.delete_job, pfc.JobType.DELETE, jid)


def test_second_site_run_changes_nothing(deployed: tuple[AnsibleTestbed, PlaybookRun]) -> None:
    tb = ok(deployed)
    again = tb.playbook("site.yml")
    assert again.returncode == 0, again.describe()
    recap = again.recap()
    assert set(recap) >= {"ctl", *AGENT_HOSTS}
    assert {h: r["changed"] for h, r in recap.items()} == {h: 0 for h in recap}, \
        again.describe()


def test_bad_settings_fail_clearly_and_change_nothing(
        deployed: tuple[AnsibleTestbed, PlaybookRun]) -> None:
    tb = ok(deployed)
    controller_pid = tb.service_pid("ctl", "pfleet-controller")
    no_password = tb.playbook("controller.yml", "-e", "pfleet_controller_pfcon_password=")
    assert no_password.returncode != 0
    assert "pfleet_controller: set pfleet_controller_secret_key" in no_password.output
    assert no_password.recap()["ctl"]["changed"] == 0, no_password.describe()

    # agent.toml is checked by pfleet-agent --check-config before it replaces the old one.
    before = tb.sh("h1", "sha256sum /etc/pfleet/agent.toml")
    agent_pid = tb.service_pid("h1", "pfleet-agent")
    bad = tb.playbook("agents.yml", "--limit", "h1", "--tags", "pfleet_agent_configure",
                      "-e", "pfleet_agent_poll_interval=-1")
    assert bad.returncode != 0
    assert "PFLEET_AGENT_POLL_INTERVAL: must be positive" in bad.output, bad.describe()
    assert bad.recap()["h1"]["changed"] == 0, bad.describe()
    assert tb.sh("h1", "sha256sum /etc/pfleet/agent.toml") == before
    assert tb.service_pid("h1", "pfleet-agent") == agent_pid
    assert tb.service_pid("ctl", "pfleet-controller") == controller_pid


def test_health_names_a_stopped_agent(deployed: tuple[AnsibleTestbed, PlaybookRun]) -> None:
    tb = ok(deployed)
    healthy = tb.playbook("health.yml")
    assert healthy.returncode == 0, healthy.describe()
    for host in AGENT_HOSTS:
        assert f"{host}: healthy; controller: healthy" in healthy.output

    pid = tb.service_pid("h2", "pfleet-agent")
    assert pid is not None
    tb.sh("h2", f"kill {pid}")
    wait_until(lambda: tb.service_pid("h2", "pfleet-agent") is None, 30, 0.2, "h2's agent to stop")
    failing = tb.playbook("health.yml")
    assert failing.returncode != 0, failing.describe()
    assert "unhealthy agents: h2\"" in failing.output, failing.describe()
    assert "h2: down: the agent does not answer on 127.0.0.1:30006" in failing.output
    for host in ("h1", "h3"):
        assert f"{host}: healthy; controller: healthy" in failing.output

    started = tb.service("h2", "start", "pfleet-agent")
    assert started.returncode == 0 and started.stdout.startswith("started"), started
    wait_until(lambda: admin_state(tb, "h2") == "healthy", 60, 0.5, "h2's agent back")
    again = tb.playbook("health.yml")
    assert again.returncode == 0, again.describe()


def admin_state(tb: AnsibleTestbed, name: str) -> str:
    agents = {a["name"]: a for a in admin(tb, "GET", "agents/")["agents"]}
    return str(agents.get(name, {}).get("state", "unknown"))


@pytest.mark.timeout(600)
def test_upgrade_replaces_pfleet_while_long_jobs_run(
        deployed: tuple[AnsibleTestbed, PlaybookRun]) -> None:
    tb = ok(deployed)
    jids = [f"ansible-long-{i}" for i in range(len(AGENT_HOSTS))]
    submit_gated(tb, jids)
    wait_statuses(tb, jids, ("started",))
    placed = agents_of(tb, jids)
    assert sorted(placed.values()) == sorted(AGENT_HOSTS)
    before = {(h, u): tb.service_pid(h, u) for h, units in UNITS.items() for u in units}

    upgrade = tb.playbook("upgrade.yml", "-e", f"pfleet_wheel={tb.wheels.upgrade_wheel}",
                          "-e", "pfleet_source_dir=")
    assert upgrade.returncode == 0, upgrade.describe()
    for host in AGENT_HOSTS:  # drained and undrained, one at a time
        assert "TASK [pfleet_agent : Drain the agent on the controller]" in upgrade.output
        assert f"changed: [{host} -> ctl]" in upgrade.output
    for (host, unit), pid in before.items():
        assert installed_version(tb, host, VENVS[unit]) == tb.wheels.upgrade_version
        assert tb.service_pid(host, unit) not in (None, pid), (host, unit)

    # The long jobs kept running through every restart, on the hosts they started on.
    assert set(statuses(tb, jids).values()) == {"started"}
    assert agents_of(tb, jids) == placed
    agents = {a["name"]: a for a in admin(tb, "GET", "agents/")["agents"]}
    assert not any(a["draining"] for a in agents.values()), agents
    release(tb, jids)
    assert set(wait_statuses(tb, jids, TERMINAL).values()) == {"finishedSuccessfully"}
    for jid in jids:
        check_outputs(tb, jid)



def test_slurm_login_role_sets_up_munge_and_the_client(
        deployed: tuple[AnsibleTestbed, PlaybookRun], tmp_path: Path) -> None:
    tb = ok(deployed)
    key = tmp_path / "munge.key"
    key.write_bytes(os.urandom(1024))
    playbook = str(Path(__file__).with_name("slurm_login.yml"))
    first = tb.playbook(playbook, "-e", f"pfleet_test_munge_key={key}")
    assert first.returncode == 0, first.describe()
    assert tb.sh("ctl", "stat -c '%a %U' /etc/munge/munge.key").split() == ["400", "munge"]
    assert tb.sh("ctl", "sha256sum /etc/munge/munge.key").split()[0] == hashlib.sha256(
        key.read_bytes()).hexdigest()
    assert "SlurmctldHost=ctl" in tb.sh("ctl", "cat /etc/slurm/slurm.conf")
    assert tb.sh("ctl", "id -u pfleet").strip() == "990"
    assert tb.exec("ctl", "sh", "-c", "munge -n | unmunge").returncode == 0
    again = tb.playbook(playbook, "-e", f"pfleet_test_munge_key={key}")
    assert again.returncode == 0, again.describe()
    assert again.recap()["ctl"]["changed"] == 0, again.describe()
