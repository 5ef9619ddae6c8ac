"""pfcon v6 resources: auth-token, health, plugin/copy/upload/delete jobs and file/.

Status codes, JSON keys and messages are pfcon's (``pfcon-api.md`` §1); where pfleet
deliberately differs the difference is named in a comment.  Every status answer
comes from the store; no handler here talks to a runtime.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from pathlib import Path
from typing import Any

from aiohttp import web

from controller import compute
from controller.api.forms import (
    COPY_FIELDS,
    DELETE_FIELDS,
    PLUGIN_FIELDS,
    UPLOAD_FIELDS,
    normalize_jid,
    parse_fields,
    read_form,
    valid_jid,
)
from controller.api.middleware import CONFIG, GENERIC_NOT_FOUND, json_response, public
from controller.auth import issue_client_token
from controller.config import Config
from controller.errors import ApiError, BadRequest, NotFound, UnsupportedMediaType
from controller.jobs import JOBS, JobService
from controller.storage import outputs, zipmode
from controller.storage.paths import StorageError, key_dir

log = logging.getLogger("pfleet.controller.api")

routes = web.RouteTableDef()

API = "/api/v1"
KINDS = {"pluginjobs": "plugin", "copyjobs": "copy", "uploadjobs": "upload",
         "deletejobs": "delete"}
BAD_REQUEST_GENERIC = ("The browser (or proxy) sent a request that this server could not "
                       "understand.")
MISSING_JSON = "Missing required parameter in the JSON body or the post body or the query string"
ENV_RULE = 'env: must be a list of "key=value" strings'


# --------------------------------------------------------------- health, auth


@routes.get(f"{API}/health/")
@public
async def health(request: web.Request) -> web.Response:
    return json_response(request, {"health": "OK"})


@routes.post(f"{API}/auth-token/")
@public
async def auth_token(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    if request.content_type != "application/json":
        raise UnsupportedMediaType("Did not attempt to load JSON data because the request "
                                   "Content-Type was not 'application/json'.")
    try:
        body = json.loads(await request.text() or "null")
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("Failed to decode JSON object: the request body is not valid JSON."
                         ) from None
    body = body if isinstance(body, dict) else {}
    # reqparse counts a present key as given, even when null or "": only absent
    # keys are "missing"; null/"" then fail the credential check.
    missing = {k: MISSING_JSON for k in ("pfcon_user", "pfcon_password") if k not in body}
    if missing:
        raise BadRequest(missing)
    if body["pfcon_user"] != config.pfcon_user or body["pfcon_password"] != config.pfcon_password:
        raise BadRequest("Unable to log in with provided credentials.")
    return json_response(request, {"token": issue_client_token(config)})


# ---------------------------------------------------------------- server info


def server_info(config: Config) -> dict[str, Any]:
    info: dict[str, Any] = {
        "server_version": config.server_version,
        "pfcon_innetwork": config.innetwork,
        "storage_env": config.storage_env,
        "requires_copy_job": config.requires_copy_job,
        "requires_upload_job": config.requires_upload_job,
        "container_env": "docker" if config.container_env == "podman" else config.container_env,
        "compute_volume_type": config.compute_volume_type,
    }
    return info


async def get_server_info(request: web.Request) -> web.Response:
    return json_response(request, server_info(request.app[CONFIG]))


for _collection in KINDS:
    routes.get(f"{API}/{_collection}/")(get_server_info)


# -------------------------------------------------------------- pluginjobs


@routes.post(f"{API}/pluginjobs/")
async def submit_plugin(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    jobs = request.app[JOBS]
    body = await read_form(request, jobs.spool_dir() if not config.innetwork else None,
                           config.max_upload_mb << 20)
    try:
        fields = parse_fields(body.fields, PLUGIN_FIELDS)
        # Validation after parsing, first failure wins (pfcon's order).
        if not config.innetwork and body.upload is None:
            raise BadRequest(BAD_REQUEST_GENERIC)
        if not fields["entrypoint"]:
            raise BadRequest("entrypoint: cannot be empty")
        if any("=" not in e for e in fields["env"]):
            raise BadRequest(ENV_RULE)
        jid = fields["jid"]
        async with jobs.locked(jid):
            existing, rerun = await jobs.existing("plugin", jid)
            if existing is not None and not rerun:
                return json_response(request, {"data": {}, "compute": compute.compute_object(
                    existing, jobs.fleet.logs_for(existing))}, 201)
            command = compute.plugin_command(fields["entrypoint"], fields["args"],
                                             fields["args_path_flags"], fields["type"])
            spec = {
                "image": fields["image"], "command": command, "env": fields["env"],
                "cpu_limit": fields["cpu_limit"], "memory_limit": fields["memory_limit"],
                "gpu_limit": fields["gpu_limit"],
                "number_of_workers": fields["number_of_workers"],
                "mounts": [m.__dict__ for m in zipmode.plugin_mounts(jid)],
            }
            await jobs.check_fits(JobService.fits_request(spec))
            assert body.upload is not None
            data = await _stage_zip(jobs, config, jid, body.upload)
            job = await jobs.create(kind="plugin", jid=jid, spec=spec, image=fields["image"],
                                    cmd=compute.command_string(command), rerun=existing)
            return json_response(request, {"data": data,
                                           "compute": compute.compute_object(job, "")}, 201)
    finally:
        body.discard()


async def _stage_zip(jobs: JobService, config: Config, jid: str, upload: Path) -> dict[str, Any]:
    try:
        return await jobs.run_blocking(
            lambda: zipmode.stage_zip_inputs(config.storebase_mount, jid, upload,
                                             max_files=config.max_files,
                                             max_bytes=config.max_upload_mb << 20))
    except StorageError as exc:
        raise ApiError(str(exc), exc.status) from None


def _jid_from_path(request: web.Request) -> str:
    jid = normalize_jid(request.match_info["jid"])
    if not valid_jid(jid):
        # No job can carry such a name, so it is simply not found.
        raise NotFound(f"No such job: {request.match_info['jid']}")
    return jid


async def get_job(request: web.Request) -> web.Response:
    kind = KINDS[request.match_info["collection"]]
    jid = _jid_from_path(request)
    jobs = request.app[JOBS]
    compute_obj = await jobs.status(kind, jid)
    if kind == "delete" and compute_obj["status"] == "finishedSuccessfully":
        # pfcon removes the (now empty) key dir on the first successful status GET.
        key = key_dir(request.app[CONFIG].storebase_mount, jid)
        with contextlib.suppress(OSError):
            await jobs.run_blocking(key.rmdir)
    return json_response(request, {"compute": compute_obj})


async def delete_job(request: web.Request) -> web.Response:
    kind = KINDS[request.match_info["collection"]]
    jid = normalize_jid(request.match_info["jid"])
    if valid_jid(jid):
        await request.app[JOBS].remove(kind, jid)
    # pfcon answers 204 with an application/json content type and no body.
    return web.Response(status=204, content_type="application/json")


_JOB_PATH = f"{API}/{{collection:(?:plugin|copy|upload|delete)jobs}}/{{jid}}/"
routes.get(_JOB_PATH)(get_job)
routes.delete(_JOB_PATH)(delete_job)


@routes.get(f"{API}/pluginjobs/{{jid}}/file/")
async def get_plugin_file(request: web.Request) -> web.StreamResponse:
    config = request.app[CONFIG]
    jid = normalize_jid(request.match_info["jid"])
    if not valid_jid(jid):
        raise NotFound(GENERIC_NOT_FOUND)  # no key dir can exist: pfcon's plain 404
    key = key_dir(config.storebase_mount, jid)
    if not await request.app[JOBS].run_blocking(_ensure_outgoing, key):
        raise NotFound(GENERIC_NOT_FOUND)
    return await _stream_zip(request, key / "outgoing", f"{jid}.zip")


def _ensure_outgoing(key: Path) -> bool:
    """pfcon zips ``outgoing`` (made empty if absent) when the key dir exists."""
    if not key.is_dir():
        return False
    (key / "outgoing").mkdir(exist_ok=True)
    return True


async def _stream_zip(request: web.Request, root: Path, filename: str) -> web.StreamResponse:
    """Stream a zip of ``root`` produced in a worker thread, with bounded buffering."""
    response = web.StreamResponse(status=200, headers={
        "Content-Type": "application/zip",
        "Content-Disposition": f"attachment; filename={filename}"})
    await response.prepare(request)
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue(maxsize=4)
    cancelled = False

    def produce() -> None:
        try:
            for chunk in outputs.zip_chunks(root):
                if cancelled:
                    return
                asyncio.run_coroutine_threadsafe(queue.put(chunk), loop).result()
            asyncio.run_coroutine_threadsafe(queue.put(None), loop).result()
        except BaseException as exc:  # handed to the event loop, which logs and aborts
            if not cancelled:
                asyncio.run_coroutine_threadsafe(queue.put(exc), loop).result()

    producer = loop.run_in_executor(None, produce)
    try:
        while True:
            item = await queue.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                log.error("zip stream failed path=%s error=%s", root, item)
                raise ConnectionResetError("zip stream failed")
            await response.write(item)
        await response.write_eof()
    finally:
        cancelled = True
        while not queue.empty():
            queue.get_nowait()
        with contextlib.suppress(Exception):
            await producer
    return response


# --------------------------------------------------------- copy and upload


@routes.post(f"{API}/copyjobs/")
async def submit_copy(request: web.Request) -> web.Response:
    body = await read_form(request, None, 0)
    fields = parse_fields(body.fields, COPY_FIELDS)
    config = request.app[CONFIG]
    if not config.requires_copy_job:
        return json_response(request, {"compute": compute.skipped_object(
            fields["jid"], "copySkipped")}, 201)
    raise ApiError("copy jobs for in-network storage are not available yet", 501)


@routes.post(f"{API}/uploadjobs/")
async def submit_upload(request: web.Request) -> web.Response:
    body = await read_form(request, None, 0)
    fields = parse_fields(body.fields, UPLOAD_FIELDS)
    config = request.app[CONFIG]
    if not config.requires_upload_job:
        return json_response(request, {"compute": compute.skipped_object(
            fields["jid"], "uploadSkipped")}, 201)
    raise ApiError("upload jobs for in-network storage are not available yet", 501)


# -------------------------------------------------------------- deletejobs


@routes.post(f"{API}/deletejobs/")
async def submit_delete(request: web.Request) -> web.Response:
    body = await read_form(request, None, 0)
    fields = parse_fields(body.fields, DELETE_FIELDS)
    config = request.app[CONFIG]
    jobs = request.app[JOBS]
    jid = fields["jid"]
    key = key_dir(config.storebase_mount, jid)
    if not await jobs.run_blocking(key.is_dir):
        return json_response(request, {"compute": compute.skipped_object(
            jid, "deleteSkipped")}, 201)
    await jobs.guard_active_siblings(jid)
    async with jobs.locked(compute.runtime_name("delete", jid)):
        existing, rerun = await jobs.existing("delete", jid)
        if existing is not None and not rerun:
            return json_response(request, {"compute": compute.compute_object(
                existing, jobs.fleet.logs_for(existing))}, 201)
        op = {"op": "delete", "key_dir": key.name}
        spec = {"image": "", "command": ["delete", key.name], "env": [],
                "cpu_limit": fields["cpu_limit"], "memory_limit": fields["memory_limit"],
                "gpu_limit": 0, "number_of_workers": 1, "mounts": [], "op": op}
        await jobs.check_fits(JobService.fits_request(spec))
        job = await jobs.create(kind="delete", jid=jid, spec=spec, image="",
                                cmd=compute.command_string(spec["command"]), rerun=existing)
        return json_response(request, {"compute": compute.compute_object(job, "")}, 201)
