"""``pfleet-controller``: load the settings, serve the pfcon API, optionally run the
embedded local agent.  Everything else lives in ``create_app``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys

from aiohttp import web

from controller.app import create_app
from controller.config import DEV_PASSWORD, DEV_USER, Config, load_config
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
    return asyncio.run(serve(config, local_agent=args.local_agent))


async def serve(config: Config, *, local_agent: bool) -> int:
    app = create_app(config)
    runner = web.AppRunner(app, shutdown_timeout=SHUTDOWN_TIMEOUT, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.listen_host, config.listen_port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        print(f"pfleet-controller: cannot listen on {config.listen_host}:{config.listen_port}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return 1
    agent = None
    if local_agent:
        agent = LocalAgent(config, app[STORE], config.listen_port)
        await agent.start()
    _announce(config, local_agent)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        if agent is not None:
            await agent.stop()
        with contextlib.suppress(Exception):
            await runner.cleanup()
    return 0


def _announce(config: Config, local_agent: bool) -> None:
    host = "127.0.0.1" if config.listen_host in ("0.0.0.0", "::", "") else config.listen_host
    lines = [f"pfleet controller listening: http://{host}:{config.listen_port}/api/v1/",
             f"  storage: {config.storage_env} (storeBase {config.storebase_mount}), "
             f"state: {config.state_dir}"]
    if config.dev:
        lines.append(f"  dev mode: credentials {DEV_USER} / {DEV_PASSWORD}"
                     if config.pfcon_user == DEV_USER and config.pfcon_password == DEV_PASSWORD
                     else "  dev mode: credentials from PFCON_USER / PFCON_PASSWORD")
    if local_agent:
        lines.append("  local agent: on (this machine's container engine)")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    sys.exit(main())
