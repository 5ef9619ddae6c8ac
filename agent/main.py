"""``pfleet-agent``: the per-node daemon, and the ``Agent`` the controller embeds
for ``--local-agent``.

Startup: config, outbox, runtime probe, re-attach to the workloads of a previous
run; then the link to the controller, the supervisor's polling and the local
``/health`` endpoint run side by side.  Stopping the agent never stops its jobs:
they keep running and are found again at the next start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import signal
import ssl
import sys
from pathlib import Path
from typing import Any

from aiohttp import web

from agent import protocol as p
from agent.config import AgentConfig, AgentConfigError, load_agent_config
from agent.discovery import SERVICE_TYPE, DiscoveredController, discover_controller
from agent.health import collect_metrics, health_app
from agent.link import Backoff, Link, LinkCallbacks, LinkRefused
from agent.outbox import Outbox
from agent.runtimes import create_runtime
from agent.runtimes.base import Probe, Runtime
from agent.supervisor import Supervisor

log = logging.getLogger("pfleet.agent")

EXIT_CONFIG = 2
EXIT_REFUSED = 78  # EX_CONFIG: the controller refuses us; systemd must not restart-loop
AGENT_VERSION = "0.1.0"
DISCOVERY_TIMEOUT = 5.0  # seconds one zeroconf browse may take; retried with backoff


class Agent:
    def __init__(self, config: AgentConfig, runtime: Runtime | None = None, *,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        """``ssl_context`` replaces the one built from ``ca_file``/``client_cert``
        (the embedded agent trusts the controller's own certificate)."""
        self.config = config
        self.runtime = runtime or create_runtime(config)
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self.outbox = Outbox(config.state_dir / "outbox")
        self.supervisor = Supervisor(self.runtime, self.outbox, config.state_dir,
                                     config.storebase_mount, poll_interval=config.poll_interval,
                                     remove_jobs=config.remove_jobs)
        self.supervisor.op_runner.enforce_limits = not config.ignore_limits
        self.link = Link(config.controller_url, config.token, self.outbox,
                         LinkCallbacks(hello=self.hello, heartbeat=self.heartbeat,
                                       inventory=self.supervisor.inventory,
                                       command=self.command))
        self._fixed_ssl_context = ssl_context
        self.probe = Probe("undetected", "not probed yet")
        self._metrics_problems: list[str] = []
        self._health_runner: web.AppRunner | None = None

    def _ssl_context(self, url: str) -> ssl.SSLContext | None:
        """TLS for ``wss://``: the controller's CA (``ca_file``, else the system's trust
        store) and, when configured, this agent's client certificate."""
        if not url.startswith("wss://"):
            return None
        if self._fixed_ssl_context is not None:
            return self._fixed_ssl_context
        try:
            context = ssl.create_default_context(cafile=self.config.ca_file)
        except (ssl.SSLError, OSError) as exc:
            raise AgentConfigError([f"PFLEET_CA_FILE: cannot load {self.config.ca_file} "
                                    f"(PEM CA certificates expected): {exc}"]) from None
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.config.client_cert:
            try:
                context.load_cert_chain(self.config.client_cert, self.config.client_key,
                                        password=lambda: b"")
            except (ssl.SSLError, OSError) as exc:
                raise AgentConfigError([
                    f"PFLEET_CLIENT_CERT / PFLEET_CLIENT_KEY: cannot load "
                    f"{self.config.client_cert} (PEM certificate and matching unencrypted "
                    f"PEM key expected): {exc}"]) from None
        return context

    def _trust_description(self) -> str:
        if self._fixed_ssl_context is not None:
            return "the controller's own certificate"
        return (f"CA file {self.config.ca_file}" if self.config.ca_file
                else "the system trust store (no PFLEET_CA_FILE)")

    # ---------------------------------------------------------------- running

    async def run(self) -> None:
        """Run until cancelled; raises ``LinkRefused`` when the controller refuses us
        and ``AgentConfigError`` when the TLS files do not load."""
        if self.config.controller_url:
            self._configure_link(self.config.controller_url)  # fail early on bad TLS files
        self.probe = await self.runtime.probe()
        await self.supervisor.startup()
        await self._start_health_server()
        tasks = [asyncio.create_task(self._link_forever(), name="pfleet-agent-link"),
                 asyncio.create_task(self.supervisor.run_forever(), name="pfleet-agent-poll"),
                 asyncio.create_task(self._probe_loop(), name="pfleet-agent-probe")]
        log.info("agent started name=%s runtime=%s controller=%s", self.config.name,
                 self.config.runtime, self.config.controller_url or "(zeroconf discovery)")
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await self.supervisor.close()
            await asyncio.to_thread(self.outbox.close)
            if self._health_runner is not None:
                await self._health_runner.cleanup()
            await self.runtime.close()

    def _configure_link(self, url: str) -> None:
        self.link.url = url
        self.link.ssl_context = self._ssl_context(url)
        self.link.trust = self._trust_description()

    async def _link_forever(self) -> None:
        if not self.config.controller_url:
            found = await self._discover()
            self.config = dataclasses.replace(self.config, controller_url=found.url,
                                              found_by="zeroconf")
            self._configure_link(found.url)
        await self.link.run_forever()

    async def _discover(self) -> DiscoveredController:
        """Browse until a controller answers: each attempt bounded, retried with backoff
        (a controller that starts later is found)."""
        delays = Backoff(first=1.0, cap=30.0)
        attempt = 0
        while True:
            attempt += 1
            self.link.last_error = f"discovering controller (zeroconf {SERVICE_TYPE})"
            try:
                found = await discover_controller(
                    DISCOVERY_TIMEOUT, require_tls=bool(self.config.ca_file))
            except Exception as exc:  # zeroconf raises several types (no interface, ...)
                found = None
                self.link.last_error = (f"discovering controller (zeroconf {SERVICE_TYPE}): "
                                        f"{exc}")
            if found is not None:
                log.info("found controller by zeroconf name=%s url=%s version=%s", found.name,
                         found.url, found.version or "?")
                return found
            delay = delays.next()
            log.info("no controller found by zeroconf (attempt %d), browsing again in %.1f s",
                     attempt, delay)
            await asyncio.sleep(delay)

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(max(1.0, self.link.heartbeat_interval))
            self.probe = await self.runtime.probe()

    async def _start_health_server(self) -> None:
        if not self.config.health_listen:
            return
        host, _, port = self.config.health_listen.rpartition(":")
        runner = web.AppRunner(health_app(self.health_report), access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, host or "127.0.0.1", int(port)).start()
        except OSError as exc:
            await runner.cleanup()
            log.error("health endpoint not started listen=%s error=%s",
                      self.config.health_listen, exc)
            return
        self._health_runner = runner

    # ------------------------------------------------------ protocol callbacks

    def capacity(self) -> dict[str, Any]:
        return {"cpu_millicores": self.config.cpu_millicores or self.probe.cpu_millicores,
                "memory_mib": self.config.memory_mib or self.probe.memory_mib,
                "gpus": self.config.gpus or self.probe.gpus}

    def hello(self) -> p.Hello:
        caps = self.runtime.capabilities()
        return p.Hello(version=p.PROTOCOL_VERSION, agent=self.config.name,
                       runtime=self.config.runtime,
                       capabilities={"multi_worker": caps.multi_worker,
                                     "hard_memory_limit": caps.hard_memory_limit,
                                     "gpus": caps.gpus},
                       labels=dict(self.config.labels), capacity=self.capacity(),
                       software=AGENT_VERSION, found_by=self.config.found_by)

    async def heartbeat(self) -> p.Heartbeat:
        metrics = await asyncio.get_running_loop().run_in_executor(
            None, collect_metrics, self.config.storebase_mount, self.config.min_free_mib)
        self._metrics_problems = metrics.problems
        return p.Heartbeat(
            cpu_percent=metrics.cpu_percent, memory_total_mib=metrics.memory_total_mib,
            memory_available_mib=metrics.memory_available_mib,
            disk_total_mib=metrics.disk_total_mib, disk_free_mib=metrics.disk_free_mib,
            gpus=self.capacity()["gpus"], runtime_ok=self.probe.health == "healthy",
            running=self.supervisor.running_jobs(), problems=self.problems(),
            capacity=self.capacity())

    def problems(self) -> list[str]:
        out = list(self._metrics_problems)
        if self.probe.health != "healthy":
            out.append(f"runtime {self.config.runtime}: {self.probe.reason or self.probe.health}")
        return out

    def health_report(self) -> dict[str, Any]:
        problems = self.problems()
        if not self.link.connected.is_set():
            problems.append(f"controller link down: {self.link.last_error or 'connecting'}")
        return {"agent": self.config.name, "status": "unhealthy" if problems else "healthy",
                "problems": problems, "runtime": self.config.runtime,
                "controller": self.config.controller_url, "found_by": self.config.found_by,
                "connected": self.link.connected.is_set(),
                "running_jobs": len(self.supervisor.running_jobs()),
                "capacity": self.capacity(), "outbox": len(self.outbox)}

    async def command(self, message: p.Message) -> p.Message | None:
        if isinstance(message, p.Run):
            await self.supervisor.run(message.spec)
        elif isinstance(message, p.Remove):
            await self.supervisor.remove(message.job, message.attempt, message.name)
            if message.request:
                return p.RemoveReply(request=message.request)
        elif isinstance(message, p.Cancel):
            await self.supervisor.cancel(message.job, message.attempt)
        elif isinstance(message, p.LogsRequest):
            logs = await self.supervisor.logs(message.job, message.attempt, message.tail)
            return p.LogsReply(request=message.request, logs=logs)
        elif not isinstance(message, p.Welcome):
            log.warning("unexpected message from controller type=%s", message.type)
        return None


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO), stream=sys.stderr,
        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pfleet-agent", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="TOML file (default /etc/pfleet/agent.toml)")
    parser.add_argument("--check-config", action="store_true",
                        help="validate the configuration and exit")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        config = load_agent_config(args.config)
    except AgentConfigError as exc:
        print(f"pfleet-agent: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.check_config:
        print(f"pfleet-agent: configuration OK (agent {config.name}, runtime {config.runtime})")
        return 0
    return asyncio.run(_serve(config))


async def _serve(config: AgentConfig) -> int:
    agent = Agent(config)
    task = asyncio.create_task(agent.run())
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        log.info("agent stopped; its jobs keep running")
        return 0
    except LinkRefused as exc:
        log.error("controller refused this agent: %s", exc)
        return EXIT_REFUSED
    except AgentConfigError as exc:
        print(f"pfleet-agent: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return 0


if __name__ == "__main__":
    sys.exit(main())
