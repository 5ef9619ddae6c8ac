"""Build a runtime from the agent's settings.  Each factory imports its backend
only when called (see ``agent.runtimes.RUNTIMES``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.config import AgentConfig
    from agent.runtimes.base import Runtime


def docker_runtime(config: AgentConfig) -> Runtime:
    """Docker or Podman (through its Docker-compatible socket)."""
    from agent.runtimes.docker import DockerRuntime, DockerSettings

    engine = "podman" if config.runtime == "podman" else "docker"
    volume_type = ("docker_local_volume" if config.compute_volume_type == "docker_local_volume"
                   else "host")
    return DockerRuntime(DockerSettings(
        base_url=config.docker_host, engine=engine, agent_name=config.name,
        volume_type=volume_type, storebase=config.storebase, volume_name=config.volume_name,
        container_user=config.container_user, job_labels=dict(config.job_labels),
        ignore_limits=config.ignore_limits, shm_size_mib=config.shm_size_mib,
        enable_home_workaround=config.enable_home_workaround, gpus=config.gpus))


def fake_runtime(config: AgentConfig) -> Runtime:
    from agent.runtimes.fake import FakeRuntime

    return FakeRuntime(cpu_millicores=config.cpu_millicores or 64_000,
                       memory_mib=config.memory_mib or 256_000, gpus=config.gpus)
