"""pfcon v6 resources: auth-token, health, plugin/copy/upload/delete jobs and file/.

Status codes, JSON keys and messages are pfcon's (``pfcon-api.md`` §1); where pfleet
deliberately differs the difference is named in a comment.  Every status answer
comes from the store; no handler here talks to a runtime.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any
from urllib.parse import unquote

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
from controller.api.streaming import stream_zip
from controller.auth import issue_client_token
from controller.config import Config
from controller.errors import ApiError, BadRequest, NotFound, UnsupportedMediaType
from controller.jobs import JOBS, JobService
from controller.storage import modes
from controller.storage.paths import key_dir

log = logging.getLogger("pfleet.controller.api")

routes = web.RouteTableDef()

API = "/api/v1"
KINDS = {"pluginjobs": "plugin", "copyjobs": "copy", "uploadjobs": "upload",
         "deletejobs": "delete"}
MISSING_JSON = "Missing required parameter in the JSON body or the post body or the query string"


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
        # Bytes, as Flask reads them: a BOM or UTF-16/32 is detected, a charset
        # parameter ignored (an unknown one is no 500).
        body = json.loads(await request.read() or b"null")
    except (ValueError, RecursionError):  # RecursionError: nesting too deep
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
    if config.innetwork and config.storage_env == "swift":
        info["swift_auth_url"] = config.swift_auth_url
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
    # In-network modes ignore a data_file part (python-pfconclient's CLI always sends one).
    body = await read_form(request, None if config.innetwork else jobs.new_upload,
                           config.max_upload_mb << 20)
    try:
        fields = parse_fields(body.fields, PLUGIN_FIELDS)
        data, compute_obj = await jobs.submit_plugin(fields, body.upload)
    finally:
        await body.discard()
    return json_response(request, {"data": data, "compute": compute_obj}, 201)


def jid_from_path(request: web.Request) -> str:
    jid = normalize_jid(request.match_info["jid"])
    if not valid_jid(jid):
        # No job can carry such a name, so it is simply not found.
        raise NotFound(f"No such job: {request.match_info['jid']}")
    return jid


async def get_job(request: web.Request) -> web.Response:
    kind = KINDS[request.match_info["collection"]]
    jid = jid_from_path(request)
    jobs = request.app[JOBS]
    compute_obj = await jobs.status(kind, jid)
    if kind == "delete" and compute_obj["status"] == "finishedSuccessfully":
        # pfcon removes the (now empty) key dir on the first successful status GET.
        key = key_dir(request.app[CONFIG].storebase_mount, jid)
        with contextlib.suppress(OSError, ApiError):
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


def raw_query_value(request: web.Request, name: str) -> str | None:
    """A query parameter read from the raw query string: everything after
    ``name=`` up to the end, percent-decoded, with '+' and '&' kept literally.

    python-pfconclient does not URL-encode ``job_output_path``, so a path holding
    '&' or '+' arrives raw; parsing it as a normal query would cut or alter it.
    """
    raw = request.rel_url.raw_query_string
    prefix = f"{name}="
    if raw.startswith(prefix):
        return unquote(raw[len(prefix):])
    marker = f"&{prefix}"
    if marker in raw:
        return unquote(raw.split(marker, 1)[1])
    return None


@routes.get(f"{API}/pluginjobs/{{jid}}/file/")
async def get_plugin_file(request: web.Request) -> web.StreamResponse:
    config = request.app[CONFIG]
    jobs = request.app[JOBS]
    jid = normalize_jid(request.match_info["jid"])
    if not valid_jid(jid):
        raise NotFound(GENERIC_NOT_FOUND)  # no key dir can exist: pfcon's plain 404
    job_output_path = raw_query_value(request, "job_output_path")
    return await output_response(request, config, jobs, jid, job_output_path)


async def output_response(request: web.Request, config: Config, jobs: JobService, jid: str,
                          job_output_path: str | None) -> web.StreamResponse:
    """pfcon-api.md §1.11: a zip of the outputs, or their JSON listing (in-network)."""
    wants_listing = config.innetwork and (config.storage_env != "swift" or job_output_path)
    if wants_listing:
        if not job_output_path:
            raise BadRequest("job_output_path: query parameter is required")
        listing = await jobs.run_blocking(modes.output_listing, config, jid, job_output_path)
        if listing is None:
            raise NotFound(GENERIC_NOT_FOUND)
        return web.Response(body=json.dumps(listing).encode(), headers={
            "Content-Type": "application/json",
            "Content-Disposition": f"attachment; filename={jid}.json"})
    key = key_dir(config.storebase_mount, jid)
    if not await jobs.run_blocking(_ensure_outgoing, key):
        raise NotFound(GENERIC_NOT_FOUND)
    return await stream_zip(request, key / "outgoing", f"{jid}.zip")


def _ensure_outgoing(key: Path) -> bool:
    """pfcon zips ``outgoing`` (made empty if absent) when the key dir exists."""
    if not key.is_dir():
        return False
    (key / "outgoing").mkdir(exist_ok=True)
    return True


# ------------------------------------------------------ copy, upload, delete


@routes.post(f"{API}/copyjobs/")
async def submit_copy(request: web.Request) -> web.Response:
    body = await read_form(request, None, 0)
    fields = parse_fields(body.fields, COPY_FIELDS)
    if not request.app[CONFIG].requires_copy_job:
        return json_response(request, {"compute": compute.skipped_object(
            fields["jid"], "copySkipped")}, 201)
    return json_response(request, {"compute": await request.app[JOBS].submit_copy(fields)},
                         201)


@routes.post(f"{API}/uploadjobs/")
async def submit_upload(request: web.Request) -> web.Response:
    body = await read_form(request, None, 0)
    fields = parse_fields(body.fields, UPLOAD_FIELDS)
    if not request.app[CONFIG].requires_upload_job:
        return json_response(request, {"compute": compute.skipped_object(
            fields["jid"], "uploadSkipped")}, 201)
    return json_response(request, {"compute": await request.app[JOBS].submit_upload(fields)},
                         201)


@routes.post(f"{API}/deletejobs/")
async def submit_delete(request: web.Request) -> web.Response:
    body = await read_form(request, None, 0)
    fields = parse_fields(body.fields, DELETE_FIELDS)
    return json_response(request, {"compute": await request.app[JOBS].submit_delete(fields)},
                         201)
