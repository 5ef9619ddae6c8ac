"""Real container engines for the test suite: a private dockerd and a podman service.

Use from ``tests/conftest.py`` with ``pytest_plugins = ["tests.support.engines"]`` (or
``from tests.support.engines import *``). Session-scoped fixtures:

``docker_engine``
    A private dockerd in its own network namespace (``pfleet-test-<pid>``), with its own
    managed containerd, default bridge 198.18.1.0/24 and address pool 198.18.128.0/18.
    Its data root (images) persists in ``.pfleet/test-engine/docker/data`` across runs.
``podman_engine``
    ``podman system service`` in its own network namespace (``pfleet-test-<pid>-pod``),
    configured by ``tests/support/containers.conf`` (through ``CONTAINERS_CONF``), storage
    in ``.pfleet/test-engine/podman``; default network 198.18.88.0/24.
``container_engine``
    Parametrized over both (items are marked ``docker`` / ``podman``).

Each yields an :class:`Engine`: ``.url`` for ``docker.DockerClient(base_url=...)``, ``.cli``
(argv prefix of the engine's own CLI), ``.netns`` / ``.nsenter`` to run a client inside the
engine's network namespace (container addresses are only reachable from there), ``.client()``.
Both engines hold the images ``BUSYBOX_IMAGE`` and ``PYTHON_IMAGE`` (built by
``scripts/build-test-images.sh`` from cached rootfs tarballs; no registry is needed).

Everything started here is stopped by PID at session end; the namespaces are deleted.

PYTEST_DONT_REWRITE: test modules import this before it is registered as a plugin (no
asserts here need rewriting, and this avoids PytestAssertRewriteWarning).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import daemons
from tests.support.daemons import (
    Engine,
    EngineStartError,
    docker_cli,
    ping,
    reap_docker,
    reap_podman,
    require,
    run_dockerd,
    run_podman_service,
    state_dir,
    sweep_dead_netns,
    wait_until,
)

__all__ = [
    "BUSYBOX_IMAGE",
    "CONTAINER_NETWORK",
    "PYTHON_IMAGE",
    "Engine",
    "EngineStartError",
    "container_engine",
    "docker_engine",
    "ping",
    "podman_engine",
    "run_to_completion",
    "start_docker_engine",
    "start_podman_engine",
    "wait_until",
]

# Kept here for modules that took them from this one.
REPO_ROOT = daemons.REPO_ROOT
SUPPORT_DIR = daemons.SUPPORT_DIR
CONTAINERS_CONF = daemons.CONTAINERS_CONF
BUILD_IMAGES = daemons.BUILD_IMAGES
ENGINE_STATE = daemons.ENGINE_STATE
START_TIMEOUT = daemons.START_TIMEOUT
STOP_TIMEOUT = daemons.STOP_TIMEOUT

BUSYBOX_IMAGE = "localhost/pfleet-test/busybox:1"
PYTHON_IMAGE = "localhost/pfleet-test/python:mini"
# Every container bridge the suite creates lives in here (benchmarking range, RFC 2544).
CONTAINER_NETWORK = ipaddress.ip_network("198.18.0.0/15")
DOCKER_BIP = "198.18.1.1/24"
DOCKER_ADDRESS_POOL = "base=198.18.128.0/18,size=24"
NETNS_PREFIX = "pfleet-test-"
_DEAD_NETNS = re.compile(re.escape(NETNS_PREFIX) + r"(?P<pid>\d+)(-pod|-reap)?")


def _sweep_dead_netns() -> None:
    """Delete ``pfleet-test-<pid>[-pod]`` namespaces whose pytest process is gone."""
    sweep_dead_netns(_DEAD_NETNS)


def _reap_podman(state: Path) -> bool:
    return reap_podman(state, f"{NETNS_PREFIX}{os.getpid()}-reap")


# --------------------------------------------------------------------------- engines


@contextlib.contextmanager
def start_docker_engine(build_images: bool = True) -> Iterator[Engine]:
    """Context manager behind the ``docker_engine`` fixture (usable outside pytest)."""
    require("dockerd", "ip", "nsenter", "umount")
    docker_cli()
    with state_dir("docker", reap_docker) as (state, reaped):
        _sweep_dead_netns()  # after reaping: that may still need the old namespaces
        with run_dockerd(
            state,
            reaped,
            netns=f"{NETNS_PREFIX}{os.getpid()}",
            bip=DOCKER_BIP,
            address_pool=DOCKER_ADDRESS_POOL,
            tag="pfleet-test",
            images=build_images,
        ) as engine:
            yield engine


@contextlib.contextmanager
def start_podman_engine(build_images: bool = True) -> Iterator[Engine]:
    """Context manager behind the ``podman_engine`` fixture (usable outside pytest)."""
    require("podman", "ip", "nsenter", "umount")
    with state_dir("podman", _reap_podman) as (state, reaped):
        _sweep_dead_netns()  # after reaping: that may still need the old namespaces
        with run_podman_service(
            state, reaped, netns=f"{NETNS_PREFIX}{os.getpid()}-pod", images=build_images
        ) as engine:
            yield engine



def run_to_completion(client: Any, image: str, command: list[str], **kwargs: Any) -> bytes:
    """Run a container to its end and return its stdout (raises ContainerError on a
    non-zero exit).  Detach, wait and read the logs rather than stream an attach:
    Podman's compat attach stream sometimes never ends for a container that exits at
    once (seen as a hang in a CI run)."""
    import docker.errors

    container = client.containers.run(image, command, detach=True, **kwargs)
    try:
        result = container.wait(timeout=60)
        if result.get("StatusCode") != 0:
            raise docker.errors.ContainerError(
                container, result.get("StatusCode"), command, image,
                container.logs(stdout=False, stderr=True))
        return bytes(container.logs(stdout=True, stderr=False))
    finally:
        container.remove(force=True)

# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[Engine]:
    """A private dockerd for the session (see module docstring)."""
    with start_docker_engine() as engine:
        yield engine


@pytest.fixture(scope="session")
def podman_engine() -> Iterator[Engine]:
    """A podman API service for the session (see module docstring)."""
    with start_podman_engine() as engine:
        yield engine


@pytest.fixture(
    params=[
        pytest.param("docker", marks=pytest.mark.docker),
        pytest.param("podman", marks=pytest.mark.podman),
    ]
)
def container_engine(request: pytest.FixtureRequest) -> Engine:
    """Each test using this runs once against docker and once against podman."""
    return request.getfixturevalue(f"{request.param}_engine")
