"""pfcon's TestConfigValidation intent for the storage settings (pfcon-api.md §5):
which PFCON_INNETWORK / STORAGE_ENV / SWIFT_* / CONTAINER_ENV combinations start,
the exact reason when they do not, and what a started server then reports."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from controller.config import load_config
from controller.errors import ConfigError
from tests.api.conformance_support import open_harness, ordered, read_json

PROD = {"SECRET_KEY": "a-secret-key-of-at-least-32-bytes!!", "PFCON_USER": "u",
        "PFCON_PASSWORD": "p"}
SWIFT_ENV = {"SWIFT_AUTH_URL": "http://127.0.0.1:9/auth/v1.0", "SWIFT_USERNAME": "chris:x",
             "SWIFT_KEY": "secret", "SWIFT_CONTAINER_NAME": "users"}


@pytest.mark.parametrize(("env", "problems"), [
    ({"PFCON_INNETWORK": "true", "STORAGE_ENV": "zipfile"},
     ["STORAGE_ENV: in-network mode (PFCON_INNETWORK=true) needs one of swift, filesystem, "
      "fslink, got 'zipfile'"]),
    ({"PFCON_INNETWORK": "yes", "STORAGE_ENV": "s3"},
     ["STORAGE_ENV: in-network mode (PFCON_INNETWORK=true) needs one of swift, filesystem, "
      "fslink, got 's3'"]),
    ({"STORAGE_ENV": "fslink"},
     ["STORAGE_ENV: out-of-network mode supports only 'zipfile', got 'fslink' (set "
      "PFCON_INNETWORK=true for in-network storage)"]),
    ({"PFCON_INNETWORK": "perhaps", "STORAGE_ENV": "fslink"},
     ["PFCON_INNETWORK: not a boolean: 'perhaps' (use true/false, yes/no, 1/0, on/off)",
      "STORAGE_ENV: out-of-network mode supports only 'zipfile', got 'fslink' (set "
      "PFCON_INNETWORK=true for in-network storage)"]),
    # In-network defaults to swift, whose settings are required outside dev mode.
    ({"PFCON_INNETWORK": "1", "SWIFT_AUTH_URL": "http://s/auth/v1.0"},
     [f"{name}: required with STORAGE_ENV=swift outside dev mode"
      for name in ("SWIFT_USERNAME", "SWIFT_KEY", "SWIFT_CONTAINER_NAME")]),
    ({"CONTAINER_ENV": "swarm", "COMPUTE_VOLUME_TYPE": "kubernetes_pvc"},
     ["COMPUTE_VOLUME_TYPE: swarm supports host, got 'kubernetes_pvc'"]),
])
def test_refused_settings(env: dict[str, str], problems: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        load_config({**PROD, **env})
    assert err.value.problems == problems


def test_accepted_settings() -> None:
    config = load_config({**PROD, "PFCON_INNETWORK": "true", **SWIFT_ENV})
    assert (config.storage_env, config.swift_auth_url, config.swift_username,
            config.swift_key, config.swift_container) == (
        "swift", "http://127.0.0.1:9/auth/v1.0", "chris:x", "secret", "users")
    dev = load_config({"PFCON_INNETWORK": "true"}, dev=True)
    assert (dev.swift_auth_url, dev.swift_username, dev.swift_key, dev.swift_container) == (
        "http://swift_service:8080/auth/v1.0", "chris:chris1234", "testing", "users")
    # Swift settings are not read for other storages.
    fslink = load_config({**PROD, "PFCON_INNETWORK": "true", "STORAGE_ENV": "fslink"})
    assert (fslink.storage_env, fslink.swift_auth_url) == ("fslink", "")
    assert load_config({**PROD, "CONTAINER_ENV": "kubernetes"}).compute_volume_type == (
        "kubernetes_pvc")
    assert load_config({**PROD, "COMPUTE_VOLUME_TYPE": "host"}).compute_volume_type == "host"


@pytest.mark.parametrize(("env", "expected"), [
    ({"PFCON_INNETWORK": "true", "STORAGE_ENV": "fslink", "CONTAINER_ENV": "podman"},
     {"pfcon_innetwork": True, "storage_env": "fslink", "requires_copy_job": True,
      "requires_upload_job": False, "container_env": "docker",
      "compute_volume_type": "host"}),
    ({"PFCON_INNETWORK": "on", "STORAGE_ENV": "filesystem",
      "COMPUTE_VOLUME_TYPE": "docker_local_volume"},
     {"pfcon_innetwork": True, "storage_env": "filesystem", "requires_copy_job": False,
      "requires_upload_job": False, "container_env": "docker",
      "compute_volume_type": "docker_local_volume"}),
    ({"PFCON_INNETWORK": "true", **SWIFT_ENV, "CONTAINER_ENV": "kubernetes"},
     {"pfcon_innetwork": True, "storage_env": "swift", "requires_copy_job": True,
      "requires_upload_job": True, "container_env": "kubernetes",
      "compute_volume_type": "kubernetes_pvc",
      "swift_auth_url": "http://127.0.0.1:9/auth/v1.0"}),
    ({"PFCON_INNETWORK": "false", "CONTAINER_ENV": "swarm"},
     {"pfcon_innetwork": False, "storage_env": "zipfile", "requires_copy_job": False,
      "requires_upload_job": False, "container_env": "swarm", "compute_volume_type": "host"}),
])
async def test_server_info_from_environment(tmp_path: Path, env: dict[str, str],
                                            expected: dict[str, Any]) -> None:
    loaded = load_config({**PROD, **env})
    overrides = {f.name: getattr(loaded, f.name) for f in dataclasses.fields(loaded)
                 if f.name not in ("storebase_mount", "state_dir", "listen_host", "listen_port",
                                   "server_version")}
    async with open_harness(tmp_path, agent=False, **overrides) as h, \
            aiohttp.ClientSession(headers=h.headers()) as s:
        r = await s.get(h.base + "pluginjobs/")
        body = await read_json(r)
    assert r.status == 200
    assert ordered(body) == ordered({"server_version": "0.0.0+unknown", **expected})
