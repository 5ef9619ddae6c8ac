"""pfcon conformance over HTTP in in-network ``swift`` mode, API level only
(pfcon-api.md §1.3, §1.5-§1.8, §1.11, §3.5): no Swift is reachable here, so copy
jobs fail, and the guards are driven through job states.  The end-to-end flow
against a real Swift lives with the Swift fixture (``tests/support/swift.py``).

Translates pfcon's mocked TestUploadJobList (swift part) and
TestUploadJobPluginGuard.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent.protocol import Mount
from controller.states import State
from controller.store import STORE
from tests.api.conformance_support import (
    COLLECTIONS,
    GENERIC_404,
    ZERO_TIME,
    fleet_job,
    get_status,
    open_harness,
    ordered,
    read_json,
    wait_status,
)
from tests.api.innetwork_support import (
    COPY_NOT_DONE,
    INCOMING,
    NO_COPY,
    NO_PLUGIN,
    OUTGOING,
    PLUGIN_NOT_DONE,
    SIBLING_ACTIVE,
    fleet_names,
    force_state,
    job_spec_mounts,
    post_copy,
    post_form,
    post_innetwork_plugin,
    read_params,
)
from tests.conftest import Harness

AUTH_URL = "http://127.0.0.1:9/auth/v1.0"  # nothing listens on the discard port
# dev=False: in dev mode the controller would first try to create the container.
SWIFT = {"innetwork": True, "storage_env": "swift", "dev": False, "swift_auth_url": AUTH_URL,
         "swift_username": "chris:chris1234", "swift_key": "testing",
         "swift_container": "users"}
UPLOADS = "home/alice/uploads"
OUT = "home/alice/feeds/feed_1/pl-app_2/data"


@pytest.fixture
async def sw(tmp_path: Path) -> AsyncIterator[Harness]:
    async with open_harness(tmp_path, **SWIFT) as h:
        yield h


@pytest.fixture
async def sw_idle(tmp_path: Path) -> AsyncIterator[Harness]:
    async with open_harness(tmp_path, agent=False, **SWIFT) as h:
        yield h


def created(jid: str, cmd: str) -> dict[str, Any]:
    return {"compute": {"jid": jid, "image": "", "cmd": cmd, "status": "notStarted",
                        "message": "queued", "timestamp": ZERO_TIME, "logs": ""}}


async def plugin_ready(s: aiohttp.ClientSession, h: Harness, jid: str) -> None:
    """A successful copy (forced: no Swift here) and a queued plugin job."""
    assert (await post_copy(s, h, jid, [UPLOADS], OUT))[0] == 201
    await force_state(h, f"{jid}-copy", State.COMPLETE, "exited")
    status, body = await post_innetwork_plugin(s, h, jid, output_dir=OUT)
    assert status == 201, body


async def test_server_info(sw: Harness) -> None:
    expected = {"server_version": "0.0.0+unknown", "pfcon_innetwork": True,
                "storage_env": "swift", "requires_copy_job": True,
                "requires_upload_job": True, "container_env": "docker",
                "compute_volume_type": "host", "swift_auth_url": AUTH_URL}
    async with aiohttp.ClientSession(headers=sw.headers()) as s:
        for collection in COLLECTIONS:
            r = await s.get(f"{sw.base}{collection}/")
            assert (r.status, ordered(await read_json(r))) == (200, ordered(expected))
        r = await s.get(sw.base + "jobs/")
        legacy = await read_json(r)
    assert r.status == 200
    assert ordered(legacy) == ordered({k: v for k, v in expected.items()
                                       if not k.startswith("requires_")})


async def test_copy_writes_params_and_fails_without_swift(sw: Harness) -> None:
    async with aiohttp.ClientSession(headers=sw.headers()) as s:
        status, body = await post_copy(s, sw, "/swc-1", [f"/{UPLOADS}/", "home/bob"],
                                       f"/{OUT}/")
        assert (status, ordered(body)) == (
            201, ordered(created("swc-1", f"copy {UPLOADS} home/bob")))
        assert ordered(read_params(sw, "swc-1", "job_params.json")) == ordered(
            {"jid": "swc-1", "storage_env": "swift", "input_dirs": [UPLOADS, "home/bob"],
             "output_dir": OUT})
        job = await fleet_job(s, sw, "swc-1-copy")
        assert (job["jid"], job["kind"]) == ("swc-1", "copy")
        # The operation carries the Swift settings (pfcon passes them as env).
        row = await sw.app[STORE].get_live("swc-1-copy")
        assert row is not None
        assert row.spec["op"]["swift"] == {"auth_url": AUTH_URL, "username": "chris:chris1234",
                                           "key": "testing", "container": "users"}
        assert row.spec["mounts"] == []
        # swiftclient retries 5 times (about 9 s) before the copy fails.
        failed = await wait_status(s, sw, "swc-1", collection="copyjobs", within=40)
        assert (failed["jid"], failed["status"]) == ("swc-1", "finishedWithError")
        assert failed["message"] == "exited 1: " + failed["logs"].strip()  # the reason
        assert failed["logs"] == (f"cannot reach Swift at {AUTH_URL} while checking container "
                                  "'users' (ConnectionError)\n")
        assert "testing" not in failed["logs"]
        assert await post_innetwork_plugin(s, sw, "swc-1", output_dir=OUT) == (
            409, {"message": COPY_NOT_DONE.format("finishedWithError")})


async def test_plugin_copy_guard_and_outgoing(sw_idle: Harness) -> None:
    h = sw_idle
    sb = h.config.storebase_mount
    async with aiohttp.ClientSession(headers=h.headers()) as s:
        assert await post_innetwork_plugin(s, h, "swp-1", output_dir=OUT) == (
            409, {"message": NO_COPY})
        assert (await post_copy(s, h, "swp-1", [UPLOADS], OUT))[0] == 201
        assert await post_innetwork_plugin(s, h, "swp-1", output_dir=OUT) == (
            409, {"message": COPY_NOT_DONE.format("notStarted")})
        await force_state(h, "swp-1-copy", State.RUNNING, "running")
        assert await post_innetwork_plugin(s, h, "swp-1", output_dir=OUT) == (
            409, {"message": COPY_NOT_DONE.format("started")})
        assert (await post_copy(s, h, "swp-2", [UPLOADS], OUT))[0] == 201
        await force_state(h, "swp-2-copy", State.LOST, "agent lost")
        assert await post_innetwork_plugin(s, h, "swp-2", output_dir=OUT) == (
            409, {"message": COPY_NOT_DONE.format("undefined")})
        assert not (sb / "key-swp-1" / "outgoing").exists()
        # output_dir is required in every in-network mode, even though swift ignores it.
        assert await post_innetwork_plugin(s, h, "swp-1", drop=["output_dir"]) == (
            400, {"message": "output_dir: field is required"})
        await force_state(h, "swp-1-copy", State.COMPLETE, "exited")
        status, body = await post_innetwork_plugin(s, h, "swp-1", output_dir=OUT)
        assert (status, body["data"], body["compute"]["status"]) == (201, {}, "notStarted")
        assert await job_spec_mounts(h, "swp-1") == [
            Mount("key-swp-1/incoming", INCOMING, True),
            Mount("key-swp-1/outgoing", OUTGOING, False)]
    outgoing = sb / "key-swp-1" / "outgoing"
    assert stat.S_IMODE(os.stat(outgoing).st_mode) == 0o777
    assert not (sb / OUT).exists()  # swift never writes CUBE's output dir locally


async def test_upload_plugin_guard(sw_idle: Harness) -> None:
    h = sw_idle

    async def upload(jid: str, path: str = OUT) -> tuple[int, Any]:
        return await post_form(s, h, "uploadjobs/", {"jid": jid, "job_output_path": path})

    async with aiohttp.ClientSession(headers=h.headers()) as s:
        assert await upload("swu-1") == (409, {"message": NO_PLUGIN})
        await plugin_ready(s, h, "swu-1")
        assert await upload("swu-1") == (409, {"message": PLUGIN_NOT_DONE.format("notStarted")})
        await force_state(h, "swu-1", State.RUNNING, "running")
        assert await upload("swu-1") == (409, {"message": PLUGIN_NOT_DONE.format("started")})
        await plugin_ready(s, h, "swu-2")
        await force_state(h, "swu-2", State.LOST, "agent lost")
        assert await upload("swu-2") == (409, {"message": PLUGIN_NOT_DONE.format("undefined")})
        assert [n for n, _, _ in await fleet_names(s, h) if n.endswith("-upload")] == []
        # A plugin that finished, successfully or not, may be uploaded.
        await force_state(h, "swu-1", State.COMPLETE, "exited")
        status, body = await upload("swu-1", f"/{OUT}/")
        assert (status, ordered(body)) == (201, ordered(created("swu-1", f"upload {OUT}/")))
        assert ordered(read_params(h, "swu-1", "upload_params.json")) == ordered(
            {"jid": "swu-1", "job_output_path": f"{OUT}/", "storage_env": "swift"})
        job = await fleet_job(s, h, "swu-1-upload")
        assert (job["jid"], job["kind"], job["attempt"]) == ("swu-1", "upload", 1)
        # Idempotent: the queued upload is returned; a failed one runs again.
        assert await upload("swu-1", "other/path") == (201, body)
        assert read_params(h, "swu-1", "upload_params.json")["job_output_path"] == f"{OUT}/"
        await force_state(h, "swu-1-upload", State.EXECUTOR_ERROR, "exited 1")
        status, again = await upload("swu-1", "other/path")
        assert (status, again["compute"]["status"], again["compute"]["cmd"]) == (
            201, "notStarted", "upload other/path")
        assert (await fleet_job(s, h, "swu-1-upload"))["attempt"] == 2
        assert read_params(h, "swu-1", "upload_params.json")["job_output_path"] == "other/path"
        await plugin_ready(s, h, "swu-3")
        await force_state(h, "swu-3", State.EXECUTOR_ERROR, "exited 3")
        assert (await upload("swu-3"))[0] == 201
        assert (await get_status(s, h, "swu-3", "uploadjobs"))[1]["compute"]["jid"] == "swu-3"


async def test_upload_without_key_dir_is_refused(sw_idle: Harness) -> None:
    """pfcon fails with a 500 here; pfleet names the problem."""
    h = sw_idle
    async with aiohttp.ClientSession(headers=h.headers()) as s:
        await plugin_ready(s, h, "swu-4")
        await force_state(h, "swu-4", State.COMPLETE, "exited")
        shutil.rmtree(h.config.storebase_mount / "key-swu-4")
        assert await post_form(s, h, "uploadjobs/", {"jid": "swu-4",
                                                    "job_output_path": OUT}) == (
            409, {"message": "no data for job swu-4: key-swu-4 does not exist (was it "
                             "deleted?)"})
        assert (await get_status(s, h, "swu-4", "uploadjobs"))[0] == 404


async def test_delete_guard_sees_an_active_upload(sw_idle: Harness) -> None:
    h = sw_idle
    async with aiohttp.ClientSession(headers=h.headers()) as s:
        await plugin_ready(s, h, "swd-1")
        await force_state(h, "swd-1", State.COMPLETE, "exited")
        assert (await post_form(s, h, "uploadjobs/", {"jid": "swd-1",
                                                     "job_output_path": OUT}))[0] == 201
        for state, status in ((None, "notStarted"), (State.RUNNING, "started")):
            if state is not None:
                await force_state(h, "swd-1-upload", state, "running")
            assert await post_form(s, h, "deletejobs/", {"jid": "swd-1"}) == (
                409, {"message": SIBLING_ACTIVE.format("upload", status)})
        await force_state(h, "swd-1-upload", State.COMPLETE, "exited")
        status, body = await post_form(s, h, "deletejobs/", {"jid": "swd-1"})
        assert (status, body["compute"]["cmd"]) == (201, "delete key-swd-1")


async def test_listing_is_the_local_outgoing(sw: Harness) -> None:
    sb = sw.config.storebase_mount
    out = sb / "key-swl-1" / "outgoing"
    (out / "sub").mkdir(parents=True)
    (out / "res.txt").write_text("r")
    (out / "sub" / "s.txt").write_text("s")
    (out / "a.chrislink").write_text("home/bob")
    os.symlink("/etc/passwd", out / "passwd")
    async with aiohttp.ClientSession(headers=sw.headers()) as s:
        r = await s.get(f"{sw.base}pluginjobs/swl-1/file/?job_output_path=/{OUT}/")
        assert r.status == 200
        assert r.headers["Content-Disposition"] == "attachment; filename=swl-1.json"
        raw = await r.read()
        body = json.loads(raw)
        assert raw == json.dumps(body).encode()
        # Only the leading '/' is stripped in swift mode.
        assert list(body) == ["job_output_path", "rel_file_paths"]
        assert body["job_output_path"] == f"{OUT}/"
        assert sorted(body["rel_file_paths"]) == ["res.txt", "sub/s.txt"]
        # Without the query: the zip of outgoing.
        r = await s.get(f"{sw.base}pluginjobs/swl-1/file/")
        assert (r.status, r.headers["Content-Type"], r.headers["Content-Disposition"]) == (
            200, "application/zip", "attachment; filename=swl-1.zip")
        zf = zipfile.ZipFile(io.BytesIO(await r.read()))
        assert sorted(zf.namelist()) == ["res.txt", "sub/s.txt"]
        # No key dir: 404 both ways (pfcon: 500 with the query).
        for query in ("", f"?job_output_path={OUT}"):
            r = await s.get(f"{sw.base}pluginjobs/nokey/file/{query}")
            assert (r.status, await read_json(r)) == (404, {"message": GENERIC_404})
        # A key dir without outgoing: it is created, the listing is empty.
        (sb / "key-swl-2").mkdir()
        r = await s.get(f"{sw.base}pluginjobs/swl-2/file/?job_output_path=x")
        assert (r.status, await r.read()) == (
            200, b'{"job_output_path": "x", "rel_file_paths": []}')
        # Listing never uploads anything.
        assert await fleet_names(s, sw) == []
    assert (out / "a.chrislink").is_file()  # skipped, but only fslink deletes them
    assert (sb / "key-swl-2" / "outgoing").is_dir()
