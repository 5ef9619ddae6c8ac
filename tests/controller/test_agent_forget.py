"""``pfleet agents forget NAME`` (``DELETE /api/v1/agents/NAME/``): decommissioning a
host that is gone for good.

Without it a retired agent stays listed forever, and its capacity still counts when a
submit is checked against "could this ever fit anywhere": a job sized for the retired
big host was accepted and waited forever.  Forgetting is refused while the agent is
connected or jobs are placed on it (it would strand them), and revokes its tokens so
it cannot come back unnoticed.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from controller.auth import issue_client_token
from controller.states import State
from tests.api.conformance_support import multipart, plugin_fields
from tests.conftest import make_config
from tests.controller.test_fleet_review import run_on
from tests.controller.test_hostile_agent import (
    Controller,
    dial,
    hello,
    serving,
    token_for,
    until,
)

BIG = {"cpu_millicores": 64_000, "memory_mib": 256_000, "gpus": 0}
SMALL = {"cpu_millicores": 2_000, "memory_mib": 4_000, "gpus": 0}


@pytest.fixture
async def ctl(tmp_path: Path) -> AsyncIterator[Controller]:
    # the default lease (10 min): placed jobs stay placed
    async with serving(make_config(tmp_path), tmp_path) as controller:
        yield controller


@pytest.fixture
async def admin(ctl: Controller) -> AsyncIterator[aiohttp.ClientSession]:
    """The operator's side: the API's base URL and a client token."""
    headers = {"Authorization": f"Bearer {issue_client_token(ctl.config)}"}
    async with aiohttp.ClientSession(f"http://127.0.0.1:{ctl.server.port}",
                                     headers=headers) as session:
        yield session


async def forget(admin: aiohttp.ClientSession, name: str) -> tuple[int, str]:
    async with admin.delete(f"/api/v1/agents/{name}/") as resp:
        return resp.status, await resp.text()


async def agent_names(admin: aiohttp.ClientSession) -> list[str]:
    async with admin.get("/api/v1/agents/") as resp:
        assert resp.status == 200
        return [a["name"] for a in (await resp.json())["agents"]]


def _jti_of(ctl: Controller, name: str) -> tuple[str, str]:
    row = ctl.store.db.execute("SELECT jti FROM agent_tokens WHERE agent = ?",
                               (name,)).fetchone()
    return row[0], name


async def gone(ctl: Controller, ws: aiohttp.ClientWebSocketResponse, name: str) -> None:
    await ws.close()
    await until(lambda: name not in ctl.fleet.sessions, f"{name} stayed connected")


async def test_a_connected_or_unknown_agent_is_not_forgotten(
        ctl: Controller, http: aiohttp.ClientSession, admin: aiohttp.ClientSession) -> None:
    ws = await dial(ctl, http, "h1", SMALL)
    status, text = await forget(admin, "h1")
    assert status == 409 and "is connected" in text and "pfleet token revoke" in text
    assert "h1" in ctl.fleet.sessions and await agent_names(admin) == ["h1"]
    status, text = await forget(admin, "nobody")
    assert status == 404 and json.loads(text) == {"message": "no agent named 'nobody'"}
    await gone(ctl, ws, "h1")


async def test_an_agent_with_jobs_placed_on_it_is_not_forgotten(
        ctl: Controller, http: aiohttp.ClientSession, admin: aiohttp.ClientSession) -> None:
    ws = await dial(ctl, http, "h1", SMALL)
    [job] = await run_on(ctl, ws, 1)
    await gone(ctl, ws, "h1")

    status, text = await forget(admin, "h1")

    assert status == 409 and "still has 1 job(s) placed on it" in text
    assert await agent_names(admin) == ["h1"]
    assert (await ctl.store.get(job.id)).state is State.RUNNING  # untouched
    assert await ctl.store.token_valid(*_jti_of(ctl, "h1"))



async def test_a_forgotten_agent_no_longer_counts_and_cannot_come_back(
        ctl: Controller, http: aiohttp.ClientSession, admin: aiohttp.ClientSession) -> None:
    big_ws = await dial(ctl, http, "big", BIG)
    small_ws = await dial(ctl, http, "small", SMALL)
    big_token = await token_for(ctl, "big")  # a second token of the big host's
    await gone(ctl, big_ws, "big")

    assert await forget(admin, "big") == (204, "")

    assert await agent_names(admin) == ["small"]
    # A job only the big host could run is refused now, saying why.
    async with admin.post("/api/v1/pluginjobs/", data=multipart(
            plugin_fields("too-big", cpu_limit="8000"))) as resp:
        assert resp.status == 400
        assert "cpu_limit=8000 but no agent has more than 2000 millicores" in await resp.text()
    # Every token of the forgotten host is revoked.
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        ws = await http.ws_connect(ctl.url, headers={"Authorization": f"Bearer {big_token}"})
        await ws.send_json(hello("big", BIG))
    assert refused.value.status == 401
    assert "big" not in ctl.fleet.sessions and await agent_names(admin) == ["small"]
    await gone(ctl, small_ws, "small")
