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


def swarm_runtime(config: AgentConfig) -> Runtime:
    """Services on a Docker swarm manager (``DOCKER_HOST``); host-path storeBase."""
    from agent.runtimes.docker import DockerSettings
    from agent.runtimes.swarm import SwarmRuntime

    return SwarmRuntime(DockerSettings(
        base_url=config.docker_host, engine="docker", agent_name=config.name,
        volume_type="host", storebase=config.storebase, container_user=config.container_user,
        job_labels=dict(config.job_labels), ignore_limits=config.ignore_limits,
        shm_size_mib=config.shm_size_mib,
        enable_home_workaround=config.enable_home_workaround))


def kubernetes_runtime(config: AgentConfig) -> Runtime:
    """batch/v1 Jobs on one PVC (``VOLUME_NAME``) in ``JOB_NAMESPACE``."""
    from agent.runtimes.kubernetes import KubernetesRuntime, KubernetesSettings

    secrets = tuple(s.strip() for s in (config.image_pull_secrets or "").split(",") if s.strip())
    return KubernetesRuntime(KubernetesSettings(
        volume_name=config.volume_name or "", namespace=config.job_namespace,
        agent_name=config.name, node_selector=dict(config.node_selector),
        image_pull_secrets=secrets, job_labels=dict(config.job_labels),
        container_user=config.container_user, ignore_limits=config.ignore_limits,
        shm_size_mib=config.shm_size_mib, enable_home_workaround=config.enable_home_workaround,
        job_ttl_seconds=config.kubernetes_job_ttl,
        active_deadline_seconds=config.kubernetes_active_deadline,
        kubeconfig=config.kubeconfig, context=config.kubernetes_context, gpus=config.gpus))


def slurm_runtime(config: AgentConfig) -> Runtime:
    """One sbatch job per attempt, submitted from this (login) node."""
    from agent.runtimes.slurm import SlurmRuntime, SlurmSettings

    return SlurmRuntime(SlurmSettings(
        agent_name=config.name,
        work_dir=str(config.slurm_work_dir or config.state_dir / "slurm"),
        storebase=config.storebase, launcher=config.slurm_launcher,
        partition=config.slurm_partition, account=config.slurm_account, qos=config.slurm_qos,
        timelimit_minutes=config.timelimit_minutes, rules=tuple(config.slurm_rules),
        image_dir=config.slurm_image_dir, docker_host=config.docker_host,
        container_user=config.container_user, job_labels=dict(config.job_labels),
        ignore_limits=config.ignore_limits, shm_size_mib=config.shm_size_mib,
        enable_home_workaround=config.enable_home_workaround,
        command_timeout=config.slurm_command_timeout))


def fake_runtime(config: AgentConfig) -> Runtime:
    from agent.runtimes.fake import FakeRuntime

    return FakeRuntime(cpu_millicores=config.cpu_millicores or 64_000,
                       memory_mib=config.memory_mib or 256_000, gpus=config.gpus)
