"""A controller process and one SLURM agent process on the suite's one-node SLURM,
driven by python-pfconclient (the helpers of ``tests.e2e``), optionally both run as
an unprivileged user: the service account an HPC site would give pfleet, owning
the storeBase, submitting the jobs and running them."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from pfconclient import client as pfc

from tests.conftest import free_port
from tests.e2e.test_pfconclient_zipfile import client_for
from tests.support.processes import ControllerProc, Proc, agent_proc, controller_proc, http_json
from tests.support.slurm import SlurmCluster


def as_user(uid: int | None, argv: list[str]) -> list[str]:
    if uid is None:
        return argv
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", *argv]


class SlurmDeployment:
    """``pfleet-controller`` plus ``pfleet-agent`` with ``CONTAINER_ENV=slurm``.

    ``workdir`` holds the state, the storeBase and the logs; with ``user`` it must be
    reachable by that user (the suite's tmp_path is not: use the cluster's run dir).
    """

    def __init__(self, workdir: Path, cluster: SlurmCluster, agent_env: dict[str, str], *,
                 user: int | None = None, name: str = "login1",
                 controller_args: list[str] | None = None) -> None:
        self.workdir = workdir
        self.cluster = cluster
        self.user = user
        self.storebase = workdir / "storeBase"
        self.storebase.mkdir(parents=True, exist_ok=True)
        if user is not None:
            for path in (workdir, self.storebase):
                os.chown(path, user, user)
        home = {"HOME": str(workdir)} if user is not None else {}
        self.health_port = free_port()
        self.controller: ControllerProc = controller_proc(
            workdir, free_port(), {"STOREBASE_MOUNT": str(self.storebase), **home},
            local_agent=False, extra_args=controller_args)
        self.controller.argv = as_user(user, self.controller.argv)
        self.controller.start()
        self.controller.wait_ready()
        self.agent: Proc = agent_proc(workdir, name, self.controller, {
            "CONTAINER_ENV": "slurm", "STOREBASE": str(self.storebase),
            "PFLEET_AGENT_POLL_INTERVAL": "1", "PFLEET_SLURM_COMMAND_TIMEOUT": "3",
            "PFLEET_HEALTH_LISTEN": f"127.0.0.1:{self.health_port}",
            **cluster.env, **home, **agent_env})
        self.agent.argv = as_user(user, self.agent.argv)
        self.name = name
        self.agent.start()
        self.controller.wait_agent(name)

    @property
    def work_dir(self) -> Path:
        """The agent's SLURM work directory (batch scripts, output files)."""
        return self.workdir / f"agent-{self.name}" / "slurm"

    def client(self) -> pfc.Client:
        return client_for(self.controller.base)

    def health(self) -> tuple[int, Any]:
        return http_json("GET", f"http://127.0.0.1:{self.health_port}/health", timeout=5)

    def slurm_jobs(self, jid: str) -> dict[str, str]:
        """SLURM job id -> state of the jobs named ``jid``."""
        out = self.cluster.check("squeue", "-h", "--states=all", "-n", jid, "-o", "%i %T")
        return dict(line.split() for line in out.splitlines() if line.strip())

    def stop(self) -> None:
        self.agent.stop()
        self.controller.stop()

    def remove(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)
