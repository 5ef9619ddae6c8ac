"""Fixtures for the Ansible tests: wheels for offline hosts, the hosts themselves
(``tests.support.ansible_testbed``), and a fleet deployed by a first ``site.yml`` run.

The tests of ``test_fleet.py`` share that fleet and run in file order: deploy, jobs on
every host, a second run, health, upgrade."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from tests.support.ansible_testbed import (
    AGENT_HOSTS,
    AnsibleTestbed,
    PlaybookRun,
    import_image,
    start_testbed,
)
from tests.support.ansible_wheels import Wheels, prepare
from tests.support.daemons import BUILD_IMAGES, REPO_ROOT, run
from tests.support.engines import BUSYBOX_IMAGE

BUSYBOX_TAR = REPO_ROOT / ".pfleet" / "images" / "busybox-r1.tar"


@pytest.fixture(scope="module")
def ansible_wheels(tmp_path_factory: pytest.TempPathFactory) -> Wheels:
    return prepare(tmp_path_factory.mktemp("ansible-wheels"))


@pytest.fixture(scope="module")
def fleet_secrets() -> dict[str, str]:
    # Characters a shell, an EnvironmentFile or TOML would mangle if quoted carelessly
    # (no "{{": Ansible would template it).
    return {"secret_key": "sk-" + secrets.token_urlsafe(24) + "$HOME'\"\\ #x",
            "password": "pw-" + secrets.token_urlsafe(12) + " $(id) `;'\"\\"}


@pytest.fixture(scope="module")
def testbed(tmp_path_factory: pytest.TempPathFactory, ansible_wheels: Wheels,
            fleet_secrets: dict[str, str]) -> Iterator[AnsibleTestbed]:
    with start_testbed(tmp_path_factory.mktemp("ansible"), ansible_wheels,
                       fleet_secrets) as tb:
        yield tb


@pytest.fixture(scope="module")
def deployed(testbed: AnsibleTestbed) -> tuple[AnsibleTestbed, PlaybookRun]:
    """The first ``site.yml`` run (with --diff, so that a secret in a diff would show),
    then the test plugin image in every host's own engine."""
    first = testbed.playbook("site.yml", "--diff")
    if first.returncode == 0:
        if not BUSYBOX_TAR.is_file():  # made (and cached) by the images script
            res = run(["bash", str(BUILD_IMAGES), *testbed.engine.cli], timeout=600)
            assert res.returncode == 0, res.stderr
        for host in AGENT_HOSTS:
            import_image(testbed, host, BUSYBOX_TAR, BUSYBOX_IMAGE,
                         ["ENV PATH=/bin", 'CMD ["/bin/sh"]'])
    return testbed, first
