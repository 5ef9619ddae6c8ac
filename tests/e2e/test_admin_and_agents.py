"""The operator's side: ``pfleet`` commands, agent tokens at connect, the agent's
local /health.  Real controller and agent processes; the agents use the fake
runtime, so no engine is needed here."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import jwt
import pytest
import requests

from tests.conftest import free_port
from tests.support.processes import agent_proc, controller_proc, http_json, wait_for
from tests.support.zips import make_zip

BIN = Path(sys.executable).parent


@pytest.fixture
def controller(tmp_path: Path):
    proc = controller_proc(tmp_path, free_port(), {"STOREBASE_MOUNT": str(tmp_path / "sb")},
                           local_agent=False)
    proc.start()
    proc.wait_ready()
    yield proc
    proc.stop()


def pfleet(controller, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "pfleet"), "--url", controller.base, *args],
                          capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin"})


def fake_agent(tmp_path: Path, controller, name: str, **env: str):
    proc = agent_proc(tmp_path, name, controller, {"CONTAINER_ENV": "fake",
                                                   "STOREBASE": str(tmp_path / "sb"), **env})
    (tmp_path / "sb").mkdir(exist_ok=True)
    return proc


def test_token_create_agents_and_jobs_commands(tmp_path: Path, controller) -> None:
    created = pfleet(controller, "token", "create", "h9")
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert jwt.decode(token, options={"verify_signature": False})["sub"] == "h9"

    proc = fake_agent(tmp_path, controller, "h9", PFLEET_AGENT_TOKEN=token,
                      PFLEET_AGENT_LABELS="zone=a")
    proc.start()
    try:
        controller.wait_agent("h9")
        table = pfleet(controller, "agents")
        assert table.returncode == 0, table.stderr
        header, row = table.stdout.splitlines()[:2]
        assert header.split()[:3] == ["NAME", "STATE", "FOUND"]
        assert row.split()[:5] == ["h9", "healthy", "configured", "fake", "64000m"]
        listing = json.loads(pfleet(controller, "--json", "agents").stdout)
        assert listing[0]["labels"] == {"zone": "a"}

        # A job shows up in `pfleet jobs` with its state and agent.
        token_c = controller.token()
        body = urllib.parse.urlencode({"jid": "d1"}).encode()
        (Path(controller.env["STOREBASE_MOUNT"]) / "key-d1").mkdir(parents=True)
        req = urllib.request.Request(controller.base + "deletejobs/", data=body,
                                     headers={"Authorization": f"Bearer {token_c}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 201
        wait_for(lambda: any(j["name"] == "d1-delete" and j["state"] == "COMPLETE"
                             for j in controller.jobs()), 20, what="delete job")
        jobs = pfleet(controller, "jobs")
        assert jobs.returncode == 0
        line = next(x for x in jobs.stdout.splitlines() if x.startswith("d1-delete"))
        assert line.split()[:6] == ["d1-delete", "delete", "COMPLETE", "finishedSuccessfully",
                                    "1", "h9"]
    finally:
        proc.stop()


def test_agent_with_a_bad_token_is_refused_and_exits(tmp_path: Path, controller) -> None:
    forged = jwt.encode({"sub": "h1", "typ": "pfleet-agent", "jti": "x"},
                        "a-key-that-is-not-the-controllers-key", algorithm="HS256")
    for name, token in (("h1", forged), ("h2", "garbage")):
        proc = fake_agent(tmp_path, controller, name, PFLEET_AGENT_TOKEN=token)
        proc.start()
        assert proc.process is not None
        assert proc.process.wait(timeout=30) == 78
        assert "refused" in proc.log_tail()

    # Another agent's token: valid signature, but the name does not match.
    other = pfleet(controller, "token", "create", "h3").stdout.strip()
    proc = fake_agent(tmp_path, controller, "h4", PFLEET_AGENT_TOKEN=other)
    proc.start()
    assert proc.process is not None
    assert proc.process.wait(timeout=30) == 78
    assert all(a["name"] != "h4" for a in controller.agents())


def test_revoked_token_drops_the_agent(tmp_path: Path, controller) -> None:
    proc = fake_agent(tmp_path, controller, "h5")
    proc.start()
    controller.wait_agent("h5")
    revoked = pfleet(controller, "token", "revoke", "h5")
    assert revoked.returncode == 0 and "revoked 1" in revoked.stdout
    assert proc.process is not None
    assert proc.process.wait(timeout=30) == 78


def test_forget_decommissions_an_agent_that_is_gone(tmp_path: Path, controller) -> None:
    proc = fake_agent(tmp_path, controller, "h7")
    proc.start()
    try:
        controller.wait_agent("h7")
        refused = pfleet(controller, "agents", "forget", "h7")
        assert refused.returncode == 1 and "is connected" in refused.stderr
    finally:
        proc.stop()
    wait_for(lambda: any(a["name"] == "h7" and a["state"] == "disconnected"
                         for a in controller.agents()), 20, what="h7 to disconnect")
    forgot = pfleet(controller, "agents", "forget", "h7")
    assert forgot.returncode == 0, forgot.stderr
    assert forgot.stdout.strip() == "h7: forgotten, its tokens revoked"
    assert "h7" not in pfleet(controller, "agents").stdout
    # Its token was revoked with it: it cannot come back unnoticed.
    proc.start()
    assert proc.process is not None
    assert proc.process.wait(timeout=30) == 78
    unknown = pfleet(controller, "agents", "forget", "h7")
    assert unknown.returncode == 1 and "no agent named 'h7'" in unknown.stderr


def test_agent_health_endpoint_reports_the_controller_link(tmp_path: Path, controller) -> None:
    port = free_port()
    proc = fake_agent(tmp_path, controller, "h6", PFLEET_HEALTH_LISTEN=f"127.0.0.1:{port}")
    proc.start()
    try:
        controller.wait_agent("h6")
        url = f"http://127.0.0.1:{port}/health"
        status, body = http_json("GET", url)
        assert status == 200 and isinstance(body, dict)
        assert body["status"] == "healthy" and body["problems"] == []
        assert body["capacity"]["cpu_millicores"] == 64000
        controller.stop()
        wait_for(lambda: http_json("GET", url)[0] == 503, 20, what="agent to notice")
        status, body = http_json("GET", url)
        assert isinstance(body, dict)
        assert any("controller link down" in p for p in body["problems"])
        # It comes back by itself when the controller does.
        controller.start()
        controller.wait_ready()
        wait_for(lambda: http_json("GET", url)[0] == 200, 30, what="agent to reconnect")
    finally:
        proc.stop()


def test_agent_health_reports_a_missing_storebase(tmp_path: Path, controller) -> None:
    port = free_port()
    proc = fake_agent(tmp_path, controller, "h7", PFLEET_HEALTH_LISTEN=f"127.0.0.1:{port}",
                      STOREBASE=str(tmp_path / "nowhere"))
    proc.start()
    try:
        controller.wait_agent("h7")
        url = f"http://127.0.0.1:{port}/health"
        wait_for(lambda: http_json("GET", url)[0] == 503, 20, what="unhealthy agent")
        body = http_json("GET", url)[1]
        assert isinstance(body, dict)
        assert any("storeBase" in p and "missing" in p for p in body["problems"])
        agents = {a["name"]: a for a in controller.agents()}
        wait_for(lambda: {a["name"]: a for a in controller.agents()}["h7"]["state"]
                 == "unhealthy", 20, what="controller to see the problem")
        assert agents["h7"]["name"] == "h7"
    finally:
        proc.stop()


def test_expired_agent_token_is_refused(tmp_path: Path, controller) -> None:
    created = pfleet(controller, "token", "create", "h8", "--ttl", "1")
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert "exp" in jwt.decode(token, options={"verify_signature": False})
    wait_for(lambda: jwt.decode(token, options={"verify_signature": False})["exp"]
             < time.time() - 1, 10, what="token to expire")
    proc = fake_agent(tmp_path, controller, "h8", PFLEET_AGENT_TOKEN=token)
    proc.start()
    assert proc.process is not None
    assert proc.process.wait(timeout=30) == 78
    assert all(a["name"] != "h8" for a in controller.agents())


def test_drain_waits_for_running_jobs_and_undrain_resumes(tmp_path: Path, controller) -> None:
    proc = fake_agent(tmp_path, controller, "h10")
    proc.start()
    try:
        controller.wait_agent("h10")
        token = controller.token()

        def post_plugin(jid: str, run_for: str) -> int:
            fields = [("jid", jid), ("entrypoint", "true"), ("auid", "a"),
                      ("number_of_workers", "1"), ("cpu_limit", "100"), ("memory_limit", "10"),
                      ("gpu_limit", "0"), ("image", "x"), ("type", "fs"),
                      ("env", f"PFLEET_FAKE_RUN_FOR={run_for}")]
            r = requests.post(controller.base + "pluginjobs/", data=fields,
                              files={"data_file": make_zip({"a": b"1"})},
                              headers={"Authorization": f"Bearer {token}"}, timeout=30)
            return r.status_code

        assert post_plugin("dr-1", "4") == 201
        wait_for(lambda: any(j["name"] == "dr-1" and j["state"] == "RUNNING"
                             for j in controller.jobs()), 20, what="dr-1 running")
        short = pfleet(controller, "agents", "drain", "h10", "--deadline", "0.5")
        assert short.returncode == 1 and "still active" in short.stderr
        assert post_plugin("dr-2", "0") == 201  # accepted, but not placed while draining
        drained = pfleet(controller, "agents", "drain", "h10", "--deadline", "30")
        assert drained.returncode == 0 and "h10: drained" in drained.stdout
        states = {j["name"]: j["state"] for j in controller.jobs()}
        assert (states["dr-1"], states["dr-2"]) == ("COMPLETE", "QUEUED")
        assert "draining" in pfleet(controller, "agents").stdout
        assert pfleet(controller, "agents", "undrain", "h10").returncode == 0
        wait_for(lambda: {j["name"]: j["state"] for j in controller.jobs()}["dr-2"]
                 == "COMPLETE", 20, what="dr-2 to run after undrain")
    finally:
        proc.stop()


def test_agent_health_names_an_unreachable_engine_and_a_full_storebase(tmp_path: Path,
                                                                      controller) -> None:
    port = free_port()
    proc = fake_agent(tmp_path, controller, "h11", PFLEET_HEALTH_LISTEN=f"127.0.0.1:{port}",
                      CONTAINER_ENV="docker", DOCKER_HOST=f"unix://{tmp_path}/no-engine.sock",
                      PFLEET_AGENT_MIN_FREE_MIB=str(1 << 40))
    proc.start()
    try:
        url = f"http://127.0.0.1:{port}/health"

        def problems() -> list[str]:
            try:
                status, body = http_json("GET", url, timeout=2.0)
            except OSError:
                return []
            return list(body["problems"]) if status == 503 and isinstance(body, dict) else []

        def both(found: list[str]) -> bool:
            # (the controller link may also be reported down while it connects)
            return (any(p.startswith("runtime docker:") and "unreachable" in p for p in found)
                    and any("nearly full" in p for p in found))

        wait_for(lambda: both(problems()), 30, what="both problems reported")
        assert both(problems()), problems()
    finally:
        proc.stop()
