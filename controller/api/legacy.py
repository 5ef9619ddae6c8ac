"""The single-resource API of pfcon <= 5.3 (``/api/v1/jobs/``, pfcon-api.md §1.13),
for ChRIS backends that still use python-pfconclient 3.x.

It is served from the same operations as the v6 resources: a legacy POST in fslink
or swift mode runs the copy job and waits for it (pfcon fetched inputs inside the
request), then submits the plugin job; a legacy file GET in swift mode with
``job_output_path`` runs the upload job and waits for it before listing.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

from aiohttp import web

from agent.fstree import ignore, remove_tree
from controller.api.forms import PLUGIN_FIELDS, Field, normalize_jid, parse_fields, read_form
from controller.api.middleware import CONFIG, GENERIC_NOT_FOUND, json_response
from controller.api.pfcon import (
    jid_from_path,
    output_response,
    raw_query_value,
    server_info,
)
from controller.errors import BadRequest, NotFound
from controller.jobs import JOBS, JobService
from controller.states import State
from controller.storage import modes
from controller.storage.outputs import list_outputs
from controller.storage.paths import key_dir

routes = web.RouteTableDef()

API = "/api/v1/jobs"
SYNC_STEP_SECONDS = 3600.0  # how long a legacy request waits for its copy/upload step
# Before v6, `args` was required.
LEGACY_PLUGIN_FIELDS = tuple(Field(f.name, f.kind, True, f.default, f.choices)
                             if f.name == "args" else f for f in PLUGIN_FIELDS)
OP_DEFAULTS = {"cpu_limit": 1000, "memory_limit": 300}
FETCH_ERRORS = {"fslink": "input_dirs: Error copying files from shared filesystem",
                "swift": "input_dirs: Error fetching files from swift"}


@routes.get(f"{API}/")
async def legacy_server_info(request: web.Request) -> web.Response:
    info = server_info(request.app[CONFIG])
    del info["requires_copy_job"], info["requires_upload_job"]
    return json_response(request, info)


@routes.post(f"{API}/")
async def legacy_submit(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    jobs = request.app[JOBS]
    body = await read_form(request, None if config.innetwork else jobs.new_upload,
                           config.max_upload_mb << 20)
    try:
        fields = parse_fields(body.fields, LEGACY_PLUGIN_FIELDS)
        jid = fields["jid"]
        existing, rerun = await jobs.existing("plugin", jid)
        if existing is not None and not rerun:
            return json_response(request, {"data": {}, "compute": jobs.current(existing)}, 201)
        if config.innetwork and config.storage_env in FETCH_ERRORS:
            if not fields.get("input_dirs"):
                raise BadRequest("input_dirs: field is required")
            if not fields.get("output_dir"):
                raise BadRequest("output_dir: field is required")
            await _fetch_inputs(jobs, fields)
        data, compute_obj = await jobs.submit_plugin(fields, body.upload, legacy=True)
    finally:
        await body.discard()
    if config.innetwork and config.storage_env in FETCH_ERRORS and compute_obj:
        key = key_dir(config.storebase_mount, jid)
        nfiles = await jobs.run_blocking(_count_files, key / "incoming")
        data = modes.data_object(jid, nfiles, key / "incoming")
    return json_response(request, {"data": data, "compute": compute_obj}, 201)


async def _fetch_inputs(jobs: JobService, fields: dict[str, Any]) -> None:
    """pfcon <= 5.3 fetched inputs inside the request: run the copy job and wait."""
    storage = jobs.config.storage_env
    copy_fields = {"jid": fields["jid"], "input_dirs": fields["input_dirs"],
                   "output_dir": fields["output_dir"], **OP_DEFAULTS}
    await jobs.submit_copy(copy_fields)
    try:
        async with asyncio.timeout(SYNC_STEP_SECONDS):
            copy = await jobs.wait_final("copy", fields["jid"])
    except TimeoutError:
        raise BadRequest(FETCH_ERRORS[storage]) from None
    if copy.state is not State.COMPLETE:
        await jobs.remove("copy", fields["jid"])  # a later POST tries again
        # A failed operation's message is only "exited 1": its reason is its log.
        logs = copy.logs.strip().splitlines() if copy.state is State.EXECUTOR_ERROR else []
        raise BadRequest(f"{FETCH_ERRORS[storage]}: {logs[-1] if logs else copy.message}")


def _count_files(root: Path) -> int:
    """pfcon's ``nfiles``: regular files, ChRIS link files excluded."""
    return len(list_outputs(root, delete_chrislinks=False)) if root.is_dir() else 0


@routes.get(f"{API}/{{jid}}/")
async def legacy_status(request: web.Request) -> web.Response:
    jid = jid_from_path(request)
    return json_response(request, {"compute": await request.app[JOBS].status("plugin", jid)})


@routes.delete(f"{API}/{{jid}}/")
async def legacy_delete(request: web.Request) -> web.Response:
    """pfcon <= 5.3: remove ``key-<jid>`` at once, then the container; 404 when there
    was no plugin job."""
    jobs = request.app[JOBS]
    jid = normalize_jid(request.match_info["jid"])
    existing = await jobs.find("plugin", jid) if jid else None
    if existing is None:
        raise NotFound(f"No such job: {jid}")
    await jobs.run_blocking(_remove_key_dir, key_dir(request.app[CONFIG].storebase_mount, jid))
    for kind in ("plugin", "copy", "upload", "delete"):
        await jobs.remove(kind, jid)
    return web.Response(status=204, content_type="application/json")


def _remove_key_dir(key: Path) -> None:
    if key.is_symlink():
        key.unlink()
    elif key.is_dir():  # best effort, as pfcon's; no recursion (a plugin's tree may be deep)
        remove_tree(key, ignore)


@routes.get(f"{API}/{{jid}}/file/")
async def legacy_file(request: web.Request) -> web.StreamResponse:
    config = request.app[CONFIG]
    jobs = request.app[JOBS]
    jid = normalize_jid(request.match_info["jid"])
    if not jid or await jobs.find("plugin", jid) is None:
        raise NotFound(GENERIC_NOT_FOUND)
    job_output_path = raw_query_value(request, "job_output_path")
    if config.innetwork and config.storage_env == "swift" and job_output_path:
        # pfcon <= 5.3 uploaded the outputs inside this request.
        await jobs.submit_upload({"jid": jid, "job_output_path": job_output_path,
                                  **OP_DEFAULTS})
        try:
            async with asyncio.timeout(SYNC_STEP_SECONDS):
                upload = await jobs.wait_final("upload", jid)
        except TimeoutError:
            upload = None
        if upload is None or upload.state is not State.COMPLETE:
            with contextlib.suppress(Exception):
                await jobs.remove("upload", jid)
            raise BadRequest("job_output_path: Error uploading files to swift")
    return await output_response(request, config, jobs, jid, job_output_path)

