"""The application factory: the only place that knows every part of the controller.

Resources start in dependency order through one ``cleanup_ctx`` generator each
(store, then fleet), and stop in reverse, only if they started.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from aiohttp import WSCloseCode, web

from controller.api import admin, legacy, pfcon
from controller.api.middleware import (
    CONFIG,
    VERIFIER,
    auth_middleware,
    error_middleware,
    options_middleware,
    public,
)
from controller.auth import ClientTokenVerifier, decode_agent_token
from controller.config import Config
from controller.errors import ApiError, Unauthorized
from controller.fleet import FLEET, Fleet
from controller.jobs import JOBS, JobService
from controller.storage import modes
from controller.storage.zipmode import prepare_upload_dirs
from controller.store import STORE, Store

log = logging.getLogger("pfleet.controller")

FORM_BODY_LIMIT = 8 << 20  # url-encoded forms; multipart uploads are streamed instead

# Token ids of agents running inside this process (``--local-agent``): minted at
# start, never written anywhere, so they stand in for a client certificate.
LOCAL_AGENT_JTIS = web.AppKey("pfleet.local_agent_jtis", set)


def create_app(config: Config) -> web.Application:
    app = web.Application(
        middlewares=[error_middleware,
                     web.normalize_path_middleware(append_slash=True, remove_slash=False,
                                                   redirect_class=web.HTTPPermanentRedirect),
                     auth_middleware, options_middleware],
        client_max_size=FORM_BODY_LIMIT)
    app[CONFIG] = config
    app[VERIFIER] = ClientTokenVerifier(config)
    app[LOCAL_AGENT_JTIS] = set()
    app.cleanup_ctx.append(_store_ctx)
    app.cleanup_ctx.append(_fleet_ctx)
    app.on_shutdown.append(_close_agent_links)
    if config.dev and config.innetwork and config.storage_env == "swift":
        app.cleanup_ctx.append(_swift_container_ctx)
    app.add_routes(pfcon.routes)
    app.add_routes(legacy.routes)
    app.add_routes(admin.routes)
    app.router.add_get("/api/v1/fleet/connect", _fleet_connect)
    return app


async def _close_agent_links(app: web.Application) -> None:
    """Close the agents' WebSockets when shutdown starts (they reconnect): aiohttp would
    otherwise wait its whole shutdown timeout for these long-lived handlers."""
    fleet = app[FLEET]
    for ws in list(fleet.sockets):
        await fleet.close_link(ws, WSCloseCode.GOING_AWAY, b"controller shutting down")


@public
async def _fleet_connect(request: web.Request) -> web.StreamResponse:
    if request.app[CONFIG].tls_client_ca is not None:
        _require_client_certificate(request)
    return await request.app[FLEET].handle_connect(request)


def _require_client_certificate(request: web.Request) -> None:
    """With ``PFLEET_TLS_CLIENT_CA`` the listener asks for client certificates but lets
    clients without one through (CUBE has none), so the agent endpoint checks here: a
    certificate was presented, hence verified against that CA in the handshake.

    The embedded agent is exempt: its token was minted in this process and it dials
    the listener from this machine (the peer address is the socket's own address).
    """
    transport = request.transport
    if transport is not None and transport.get_extra_info("peercert"):
        return
    if transport is not None and _is_local_agent(request):
        return
    log.warning("agent refused: no client certificate remote=%s", request.remote)
    raise ApiError("a client certificate signed by PFLEET_TLS_CLIENT_CA is required",
                   status=403)


def _is_local_agent(request: web.Request) -> bool:
    jtis = request.app[LOCAL_AGENT_JTIS]
    if not jtis or request.transport is None:
        return False
    peer = request.transport.get_extra_info("peername")
    own = request.transport.get_extra_info("sockname")
    if not peer or not own or peer[0] != own[0]:
        return False
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme != "Bearer" or not token:
        return False
    try:
        jti = decode_agent_token(request.app[CONFIG], token).jti
    except Unauthorized:  # refused by the fleet below, with its own answer
        return False
    return jti in jtis


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    config.storebase_mount.mkdir(parents=True, exist_ok=True)
    if not config.innetwork:  # in-network storeBases belong to CUBE: nothing of ours there
        await asyncio.get_running_loop().run_in_executor(
            None, prepare_upload_dirs, config.storebase_mount, config.state_dir / "uploads")
    store = Store(config.state_dir / "pfleet.sqlite3")
    await store.open()
    app[STORE] = store
    yield
    await store.close()


async def _swift_container_ctx(app: web.Application) -> AsyncIterator[None]:
    """Dev mode creates the Swift container, as pfcon does; a Swift that does not
    answer yet is logged, not fatal (copy jobs then fail with the reason)."""
    config = app[CONFIG]
    try:
        await asyncio.get_running_loop().run_in_executor(
            None, modes.ensure_swift_container, config)
    except Exception as exc:  # swiftclient raises several unrelated types
        log.error("could not create swift container container=%s error=%s",
                  config.swift_container, exc)
    yield


async def _fleet_ctx(app: web.Application) -> AsyncIterator[None]:
    fleet = Fleet(app[CONFIG], app[STORE])
    app[FLEET] = fleet
    app[JOBS] = JobService(app[CONFIG], app[STORE], fleet)
    await fleet.start()
    yield
    await fleet.stop()
