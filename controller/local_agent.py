"""The embedded agent of ``pfleet-controller --local-agent`` (DESIGN §9).

The one place the controller imports the agent package beyond ``agent.protocol``:
an in-process agent that dials the controller over loopback with a token minted
at start, speaking the same protocol as any remote agent.  Its runtime settings
come from the controller's own environment (pfcon's names), so a single-host pfcon
deployment's settings carry over unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any

from controller.auth import issue_agent_token
from controller.config import Config
from controller.store import Store

log = logging.getLogger("pfleet.controller.local_agent")

LOCAL_AGENT_NAME = "local"


class LocalAgent:
    def __init__(self, config: Config, store: Store, port: int) -> None:
        self.config = config
        self.store = store
        self.port = port
        self.agent: Any = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        from agent.config import load_agent_config
        from agent.main import Agent

        token, jti = issue_agent_token(self.config, LOCAL_AGENT_NAME)
        await self.store.add_token(jti, LOCAL_AGENT_NAME)
        env = dict(os.environ)
        env.setdefault("STOREBASE_MOUNT", str(self.config.storebase_mount))
        env.setdefault("PFLEET_AGENT_STATE_DIR", str(self.config.state_dir / "agent"))
        env.setdefault("PFLEET_HEALTH_LISTEN", "127.0.0.1:30006")
        env.setdefault("COMPUTE_VOLUME_TYPE", self.config.compute_volume_type)
        env.setdefault("CONTAINER_ENV", self.config.container_env)
        env["PFLEET_AGENT_NAME"] = LOCAL_AGENT_NAME
        env["PFLEET_AGENT_TOKEN"] = token
        env["PFLEET_CONTROLLER_URL"] = f"ws://127.0.0.1:{self.port}/api/v1/fleet/connect"
        agent_config = load_agent_config(env=env, found_by="local")
        self.agent = Agent(agent_config)
        self._task = asyncio.create_task(self.agent.run(), name="pfleet-local-agent")
        self._task.add_done_callback(_log_end)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task


def _log_end(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("local agent stopped: %s", task.exception())
