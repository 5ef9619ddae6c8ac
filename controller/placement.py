"""Which agent runs a job (DESIGN §6).  Pure functions over snapshots; no I/O.

Filter: connected, not draining, not suspect, runtime healthy, can do the job
(workers, GPUs), labels match the selector, the request fits the free capacity.
Score: spread (least loaded after placement) by default, bin-pack (most loaded)
as an option.  A job nobody can take now waits; one nobody could *ever* take is
refused at submit (``never_fits``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

Strategy = Literal["spread", "binpack"]


@dataclass(frozen=True)
class Request:
    cpu_millicores: int
    memory_mib: int
    gpus: int = 0
    workers: int = 1


@dataclass
class AgentView:
    name: str
    cpu_millicores: int
    memory_mib: int
    gpus: int = 0
    multi_worker: bool = False
    labels: dict[str, str] = field(default_factory=dict)
    connected: bool = True
    suspect: bool = False
    draining: bool = False
    healthy: bool = True
    used_cpu: int = 0
    used_memory: int = 0
    used_gpus: int = 0

    def can_ever_run(self, req: Request) -> bool:
        return (req.cpu_millicores <= self.cpu_millicores
                and req.memory_mib <= self.memory_mib
                and req.gpus <= self.gpus
                and (req.workers == 1 or (self.multi_worker and req.workers >= 1)))

    def fits_now(self, req: Request) -> bool:
        return (self.used_cpu + req.cpu_millicores <= self.cpu_millicores
                and self.used_memory + req.memory_mib <= self.memory_mib
                and self.used_gpus + req.gpus <= self.gpus)

    def load_after(self, req: Request) -> float:
        cpu = (self.used_cpu + req.cpu_millicores) / max(self.cpu_millicores, 1)
        mem = (self.used_memory + req.memory_mib) / max(self.memory_mib, 1)
        return max(cpu, mem)

    def take(self, req: Request) -> None:
        self.used_cpu += req.cpu_millicores
        self.used_memory += req.memory_mib
        self.used_gpus += req.gpus

    def give_back(self, req: Request) -> None:
        """Undo ``take`` (the job it was taken for did not start here)."""
        self.used_cpu -= req.cpu_millicores
        self.used_memory -= req.memory_mib
        self.used_gpus -= req.gpus


def matches(labels: Mapping[str, str], selector: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def never_fits(req: Request, agents: Iterable[AgentView],
               selector: Mapping[str, str] | None = None) -> str | None:
    """Why no known agent could ever run ``req``, or None when one could (or when
    no agent is known yet: the job then waits for one)."""
    pool = [a for a in agents if matches(a.labels, selector or {})]
    if not pool:
        return None
    if any(a.can_ever_run(req) for a in pool):
        return None
    if req.workers < 1:
        return f"number_of_workers must be at least 1, got number_of_workers={req.workers}"
    if req.workers != 1 and not any(a.multi_worker for a in pool):
        return ("Compute environment only supports number_of_workers=1, "
                f"got number_of_workers={req.workers}")
    if req.gpus and all(a.gpus < req.gpus for a in pool):
        most = max(a.gpus for a in pool)
        return f"gpu_limit={req.gpus} but no agent has more than {most} GPU(s)"
    if all(a.cpu_millicores < req.cpu_millicores for a in pool):
        most = max(a.cpu_millicores for a in pool)
        return f"cpu_limit={req.cpu_millicores} but no agent has more than {most} millicores"
    if all(a.memory_mib < req.memory_mib for a in pool):
        most = max(a.memory_mib for a in pool)
        return f"memory_limit={req.memory_mib} but no agent has more than {most} MiB"
    return ("no single agent offers cpu_limit, memory_limit, gpu_limit and "
            "number_of_workers together")


def choose(req: Request, agents: Iterable[AgentView], *, strategy: Strategy = "spread",
           selector: Mapping[str, str] | None = None) -> AgentView | None:
    """The agent to run ``req`` now, or None if none has room."""
    candidates = [a for a in agents
                  if a.connected and not a.suspect and not a.draining and a.healthy
                  and matches(a.labels, selector or {})
                  and a.can_ever_run(req) and a.fits_now(req)]
    if not candidates:
        return None
    if strategy == "binpack":
        return max(candidates, key=lambda a: (a.load_after(req), a.name))
    return min(candidates, key=lambda a: (a.load_after(req), a.name))
