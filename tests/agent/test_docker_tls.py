"""The docker runtime against a real dockerd that serves TCP with TLS (``--tlsverify``).

A second, small dockerd (its own network namespace, state and subnets) listens on its
namespace's loopback with the certificates the README's ``openssl`` commands make; the
runtime runs in a child process entered into that namespace and is configured as an
operator would (``DOCKER_HOST=tcp://...``, ``DOCKER_TLS_VERIFY``, ``DOCKER_CERT_PATH``).
It runs a busybox job to its end; with no client certificate, a client certificate
from another CA, an engine certificate it cannot verify or no TLS settings at all it
reports the engine unhealthy with a readable reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemons import (
    REPO_ROOT,
    DockerTLS,
    Engine,
    reap_docker,
    run_dockerd,
    state_dir,
)
from tests.support.engines import BUSYBOX_IMAGE, NETNS_PREFIX
from tests.support.tls import Certs, make_certs

pytestmark = pytest.mark.docker

# Unused by every other engine of the suite (grep 198.18 in tests/ and scripts/).
TLS_BIP = "198.18.53.1/24"
TLS_ADDRESS_POOL = "base=198.18.54.0/24,size=24"
CLIENT_TIMEOUT = 120.0


@dataclass(frozen=True)
class TLSEngine:
    engine: Engine
    certs: Certs  # its CA signed the engine's certificate and the agent's (h1)
    foreign: Certs  # another CA, with a client certificate of its own


def _copy_image(source: Engine, target: Engine, image: str) -> None:
    """``docker save | docker load`` unless ``target`` has ``image`` already."""
    if target.run_cli("image", "inspect", image).returncode == 0:
        return
    with subprocess.Popen([*source.cli, "save", image], stdout=subprocess.PIPE) as save:
        load = subprocess.run([*target.cli, "load"], stdin=save.stdout, capture_output=True,
                              text=True, timeout=120)
        assert save.wait(120) == 0 and load.returncode == 0, load.stderr


@pytest.fixture(scope="module")
def tls_engine(docker_engine: Engine, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[TLSEngine]:
    # The README's recipe with localhost / 127.0.0.1 in the engine's certificate.
    certs = make_certs(tmp_path_factory.mktemp("engine-ca"), "localhost", "127.0.0.1")
    foreign = make_certs(tmp_path_factory.mktemp("foreign-ca"), "localhost", "127.0.0.1")
    with state_dir("docker-tls", reap_docker) as (state, reaped), run_dockerd(
        state, reaped, netns=f"{NETNS_PREFIX}{os.getpid()}-tls", bip=TLS_BIP,
        address_pool=TLS_ADDRESS_POOL, tag="pfleet-tls", images=False,
        scratch_prefix="pfleet-dtls-", tls=DockerTLS(certs.ca, certs.cert, certs.key),
    ) as engine:
        _copy_image(docker_engine, engine, BUSYBOX_IMAGE)
        yield TLSEngine(engine, certs, foreign)


def cert_dir(path: Path, ca: Path, cert: Path | None = None, key: Path | None = None) -> Path:
    """A DOCKER_CERT_PATH directory: ca.pem, and cert.pem + key.pem when given."""
    path.mkdir()
    for source, name in ((ca, "ca.pem"), (cert, "cert.pem"), (key, "key.pem")):
        if source is not None:
            shutil.copy(source, path / name)
    return path


def run_client(tls: TLSEngine, tmp_path: Path, scenario: str, **env: str) -> dict[str, Any]:
    """Run the runtime in the engine's namespace with the agent's environment ``env``."""
    storebase = tmp_path / "storeBase"
    storebase.mkdir(exist_ok=True)
    environment = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),  # no ~/.docker of the machine's
        "PFLEET_AGENT_CONFIG": str(tmp_path / "absent.toml"),
        "PFLEET_AGENT_NAME": "tls-agent",
        "PFLEET_AGENT_TOKEN": "unused",
        "CONTAINER_ENV": "docker",
        "STOREBASE": str(storebase),
        "DOCKER_HOST": tls.engine.tls_url,
        **env,
    }
    done = subprocess.run(
        [*tls.engine.nsenter, sys.executable, "-m", "tests.support.docker_tls_client",
         scenario, BUSYBOX_IMAGE],
        cwd=REPO_ROOT, env=environment, capture_output=True, text=True,
        timeout=CLIENT_TIMEOUT)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    assert result["slow_callbacks"] == [], result["slow_callbacks"]
    return result


def test_a_job_runs_to_its_end_over_tls(tls_engine: TLSEngine, tmp_path: Path) -> None:
    certs = tls_engine.certs
    path = cert_dir(tmp_path / "certs", certs.ca, certs.agent_cert, certs.agent_key)
    result = run_client(tls_engine, tmp_path, "job",
                        DOCKER_TLS_VERIFY="1", DOCKER_CERT_PATH=str(path))
    assert result["probe"]["health"] == "healthy", result["probe"]
    assert result["probe"]["cpu_millicores"] > 0
    job = result["job"]
    assert job["states"][-1] == "exited" and job["exit_code"] == 3, job
    assert job["job_events"] >= 1, job  # the event stream ran over TLS as well
    # both streams (the engine orders them by time only)
    assert sorted(job["logs"].splitlines()) == ["err-line", "out-line"]
    assert job["listed"] and job["after_remove"] == "missing", job
    # and the engine really has nothing left of it
    assert tls_engine.engine.run_cli("inspect", job["name"]).returncode != 0


# What the probe's reason must say, by what is wrong.
BAD_SETTINGS = {
    "no client certificate": "lacks cert.pem, key.pem",
    # TLS 1.3: the engine refuses the certificate after the client's side of the
    # handshake is done, so the client sees its alert or just the connection closed
    "client certificate of another CA": "TLS error: ",
    "engine certificate of another CA": "TLS error: [SSL: CERTIFICATE_VERIFY_FAI",
    "no TLS settings": "Client sent an HTTP request to an HTTPS server",
}


@pytest.mark.parametrize("case", list(BAD_SETTINGS))
def test_bad_tls_settings_leave_the_engine_unreachable_with_a_reason(
        tls_engine: TLSEngine, tmp_path: Path, case: str) -> None:
    certs, foreign = tls_engine.certs, tls_engine.foreign
    env: dict[str, str] = {"DOCKER_TLS_VERIFY": "1"}
    if case == "no client certificate":
        path = cert_dir(tmp_path / "certs", certs.ca)
    elif case == "client certificate of another CA":
        path = cert_dir(tmp_path / "certs", certs.ca, foreign.agent_cert, foreign.agent_key)
    elif case == "engine certificate of another CA":
        path = cert_dir(tmp_path / "certs", foreign.ca, certs.agent_cert, certs.agent_key)
    else:
        env = {}
    if env:
        env["DOCKER_CERT_PATH"] = str(path)
    probe = run_client(tls_engine, tmp_path, "probe", **env)["probe"]
    assert probe["health"] == "unhealthy", probe
    reason = probe["reason"]
    assert reason.startswith(f"docker engine unreachable at {tls_engine.engine.tls_url}: "
                             if case != "no client certificate" else
                             f"docker engine at {tls_engine.engine.tls_url}: TLS is on")
    assert BAD_SETTINGS[case] in reason, reason
    assert "\n" not in reason and "Traceback" not in reason
