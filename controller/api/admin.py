"""The operators' API behind the ``pfleet`` command: agents, agent tokens, jobs.

Authenticated like the pfcon routes (the same client token).  Not part of pfcon's
contract, so the shapes are pfleet's own.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from aiohttp import web

from agent.protocol import encode_dict
from controller.api.middleware import CONFIG, json_response
from controller.auth import issue_agent_token
from controller.errors import BadRequest, Conflict, NotFound
from controller.fleet import FLEET, SUSPECT_AFTER_MISSED
from controller.states import pfcon_status
from controller.store import STORE

routes = web.RouteTableDef()

AGENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


@routes.get("/api/v1/agents/")
async def list_agents(request: web.Request) -> web.Response:
    fleet = request.app[FLEET]
    config = request.app[CONFIG]
    now_wall, now_mono = time.time(), time.monotonic()
    active = await request.app[STORE].active_counts()
    out: list[dict[str, Any]] = []
    for row in await request.app[STORE].agents():
        session = fleet.sessions.get(row.name)
        # A connected agent's latest heartbeat is in memory (the store keeps the last
        # one that changed something, for agents that are gone).
        hb = (encode_dict(session.heartbeat) if session is not None and session.heartbeat
              else row.heartbeat or {})
        seen_ago = (now_mono - session.last_seen if session is not None
                    else now_wall - row.last_seen)
        if session is None:
            state = "disconnected"
        elif now_mono - session.last_seen > SUSPECT_AFTER_MISSED * config.heartbeat_interval:
            state = "suspect"
        elif hb.get("problems"):
            state = "unhealthy"
        else:
            state = "healthy"
        if row.draining and state != "disconnected":
            state = "draining"
        out.append({
            "name": row.name, "state": state, "found_by": row.found_by,
            "runtime": (row.hello or {}).get("runtime", ""),
            "labels": (row.hello or {}).get("labels", {}),
            "capacity": hb.get("capacity") or (row.hello or {}).get("capacity", {}),
            "cpu_percent": hb.get("cpu_percent"),
            "memory_available_mib": hb.get("memory_available_mib"),
            "disk_free_mib": hb.get("disk_free_mib"),
            "running": len(hb.get("running", [])),
            "active_jobs": active.get(row.name, 0),
            "draining": row.draining,
            "problems": hb.get("problems", []),
            "last_seen_seconds_ago": round(seen_ago, 1),
        })
    return json_response(request, {"agents": out})


@routes.post("/api/v1/agents/tokens/")
async def create_agent_token(request: web.Request) -> web.Response:
    try:
        body = json.loads(await request.read() or b"{}")
    except (ValueError, RecursionError):
        raise BadRequest("body must be JSON: {\"name\": \"AGENT\"}") from None
    name = body.get("name") if isinstance(body, dict) else None
    if not isinstance(name, str) or not AGENT_NAME.fullmatch(name):
        raise BadRequest({"name": "an agent name of letters, digits, '_', '.', '-' "
                                  "(at most 63 characters) is required"})
    ttl = body.get("ttl_seconds")
    if ttl is not None and (not isinstance(ttl, int) or isinstance(ttl, bool) or ttl <= 0):
        raise BadRequest({"ttl_seconds": "a positive number of seconds"})
    token, jti = issue_agent_token(request.app[CONFIG], name, ttl)
    await request.app[STORE].add_token(jti, name)
    return json_response(request, {"name": name, "token": token}, 201)


@routes.delete("/api/v1/agents/{name}/tokens/")
async def revoke_agent_tokens(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    count = await request.app[STORE].revoke_tokens(name)
    if not count:
        raise NotFound(f"no active token for agent {name!r}")
    session = request.app[FLEET].sessions.get(name)
    if session is not None:
        await request.app[FLEET].close_link(session.ws, 4001, b"token revoked")
    return json_response(request, {"name": name, "revoked": count})


@routes.delete("/api/v1/agents/{name}/")
async def forget_agent(request: web.Request) -> web.Response:
    """Decommission an agent: forget it and revoke its tokens.  Refused while it is
    connected (revoke its token or stop it first) or while jobs are placed on it (they
    finish, or its lease marks them lost): forgetting it then would strand them."""
    name = request.match_info["name"]
    fleet = request.app[FLEET]
    if name in fleet.sessions:
        raise Conflict(f"agent {name!r} is connected: stop it or revoke its token "
                       "(pfleet token revoke) first")
    known, active = await request.app[STORE].forget_agent(name)
    if not known:
        raise NotFound(f"no agent named {name!r}")
    if active:
        raise Conflict(f"agent {name!r} still has {active} job(s) placed on it: they finish "
                       "when it comes back, or become undefined when its lease runs out")
    fleet.forget(name)
    session = fleet.sessions.get(name)
    if session is not None:  # it finished a handshake meanwhile: its tokens are revoked now
        await fleet.close_link(session.ws, 4001, b"token revoked")
    return web.Response(status=204)


@routes.post("/api/v1/agents/{name}/drain/")
async def drain_agent(request: web.Request) -> web.Response:
    """Stop placing work on the agent; what runs there finishes."""
    return await _set_draining(request, True)


@routes.post("/api/v1/agents/{name}/undrain/")
async def undrain_agent(request: web.Request) -> web.Response:
    return await _set_draining(request, False)


async def _set_draining(request: web.Request, draining: bool) -> web.Response:
    name = request.match_info["name"]
    store = request.app[STORE]
    if not await store.set_draining(name, draining):
        raise NotFound(f"no agent named {name!r}")
    fleet = request.app[FLEET]
    if draining:
        fleet.draining.add(name)
    else:
        fleet.draining.discard(name)
        fleet.kick()
    active = (await store.active_counts()).get(name, 0)
    return json_response(request, {"name": name, "draining": draining, "active_jobs": active})


@routes.get("/api/v1/fleet/jobs/")
async def list_jobs(request: web.Request) -> web.Response:
    try:
        limit = max(1, min(int(request.query.get("limit", "200")), 10_000))
    except ValueError:
        raise BadRequest({"limit": "must be an integer"}) from None
    rows = await request.app[STORE].list_jobs(limit, include_removed="all" in request.query)
    return json_response(request, {"jobs": [{
        "jid": j.jid, "name": j.name, "kind": j.kind, "state": j.state.value,
        "status": pfcon_status(j.state), "attempt": j.attempt, "agent": j.agent or "",
        "message": j.message, "image": j.image, "removed": j.removed,
        "created_at": j.created_at, "updated_at": j.updated_at} for j in rows]})
