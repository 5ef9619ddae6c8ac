"""TLS end to end: the README's ``openssl`` commands make a CA, the controller's
certificate and an agent's client certificate; a real controller process serves
https/wss with them; real agent processes (fake runtime) connect with the CA, fail
to without it, and -- with ``PFLEET_TLS_CLIENT_CA`` -- are refused without a client
certificate (exit 78, like a bad token) and accepted with one.  python-pfconclient
works over https; the embedded ``--local-agent`` reaches ``healthy`` with TLS on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from pfconclient import client as pfc

from controller.config import load_config
from controller.errors import ConfigError
from tests.conftest import free_port
from tests.support.engines import Engine
from tests.support.processes import (
    ControllerProc,
    Proc,
    agent_proc,
    controller_proc,
    http_json,
    wait_for,
)
from tests.support.tls import Certs, make_certs


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"), "localhost", "127.0.0.1")


@dataclass
class TLSController(ControllerProc):
    """The controller over https, its certificate checked against ``ca``."""

    ca: Path = Path()

    @property
    def base(self) -> str:
        return f"https://127.0.0.1:{self.port}/api/v1/"

    def wait_ready(self, timeout: float = 30.0) -> None:
        def ready() -> bool:
            if not self.alive():
                raise RuntimeError(f"controller exited:\n{self.log_tail()}")
            try:
                return http_json("GET", self.base + "health/", timeout=1.0, ca=self.ca)[0] == 200
            except OSError:
                return False

        wait_for(ready, timeout, what="controller health over https")

    def token(self) -> str:
        status, body = http_json("POST", self.base + "auth-token/",
                                 {"pfcon_user": "pfcon", "pfcon_password": "pfcon1234"},
                                 ca=self.ca)
        assert status == 200 and isinstance(body, dict), body
        return str(body["token"])

    def agent_token(self, name: str) -> str:
        status, body = http_json("POST", self.base + "agents/tokens/", {"name": name},
                                 token=self.token(), ca=self.ca)
        assert status == 201 and isinstance(body, dict), body
        return str(body["token"])

    def agents(self) -> list[dict]:
        status, body = http_json("GET", self.base + "agents/", token=self.token(), ca=self.ca)
        assert status == 200 and isinstance(body, dict), body
        return list(body["agents"])

    def jobs(self) -> list[dict]:
        status, body = http_json("GET", self.base + "fleet/jobs/?all=1", token=self.token(),
                                 ca=self.ca)
        assert status == 200 and isinstance(body, dict), body
        return list(body["jobs"])

    def state_of(self, name: str) -> str | None:
        return next((a["state"] for a in self.agents() if a["name"] == name), None)


def start_controller(tmp_path: Path, certs: Certs, *, local_agent: bool = False,
                     **env: str) -> TLSController:
    plain = controller_proc(tmp_path, free_port(),
                            {"STOREBASE_MOUNT": str(tmp_path / "sb"),
                             "PFLEET_TLS_CERT": str(certs.cert),
                             "PFLEET_TLS_KEY": str(certs.key), **env},
                            local_agent=local_agent)
    proc = TLSController(name=plain.name, argv=plain.argv, env=plain.env,
                         log_path=plain.log_path, port=plain.port, ca=certs.ca)
    proc.start()
    try:
        proc.wait_ready()
    except BaseException:
        proc.stop()
        raise
    return proc


def fake_agent(tmp_path: Path, controller: TLSController, name: str, **env: str) -> Proc:
    (tmp_path / "sb").mkdir(exist_ok=True)
    return agent_proc(tmp_path, name, controller,
                      {"CONTAINER_ENV": "fake", "STOREBASE": str(tmp_path / "sb"), **env})


@pytest.fixture
def stack(tmp_path: Path):
    """Processes a test starts, stopped by PID at the end whatever happened."""
    procs: list[Proc] = []
    yield procs
    for proc in reversed(procs):
        proc.stop()


def test_settings_are_checked_at_start(tmp_path: Path, certs: Certs) -> None:
    base = {"PFLEET_DEV": "1", "PFLEET_STATE_DIR": str(tmp_path)}
    config = load_config({**base, "PFLEET_TLS_CERT": str(certs.cert),
                          "PFLEET_TLS_KEY": str(certs.key)})
    assert config.tls and config.tls_client_ca is None
    cases = [
        ({"PFLEET_TLS_CERT": str(certs.cert)}, "PFLEET_TLS_KEY"),
        ({"PFLEET_TLS_KEY": str(certs.key)}, "PFLEET_TLS_CERT"),
        ({"PFLEET_TLS_CERT": str(tmp_path / "nope.pem"), "PFLEET_TLS_KEY": str(certs.key)},
         "PFLEET_TLS_CERT: no such file"),
        ({"PFLEET_TLS_CERT": str(certs.cert), "PFLEET_TLS_KEY": str(certs.agent_key)},
         "PFLEET_TLS_CERT / PFLEET_TLS_KEY: cannot load"),
        ({"PFLEET_TLS_CLIENT_CA": str(certs.ca)}, "PFLEET_TLS_CLIENT_CA: needs TLS"),
        ({"PFLEET_TLS_CERT": str(certs.cert), "PFLEET_TLS_KEY": str(certs.key),
          "PFLEET_TLS_CLIENT_CA": str(certs.key)}, "PFLEET_TLS_CLIENT_CA: cannot load"),
        ({"PFLEET_ZEROCONF": "yes", "PFLEET_ZEROCONF_INTERFACES": "eth0"},
         "PFLEET_ZEROCONF_INTERFACES: not an IPv4 address"),
        ({"PFLEET_ZEROCONF": "yes", "PFLEET_LISTEN": "ctl.example.org:30005"},
         "PFLEET_ZEROCONF_INTERFACES: required"),
    ]
    for env, expected in cases:
        with pytest.raises(ConfigError) as info:
            load_config({**base, **env})
        assert any(expected in p for p in info.value.problems), (env, info.value.problems)
    assert load_config(base).zeroconf is False  # off unless asked for


def test_agent_over_wss_and_pfconclient_over_https(tmp_path: Path, certs: Certs, stack,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    controller = start_controller(tmp_path, certs)
    stack.append(controller)
    assert "listening: https://127.0.0.1:" in controller.log_tail()
    # Plain http to the TLS port gets nowhere.
    with pytest.raises(OSError):
        http_json("GET", f"http://127.0.0.1:{controller.port}/api/v1/health/", timeout=3)

    good = fake_agent(tmp_path, controller, "h1", PFLEET_CA_FILE=str(certs.ca))
    assert good.env["PFLEET_CONTROLLER_URL"].startswith("https://")  # becomes wss://
    stack.append(good)
    good.start()
    controller.wait_agent("h1")
    wait_for(lambda: controller.state_of("h1") == "healthy", 20, what="h1 healthy")

    # Without the CA file the agent trusts only the system store: it stays away and
    # says why, and keeps retrying (the operator may fix the file).
    health = free_port()
    untrusting = fake_agent(tmp_path, controller, "h2",
                            PFLEET_HEALTH_LISTEN=f"127.0.0.1:{health}")
    stack.append(untrusting)
    untrusting.start()
    url = f"http://127.0.0.1:{health}/health"

    def says_why() -> bool:
        try:
            status, body = http_json("GET", url, timeout=2)
        except OSError:
            return False
        return status == 503 and isinstance(body, dict) and any(
            p.startswith("controller link down: certificate verify failed")
            for p in body["problems"])

    wait_for(says_why, 20, what="h2 to report the certificate problem")
    assert untrusting.alive()
    assert "system trust store" in untrusting.log_tail()
    assert controller.state_of("h2") is None

    # CUBE's client over https, with the CA in the environment as requests reads it.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(certs.ca))
    token = pfc.Client.get_auth_token(controller.base + "auth-token/", "pfcon", "pfcon1234")
    client = pfc.Client(controller.base, token)
    info = client.get_server_info()
    assert info["pfcon_innetwork"] is False and info["storage_env"] == "zipfile"
    (tmp_path / "sb" / "key-tls1").mkdir(parents=True)
    assert client.submit_job(pfc.JobType.DELETE, "tls1", {})["compute"]["status"]
    wait_for(lambda: client.get_job_status(pfc.JobType.DELETE, "tls1")["compute"]["status"]
             == "finishedSuccessfully", 20, interval=0.25, what="delete job over https")
    assert not (tmp_path / "sb" / "key-tls1").exists()
    assert any(j["name"] == "tls1-delete" and j["agent"] == "h1" for j in controller.jobs())
    client.delete_job(pfc.JobType.DELETE, "tls1")


def test_client_certificates_for_agents(tmp_path: Path, certs: Certs, stack) -> None:
    controller = start_controller(tmp_path, certs, PFLEET_TLS_CLIENT_CA=str(certs.ca))
    stack.append(controller)
    # No client certificate: refused like a bad token, so it exits with 78 (EX_CONFIG)
    # instead of retrying for ever.
    bare = fake_agent(tmp_path, controller, "h2", PFLEET_CA_FILE=str(certs.ca))
    stack.append(bare)
    bare.start()
    assert bare.process is not None
    assert bare.process.wait(timeout=30) == 78
    assert "refused" in bare.log_tail()

    enrolled = fake_agent(tmp_path, controller, "h1", PFLEET_CA_FILE=str(certs.ca),
                          PFLEET_CLIENT_CERT=str(certs.agent_cert),
                          PFLEET_CLIENT_KEY=str(certs.agent_key))
    stack.append(enrolled)
    enrolled.start()
    controller.wait_agent("h1")
    assert controller.state_of("h2") is None
    # The pfcon API still needs no client certificate (CUBE has none): the calls
    # above and this one went without.
    status, body = http_json("GET", controller.base + "pluginjobs/", token=controller.token(),
                             ca=certs.ca)
    assert status == 200, body


@pytest.mark.docker
def test_local_agent_with_tls(tmp_path: Path, certs: Certs, stack,
                              docker_engine: Engine) -> None:
    # The client CA too: the embedded agent has no client certificate and needs none.
    controller = start_controller(tmp_path, certs, local_agent=True,
                                  PFLEET_TLS_CLIENT_CA=str(certs.ca),
                                  DOCKER_HOST=docker_engine.url,
                                  PFLEET_HEALTH_LISTEN=f"127.0.0.1:{free_port()}")
    stack.append(controller)
    wait_for(lambda: controller.state_of("local") == "healthy", 30, interval=0.2,
             what="local agent healthy over wss")
    agent = next(a for a in controller.agents() if a["name"] == "local")
    assert agent["found_by"] == "local"
