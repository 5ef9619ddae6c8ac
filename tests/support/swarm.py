"""A single-node Docker swarm for the tests: a private ``dockerd`` of its own (never the
shared test engine of ``tests.support.engines``) turned into a swarm manager.

Addresses, all inside 198.18.0.0/15 and apart from every other engine of the suite
(docker 198.18.1.0/24 + pool 198.18.128.0/18, podman 198.18.88.0/24 + 198.18.96.0/19,
topology 198.18.10-12.0/24 + 198.19.0.0/18, ensure-docker 198.18.64.0/18):

* default bridge ``--bip 198.18.2.1/24``;
* local networks (``docker_gwbridge``) from ``--default-address-pool
  base=198.19.64.0/18,size=24``;
* swarm (overlay, ``ingress``) networks from ``--default-addr-pool 198.18.192.0/18``
  (the issue's 198.18.128.0/17 would overlap the docker engine's 198.18.128.0/18).

The engine lives in network namespace ``pfleet-test-<pid>-swarm``; its storage
(``.pfleet/test-engine/swarm``, images built from the cached rootfs tarballs) persists
across runs.  At the end the services are removed and the node leaves the swarm
before dockerd is stopped by PID, so the next run starts from a plain engine.

PYTEST_DONT_REWRITE
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator

import pytest

from tests.support.daemons import (
    Engine,
    EngineStartError,
    docker_cli,
    reap_docker,
    require,
    run_dockerd,
    state_dir,
    sweep_dead_netns,
)

__all__ = ["SWARM_ADDR_POOL", "start_swarm_engine", "swarm_engine"]

SWARM_BIP = "198.18.2.1/24"
SWARM_LOCAL_POOL = "base=198.19.64.0/18,size=24"
SWARM_ADDR_POOL = "198.18.192.0/18"
_DEAD_NETNS = re.compile(r"pfleet-test-(?P<pid>\d+)-swarm")


def _swarm_state(engine: Engine) -> str:
    res = engine.run_cli("info", "--format", "{{.Swarm.LocalNodeState}}", timeout=60)
    return res.stdout.strip()


def _leave(engine: Engine) -> None:
    ids = engine.run_cli("service", "ls", "-q", timeout=60).stdout.split()
    if ids:
        engine.run_cli("service", "rm", *ids, timeout=120)
    engine.run_cli("swarm", "leave", "--force", timeout=120)


@contextlib.contextmanager
def start_swarm_engine() -> Iterator[Engine]:
    """Context manager behind the ``swarm_engine`` fixture (usable outside pytest)."""
    require("dockerd", "ip", "nsenter", "umount")
    docker_cli()
    with state_dir("swarm", reap_docker) as (state, reaped):
        sweep_dead_netns(_DEAD_NETNS)
        with run_dockerd(state, reaped, netns=f"pfleet-test-{os.getpid()}-swarm",
                         bip=SWARM_BIP, address_pool=SWARM_LOCAL_POOL, tag="pfleet-swarm",
                         scratch_prefix="pfleet-swarm-") as engine:
            if _swarm_state(engine) != "inactive":  # left over by a killed session
                _leave(engine)
            init = engine.run_cli("swarm", "init", "--advertise-addr", "127.0.0.1",
                                  "--default-addr-pool", SWARM_ADDR_POOL, timeout=120)
            if init.returncode != 0:
                raise EngineStartError(f"docker swarm init failed: {init.stderr.strip()}\n"
                                       f"{engine.log_tail()}")
            try:
                yield engine
            finally:
                _leave(engine)


@pytest.fixture(scope="session")
def swarm_engine() -> Iterator[Engine]:
    """A private dockerd that is a single-node swarm manager (see module docstring)."""
    with start_swarm_engine() as engine:
        yield engine
