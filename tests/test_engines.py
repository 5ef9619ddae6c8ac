"""The engine fixtures work: both engines run the test images through the docker SDK."""

import ipaddress
import subprocess

import pytest

from tests.support.engines import (
    BUSYBOX_IMAGE,
    CONTAINER_NETWORK,
    PYTHON_IMAGE,
    Engine,
    ping,
    run_to_completion,
    wait_until,
)

# Registers the fixtures when tests/conftest.py does not (a no-op when it already does).
pytest_plugins = ["tests.support.engines"]


def _run(engine: Engine, image: str, command: list[str], **kwargs) -> bytes:
    client = engine.client()
    try:
        return run_to_completion(client, image, command, **kwargs)
    finally:
        client.close()


def test_engine_answers(container_engine: Engine) -> None:
    assert container_engine.url.startswith("unix://")
    assert ping(container_engine.url)
    out = container_engine.run_cli("image", "inspect", BUSYBOX_IMAGE)
    assert out.returncode == 0, out.stderr


def test_busybox_echo(container_engine: Engine) -> None:
    assert _run(container_engine, BUSYBOX_IMAGE, ["echo", "hi"]) == b"hi\n"


def test_python_image(container_engine: Engine) -> None:
    out = _run(container_engine, PYTHON_IMAGE, ["python3", "-c", "print(1+1)"])
    assert out == b"2\n"


def test_python_image_stdlib(container_engine: Engine) -> None:
    code = "import ssl, sqlite3, zlib, json, hashlib, ctypes; print('ok')"
    assert _run(container_engine, PYTHON_IMAGE, ["python3", "-c", code]) == b"ok\n"


def test_container_address_in_test_range(container_engine: Engine) -> None:
    client = container_engine.client()
    try:
        c = client.containers.run(BUSYBOX_IMAGE, ["sleep", "30"], detach=True)
        try:
            c.reload()
            nets = c.attrs["NetworkSettings"]["Networks"]
            addrs = [n["IPAddress"] for n in nets.values() if n.get("IPAddress")]
            assert addrs, nets
            for a in addrs:
                assert ipaddress.ip_address(a) in CONTAINER_NETWORK, a
        finally:
            c.remove(force=True)
    finally:
        client.close()


@pytest.mark.docker
def test_docker_default_bridge(docker_engine: Engine) -> None:
    client = docker_engine.client()
    try:
        bridge = client.networks.get("bridge")
        subnets = [ipaddress.ip_network(c["Subnet"]) for c in bridge.attrs["IPAM"]["Config"]]
        assert subnets == [ipaddress.ip_network("198.18.1.0/24")]
        net = client.networks.create("pfleet-test-pool")
        try:
            (cfg,) = net.attrs["IPAM"]["Config"]
            assert ipaddress.ip_network(cfg["Subnet"]).subnet_of(CONTAINER_NETWORK)
        finally:
            net.remove()
    finally:
        client.close()


@pytest.mark.docker
def test_docker_engine_is_in_its_own_netns(docker_engine: Engine) -> None:
    # The bridge exists inside the engine's namespace, not in the root namespace.
    inside = subprocess.run(
        [*docker_engine.nsenter, "ip", "-br", "addr", "show", "docker0"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert "198.18.1.1/24" in inside.stdout, inside.stderr


@pytest.mark.docker
def test_docker_oom_kill(docker_engine: Engine) -> None:
    client = docker_engine.client()
    try:
        c = client.containers.run(
            BUSYBOX_IMAGE,
            ["sh", "-c", "x=a; while true; do x=$x$x; done"],
            mem_limit="16m",
            detach=True,
        )
        try:
            result = c.wait(timeout=60)
            c.reload()
            assert result["StatusCode"] == 137
            assert c.attrs["State"]["OOMKilled"] is True
        finally:
            c.remove(force=True)
    finally:
        client.close()


def test_wait_until_is_bounded() -> None:
    calls = []
    with pytest.raises(TimeoutError):
        wait_until(lambda: calls.append(1), timeout=0.3, interval=0.05)
    assert 2 <= len(calls) <= 9
    assert wait_until(lambda: "yes", timeout=1) == "yes"
