"""Helpers shared by the pfcon conformance tests (``test_conformance_*.py``).

Everything goes over real HTTP to a controller on a loopback port; the expected
strings below are pfcon's (``pfcon-api.md`` §1) or, where pfleet deliberately
differs, pfleet's documented answer.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
import zipfile
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer

from controller.app import create_app
from controller.storage.zipmode import STAGING_DIR
from tests.conftest import Harness, make_config, start_fake_agent, stop_task
from tests.support.zips import make_zip

MISSING_FORM = "Missing required parameter in the post body"
MISSING_JSON = ("Missing required parameter in the JSON body or the post body or the query "
                "string")
BAD_REQUEST_GENERIC = ("The browser (or proxy) sent a request that this server could not "
                       "understand.")
GENERIC_404 = ("The requested URL was not found on the server. If you entered the URL manually "
               "please check your spelling and try again.")
METHOD_NOT_ALLOWED = "The method is not allowed for the requested URL."
NO_JSON_415 = ("Did not attempt to load JSON data because the request Content-Type was not "
               "'application/json'.")
ENV_RULE = 'env: must be a list of "key=value" strings'
ZERO_TIME = "0001-01-01T00:00:00Z"

COMPUTE_KEYS = ["jid", "image", "cmd", "status", "message", "timestamp", "logs"]
DATA_KEYS = ["jid", "nfiles", "timestamp", "path"]
INFO_KEYS = ["server_version", "pfcon_innetwork", "storage_env", "requires_copy_job",
             "requires_upload_job", "container_env", "compute_volume_type"]
COLLECTIONS = ["pluginjobs", "copyjobs", "uploadjobs", "deletejobs"]
SUFFIX = {"pluginjobs": "", "copyjobs": "-copy", "uploadjobs": "-upload",
          "deletejobs": "-delete"}
TERMINAL = ("finishedSuccessfully", "finishedWithError", "undefined")

# The required plugin fields in pfcon's parser order (the order of a bundle).
PLUGIN_REQUIRED = ["jid", "auid", "number_of_workers", "cpu_limit", "memory_limit",
                   "gpu_limit", "image", "entrypoint", "type"]



def make_zip_infos(entries: Iterable[tuple[zipfile.ZipInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for info, data in entries:
            zf.writestr(info, data)
    return buf.getvalue()


DEFAULT_ZIP = make_zip({"a.txt": b"hello\n", "sub/b.txt": b"world\n"})


def plugin_fields(jid: str, *, env: Sequence[str] = (), drop: Iterable[str] = (),
                  **overrides: str | Sequence[str]) -> list[tuple[str, str]]:
    """A valid plugin job's form fields as (key, value) pairs, lists as repeated keys."""
    fields: dict[str, str | Sequence[str]] = {
        "jid": jid, "entrypoint": ["python3", "/usr/local/bin/app"], "args": ["--prefix", "le"],
        "auid": "cube", "number_of_workers": "1", "cpu_limit": "1000", "memory_limit": "200",
        "gpu_limit": "0", "image": "fnndsc/pl-app:1.0", "type": "ds", "env": list(env)}
    fields.update(overrides)
    for name in drop:
        fields.pop(name, None)
    out: list[tuple[str, str]] = []
    for key, value in fields.items():
        if isinstance(value, str):
            out.append((key, value))
        else:
            out.extend((key, v) for v in value)
    return out


def multipart(fields: Iterable[tuple[str, str]], data_file: bytes | None = DEFAULT_ZIP
              ) -> aiohttp.FormData:
    form = aiohttp.FormData()
    for key, value in fields:
        form.add_field(key, value)
    if data_file is not None:
        form.add_field("data_file", data_file, filename="data_file",
                       content_type="application/octet-stream")
    return form


def ordered(value: Any) -> Any:
    """``value`` with every dict turned into its item list, so that comparing two
    ordered() values also compares key order."""
    if isinstance(value, dict):
        return [(k, ordered(v)) for k, v in value.items()]
    if isinstance(value, list):
        return [ordered(v) for v in value]
    return value


async def read_json(r: aiohttp.ClientResponse) -> Any:
    return json.loads(await r.text())


async def post_plugin(s: aiohttp.ClientSession, h: Harness, jid: str, *,
                      env: Sequence[str] = (), data_file: bytes | None = DEFAULT_ZIP,
                      **overrides: str | Sequence[str]) -> tuple[int, Any]:
    r = await s.post(h.base + "pluginjobs/",
                     data=multipart(plugin_fields(jid, env=env, **overrides), data_file))
    return r.status, await read_json(r)


async def get_status(s: aiohttp.ClientSession, h: Harness, jid: str,
                     collection: str = "pluginjobs") -> tuple[int, Any]:
    r = await s.get(f"{h.base}{collection}/{jid}/")
    return r.status, await read_json(r)


async def wait_status(s: aiohttp.ClientSession, h: Harness, jid: str,
                      statuses: Sequence[str] = TERMINAL, collection: str = "pluginjobs",
                      within: float = 30.0) -> dict[str, Any]:
    """Poll the status until it is one of ``statuses``; return the compute object."""
    deadline = time.monotonic() + within
    body: Any = None
    for _ in range(int(within / 0.02) + 1):
        status, body = await get_status(s, h, jid, collection)
        assert status == 200, body
        if body["compute"]["status"] in statuses:
            return body["compute"]
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.02)
    raise AssertionError(f"{collection}/{jid} never reached {statuses}: {body}")


async def fleet_job(s: aiohttp.ClientSession, h: Harness, name: str) -> dict[str, Any]:
    r = await s.get(h.base + "fleet/jobs/")
    assert r.status == 200
    jobs = [j for j in (await read_json(r))["jobs"] if j["name"] == name]
    assert len(jobs) == 1, jobs
    return jobs[0]


def storebase_contents(h: Harness) -> list[str]:
    """The storeBase's entries, with the controller's upload staging dir looked
    into (it exists from the start in zipfile mode; only what is in it counts)."""
    root = h.config.storebase_mount
    found = sorted(p.name for p in root.iterdir() if p.name != STAGING_DIR)
    staging = root / STAGING_DIR
    if staging.is_dir():
        found += sorted(f"{STAGING_DIR}/{p.name}" for p in staging.iterdir())
    return found


def leftovers(h: Harness, jid: str) -> list[str]:
    """What a refused POST left behind: key dirs of ``jid``, staged and spooled uploads."""
    found = [n for n in storebase_contents(h) if n == f"key-{jid}" or n.startswith(STAGING_DIR)]
    spool = h.config.state_dir / "uploads"
    if spool.is_dir():
        found += [p.name for p in spool.iterdir()]
    return found


@asynccontextmanager
async def open_harness(tmp_path: Path, *, agent: bool = True,
                       agent_overrides: Mapping[str, Any] | None = None,
                       **config_overrides: Any) -> AsyncIterator[Harness]:
    """Like the ``harness`` fixture, with config overrides and an optional agent."""
    config = make_config(tmp_path, **config_overrides)
    server = TestServer(create_app(config), host="127.0.0.1")
    await server.start_server()
    h = Harness(config, server, None, None, None)
    try:
        if agent:
            h.agent, h.runtime, h.agent_task = await start_fake_agent(
                config, server, tmp_path, **dict(agent_overrides or {}))
        yield h
    finally:
        await stop_task(h.agent_task)
        await server.close()
