"""Runtime registry: a name maps to "module:Class", imported only when chosen, so a
login node never imports the Kubernetes client nor a Docker host the SLURM code."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.config import AgentConfig
    from agent.runtimes.base import Runtime

RUNTIMES: dict[str, str] = {
    "docker": "agent.runtimes.factories:docker_runtime",
    "podman": "agent.runtimes.factories:docker_runtime",
    "swarm": "agent.runtimes.factories:swarm_runtime",
    "kubernetes": "agent.runtimes.factories:kubernetes_runtime",
    "slurm": "agent.runtimes.factories:slurm_runtime",
    "fake": "agent.runtimes.factories:fake_runtime",
}


def create_runtime(config: AgentConfig) -> Runtime:
    module_name, _, factory = RUNTIMES[config.runtime].partition(":")
    module = importlib.import_module(module_name)
    runtime: Runtime = getattr(module, factory)(config)
    return runtime
