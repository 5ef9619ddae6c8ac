"""``pfleet-controller``: load the settings, serve the pfcon API, optionally run the
embedded local agent.  Everything else lives in ``create_app``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import sys
from typing import Any

from aiohttp import web

from controller.app import LOCAL_AGENT_JTIS, create_app
from controller.config import (
    DEV_PASSWORD,
    DEV_USER,
    WILDCARD_HOSTS,
    Config,
    load_config,
    server_ssl_context,
)
from controller.errors import ConfigError
from controller.local_agent import LocalAgent
from controller.store import STORE

log = logging.getLogger("pfleet.controller")

SHUTDOWN_TIMEOUT = 30.0


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO), stream=sys.stderr,
        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pfleet-controller",
                                     description="pfcon-compatible fleet controller")
    parser.add_argument("--dev", action="store_true",
                        help="development mode: documented dev credentials when unset")
    parser.add_argument("--local-agent", action="store_true",
                        help="also run an agent in this process (the embedded default)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        config = load_config(dev=args.dev)
    except ConfigError as exc:
        print(f"pfleet-controller: {exc}", file=sys.stderr)
        return 2
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(serve(config, local_agent=args.local_agent))


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop when it is installed (a dependency): the controller spends most
    of its time in the loop and its transports, and a bench-9 job costs about 8 % less
    CPU on it; asyncio's own where uvloop has no build."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


async def serve(config: Config, *, local_agent: bool) -> int:
    app = create_app(config)
    # A 4 MiB read buffer keeps large uploads streaming instead of pausing the socket
    # every 64 KiB (measured: about twice the throughput for multi-GiB zips).
    runner = web.AppRunner(app, shutdown_timeout=SHUTDOWN_TIMEOUT, access_log=None,
                           read_bufsize=4 << 20)
    await runner.setup()
    site = web.TCPSite(runner, config.listen_host, config.listen_port,
                       ssl_context=server_ssl_context(config))
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        print(f"pfleet-controller: cannot listen on {config.listen_host}:{config.listen_port}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return 1
    port = _bound_port(runner, config.listen_port)
    agent = None
    if local_agent:
        agent = LocalAgent(config, app[STORE], port, trusted_jtis=app[LOCAL_AGENT_JTIS])
        await agent.start()
    advert = Advertisement(config, port) if config.zeroconf else None
    if advert is not None:
        advert.start()
    _announce(config, port, local_agent, advert)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        if advert is not None:
            await advert.stop()
        if agent is not None:
            await agent.stop()
        with contextlib.suppress(Exception):
            await runner.cleanup()
    return 0


def _bound_port(runner: web.AppRunner, configured: int) -> int:
    """The port really listened on (``PFLEET_LISTEN=host:0`` picks a free one)."""
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return configured


SERVICE_TYPE = "_pfleet._tcp.local."


class Advertisement:
    """The controller's zeroconf record (DESIGN §5: first contact on a LAN only).

    ``_pfleet._tcp.local.`` with TXT ``path=/api/v1/``, ``tls=0|1``, ``version``; IPv4
    only, on ``PFLEET_ZEROCONF_INTERFACES``, else the listen address when it is a
    specific one, else every non-loopback IPv4 address of the machine.  Registration
    (probing, then announcing) runs in the background so the API is not held up; the
    record is withdrawn (goodbye packets) at shutdown.
    """

    def __init__(self, config: Config, port: int) -> None:
        self.config = config
        self.port = port
        self.addresses = advertised_addresses(config)
        self._zc: Any = None
        self._task: asyncio.Task[None] | None = None
        self._info: Any = None

    def start(self) -> None:
        if not self.addresses:
            log.warning("zeroconf: no IPv4 address to advertise on; not advertising")
            return
        self._task = asyncio.create_task(self._register(), name="pfleet-zeroconf")

    async def _register(self) -> None:
        from zeroconf import IPVersion, ServiceInfo
        from zeroconf.asyncio import AsyncZeroconf

        host = socket.gethostname().split(".")[0] or "pfleet"
        self._info = ServiceInfo(
            SERVICE_TYPE, f"pfleet-{host}-{self.port}.{SERVICE_TYPE}",
            addresses=[socket.inet_aton(a) for a in self.addresses], port=self.port,
            properties={"path": "/api/v1/", "tls": "1" if self.config.tls else "0",
                        "version": self.config.server_version},
            server=f"pfleet-{host}.local.")
        try:
            self._zc = AsyncZeroconf(interfaces=list(self.addresses),
                                     ip_version=IPVersion.V4Only)
            announced = await self._zc.async_register_service(self._info,
                                                              allow_name_change=True)
            await announced
        except Exception as exc:  # zeroconf raises several unrelated types
            log.error("zeroconf: advertising failed addresses=%s error=%s",
                      ",".join(self.addresses), exc)
            return
        log.info("zeroconf: advertising name=%s addresses=%s port=%d", self._info.name,
                 ",".join(self.addresses), self.port)

    async def stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._zc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._zc.async_unregister_all_services(), 5.0)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._zc.async_close(), 5.0)


def advertised_addresses(config: Config) -> list[str]:
    if config.zeroconf_interfaces:
        return list(config.zeroconf_interfaces)
    if config.listen_host not in WILDCARD_HOSTS:
        return [config.listen_host]
    from zeroconf import get_all_addresses

    return [a for a in get_all_addresses() if not a.startswith("127.")]


def _announce(config: Config, port: int, local_agent: bool,
              advert: Advertisement | None) -> None:
    host = "127.0.0.1" if config.listen_host in WILDCARD_HOSTS else config.listen_host
    scheme = "https" if config.tls else "http"
    lines = [f"pfleet controller listening: {scheme}://{host}:{port}/api/v1/",
             f"  storage: {config.storage_env} (storeBase {config.storebase_mount}), "
             f"state: {config.state_dir}"]
    if config.dev:
        lines.append(f"  dev mode: credentials {DEV_USER} / {DEV_PASSWORD}"
                     if config.pfcon_user == DEV_USER and config.pfcon_password == DEV_PASSWORD
                     else "  dev mode: credentials from PFCON_USER / PFCON_PASSWORD")
    if config.tls:
        lines.append(f"  tls: {config.tls_cert}"
                     + (f"; agents need a client certificate from {config.tls_client_ca}"
                        if config.tls_client_ca else ""))
    if advert is not None:
        lines.append(f"  zeroconf: {SERVICE_TYPE} on "
                     f"{', '.join(advert.addresses) or 'no address'}")
    if local_agent:
        lines.append("  local agent: on (this machine's container engine)")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    sys.exit(main())
