"""The agent's settings for the kubernetes and swarm runtimes: pfcon's names, the
volume type each runtime takes, and the runtimes the registry builds from them."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import AgentConfigError, load_agent_config
from agent.runtimes import create_runtime
from agent.runtimes.kubernetes import KubernetesRuntime
from agent.runtimes.swarm import SwarmRuntime


def load(tmp_path: Path, **env: str):
    return load_agent_config(env={"PFLEET_AGENT_TOKEN": "t",
                                  "PFLEET_AGENT_CONFIG": str(tmp_path / "absent.toml"), **env})


async def test_kubernetes_settings_from_pfcon_names(tmp_path: Path) -> None:
    config = load(tmp_path, CONTAINER_ENV="kubernetes", VOLUME_NAME="chris-sb",
                  JOB_NAMESPACE="chris", NODE_SELECTOR="pool=plugins,gpu=no",
                  IMAGE_PULL_SECRETS="regcred, other", KUBECONFIG="/etc/pfleet/kubeconfig",
                  PFLEET_KUBERNETES_JOB_TTL="600", PFLEET_KUBERNETES_ACTIVE_DEADLINE="0",
                  JOB_LABELS="team=imaging", PFLEET_AGENT_NAME="k1")
    assert config.compute_volume_type == "kubernetes_pvc"  # the runtime's only choice
    runtime = create_runtime(config)
    try:
        assert isinstance(runtime, KubernetesRuntime)
        s = runtime.settings
        assert (s.volume_name, s.namespace, s.agent_name) == ("chris-sb", "chris", "k1")
        assert s.node_selector == {"pool": "plugins", "gpu": "no"}
        assert s.image_pull_secrets == ("regcred", "other")
        assert (s.kubeconfig, s.job_ttl_seconds, s.active_deadline_seconds) == (
            "/etc/pfleet/kubeconfig", 600, 0)
        assert s.job_labels == {"team": "imaging"}
        assert runtime.capabilities().multi_worker
    finally:
        await runtime.close()


def test_kubernetes_needs_its_pvc_and_volume_type(tmp_path: Path) -> None:
    with pytest.raises(AgentConfigError) as err:
        load(tmp_path, CONTAINER_ENV="kubernetes")
    assert "VOLUME_NAME" in str(err.value)
    with pytest.raises(AgentConfigError) as err:
        load(tmp_path, CONTAINER_ENV="kubernetes", VOLUME_NAME="v", COMPUTE_VOLUME_TYPE="host")
    assert "kubernetes supports kubernetes_pvc" in str(err.value)
    with pytest.raises(AgentConfigError) as err:
        load(tmp_path, CONTAINER_ENV="docker", VOLUME_NAME="v",
             COMPUTE_VOLUME_TYPE="kubernetes_pvc")
    assert "COMPUTE_VOLUME_TYPE" in str(err.value)


def test_kubernetes_settings_in_the_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('token = "t"\ncontainer_env = "kubernetes"\nvolume_name = "sb"\n'
                    'job_namespace = "ns1"\nnode_selector = { pool = "a" }\n'
                    'kubernetes_context = "prod"\n')
    config = load_agent_config(path, env={})
    assert (config.job_namespace, config.node_selector, config.kubernetes_context) == (
        "ns1", {"pool": "a"}, "prod")


async def test_swarm_takes_host_paths_only(tmp_path: Path) -> None:
    config = load(tmp_path, CONTAINER_ENV="swarm", STOREBASE="/srv/storeBase",
                  DOCKER_HOST="unix:///run/swarm.sock")
    runtime = create_runtime(config)
    try:
        assert isinstance(runtime, SwarmRuntime) and runtime.name == "swarm"
        assert runtime.settings.base_url == "unix:///run/swarm.sock"
        assert not runtime.capabilities().gpus
    finally:
        await runtime.close()
    with pytest.raises(AgentConfigError) as err:
        load(tmp_path, CONTAINER_ENV="swarm", COMPUTE_VOLUME_TYPE="docker_local_volume",
             VOLUME_NAME="v")
    assert "swarm supports host" in str(err.value)


def test_invalid_kubernetes_settings_are_named(tmp_path: Path) -> None:
    config = load(tmp_path, CONTAINER_ENV="kubernetes", VOLUME_NAME="sb",
                  JOB_NAMESPACE="Not_A_Namespace")
    with pytest.raises(ValueError, match="JOB_NAMESPACE"):
        create_runtime(config)
