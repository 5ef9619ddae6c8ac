"""agent.config: settings from the TOML file and the environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import load_agent_config

BASE = {"PFLEET_AGENT_TOKEN": "t", "PFLEET_AGENT_STATE_DIR": "/tmp/pfleet-agent-test"}


@pytest.mark.parametrize(("env", "toml", "expected"), [
    ({}, "", "127.0.0.1:30006"),  # the default
    ({"PFLEET_HEALTH_LISTEN": ""}, "", ""),  # empty switches the endpoint off
    ({}, 'health_listen = ""\n', ""),
    ({}, 'health_listen = "127.0.0.1:39999"\n', "127.0.0.1:39999"),
    ({"PFLEET_HEALTH_LISTEN": "0.0.0.0:30007"}, 'health_listen = ""\n', "0.0.0.0:30007"),
])
def test_an_empty_health_listen_disables_the_endpoint(tmp_path: Path, env: dict[str, str],
                                                      toml: str, expected: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(toml)
    config = load_agent_config(path, env={**BASE, **env})
    assert config.health_listen == expected


def test_other_empty_settings_still_mean_unset(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('container_env = "podman"\n')
    config = load_agent_config(path, env={**BASE, "CONTAINER_ENV": ""})
    assert config.runtime == "podman"  # an empty variable does not hide the file's value
