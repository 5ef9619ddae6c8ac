"""The embedded agent of ``pfleet-controller --local-agent`` (DESIGN §9).

The one place the controller imports the agent package beyond ``agent.protocol``:
an in-process agent that dials the controller over loopback with a token minted
at start, speaking the same protocol as any remote agent.  Its runtime settings
come from the controller's own environment (pfcon's names), so a single-host pfcon
deployment's settings carry over unchanged.

With TLS on it dials ``wss://`` on the listen address (127.0.0.1 when listening on
every address) and trusts exactly the certificate the controller serves: that file
is loaded as the only trust anchor (partial-chain verification), so no hostname check
is needed -- the certificate's names need not include 127.0.0.1.  With
``PFLEET_TLS_CLIENT_CA`` it presents no client certificate; the controller knows its
token id instead (``LOCAL_AGENT_JTIS`` in ``controller.app``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import ssl
from typing import Any

from controller.auth import issue_agent_token
from controller.config import WILDCARD_HOSTS, Config
from controller.store import Store

log = logging.getLogger("pfleet.controller.local_agent")

LOCAL_AGENT_NAME = "local"


class LocalAgent:
    def __init__(self, config: Config, store: Store, port: int, *,
                 trusted_jtis: set[str] | None = None) -> None:
        self.config = config
        self.store = store
        self.port = port
        self.trusted_jtis = trusted_jtis if trusted_jtis is not None else set()
        self.agent: Any = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        from agent.config import load_agent_config
        from agent.main import Agent

        token, jti = issue_agent_token(self.config, LOCAL_AGENT_NAME)
        await self.store.add_token(jti, LOCAL_AGENT_NAME)
        self.trusted_jtis.add(jti)
        env = dict(os.environ)
        env.setdefault("STOREBASE_MOUNT", str(self.config.storebase_mount))
        env.setdefault("PFLEET_AGENT_STATE_DIR", str(self.config.state_dir / "agent"))
        env.setdefault("PFLEET_HEALTH_LISTEN", "127.0.0.1:30006")
        env.setdefault("COMPUTE_VOLUME_TYPE", self.config.compute_volume_type)
        env.setdefault("CONTAINER_ENV", self.config.container_env)
        env["PFLEET_AGENT_NAME"] = LOCAL_AGENT_NAME
        env["PFLEET_AGENT_TOKEN"] = token
        scheme = "wss" if self.config.tls else "ws"
        env["PFLEET_CONTROLLER_URL"] = (f"{scheme}://{self._dial_host()}:{self.port}"
                                        "/api/v1/fleet/connect")
        agent_config = load_agent_config(env=env, found_by="local")
        self.agent = Agent(agent_config, ssl_context=self._ssl_context())
        self._task = asyncio.create_task(self.agent.run(), name="pfleet-local-agent")
        self._task.add_done_callback(_log_end)

    def _dial_host(self) -> str:
        host = self.config.listen_host
        if host in WILDCARD_HOSTS:
            return "127.0.0.1"
        try:
            if ipaddress.ip_address(host).version == 6:
                return f"[{host}]"
        except ValueError:
            pass
        return host

    def _ssl_context(self) -> ssl.SSLContext | None:
        if self.config.tls_cert is None:
            return None
        context = ssl.create_default_context(cafile=str(self.config.tls_cert))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        context.check_hostname = False  # the served certificate itself is the anchor
        return context

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task


def _log_end(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("local agent stopped: %s", task.exception())
