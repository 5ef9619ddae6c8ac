"""The pfcon <= 5.3 single-resource API, ``/api/v1/jobs/`` (pfcon-api.md §1.13), over
HTTP: zipfile mode (inputs as a zip) and fslink mode (the copy runs inside the POST)."""

from __future__ import annotations

import io
import json
import re
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent.protocol import Mount
from tests.api.conformance_support import (
    BAD_REQUEST_GENERIC,
    COMPUTE_KEYS,
    DATA_KEYS,
    DEFAULT_ZIP,
    GENERIC_404,
    INFO_KEYS,
    MISSING_FORM,
    ZERO_TIME,
    multipart,
    open_harness,
    ordered,
    plugin_fields,
    read_json,
    storebase_contents,
    wait_status,
)
from tests.api.innetwork_support import (
    INCOMING,
    OUTGOING,
    all_files,
    fleet_names,
    job_spec_mounts,
    post_form,
)
from tests.conftest import Harness

JOBS = "jobs/"
UPLOADS = "home/alice/uploads"
OUT = "home/alice/feeds/feed_1/pl-app_2/data"
STAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}")


async def legacy_post_zip(s: aiohttp.ClientSession, h: Harness, jid: str, *,
                          data_file: bytes = DEFAULT_ZIP, **kwargs: Any) -> tuple[int, Any]:
    r = await s.post(h.base + JOBS, data=multipart(plugin_fields(jid, **kwargs), data_file))
    return r.status, await read_json(r)


async def legacy_status(s: aiohttp.ClientSession, h: Harness, jid: str) -> tuple[int, Any]:
    r = await s.get(f"{h.base}{JOBS}{jid}/")
    return r.status, await read_json(r)


async def legacy_wait(s: aiohttp.ClientSession, h: Harness, jid: str) -> dict[str, Any]:
    """The legacy status and the v6 plugin status are the same job."""
    done = await wait_status(s, h, jid)
    assert await legacy_status(s, h, jid) == (200, {"compute": done})
    return done


# ---------------------------------------------------------------------- zipfile


async def test_server_info_has_no_requires_keys(harness: Harness) -> None:
    async with aiohttp.ClientSession(headers=harness.headers()) as s:
        r = await s.get(harness.base + JOBS)
        body = await read_json(r)
    assert (r.status, r.headers["Content-Type"]) == (200, "application/json")
    assert ordered(body) == ordered({
        "server_version": "0.0.0+unknown", "pfcon_innetwork": False, "storage_env": "zipfile",
        "container_env": "docker", "compute_volume_type": "host"})
    assert list(body) == [k for k in INFO_KEYS if not k.startswith("requires_")]


async def test_zipfile_lifecycle(harness: Harness) -> None:
    h = harness
    key = h.config.storebase_mount / "key-lz-1"
    async with aiohttp.ClientSession(headers=h.headers()) as s:
        status, body = await legacy_post_zip(s, h, "/lz-1", env=["PFLEET_FAKE_LOGS=ok\n"])
        assert status == 201
        assert list(body) == ["data", "compute"]
        assert list(body["data"]) == DATA_KEYS
        assert {k: body["data"][k] for k in ("jid", "nfiles", "path")} == {
            "jid": "lz-1", "nfiles": 2, "path": str(key / "incoming")}
        assert STAMP.fullmatch(body["data"]["timestamp"])
        assert list(body["compute"]) == COMPUTE_KEYS
        assert body["compute"] == {
            "jid": "lz-1", "image": "fnndsc/pl-app:1.0",
            "cmd": "python3 /usr/local/bin/app --prefix le /share/incoming /share/outgoing",
            "status": "notStarted", "message": "queued", "timestamp": ZERO_TIME, "logs": ""}
        done = await legacy_wait(s, h, "lz-1")
        assert (done["status"], done["logs"]) == ("finishedSuccessfully", "ok\n")
        # A re-POST returns the job as it is.
        assert await legacy_post_zip(s, h, "lz-1") == (201, {"data": {}, "compute": done})
        (key / "outgoing" / "res.txt").write_text("result")
        (key / "outgoing" / "x.chrislink").write_text("home/x")
        r = await s.get(f"{h.base}{JOBS}lz-1/file/")
        assert (r.status, r.headers["Content-Type"], r.headers["Content-Disposition"]) == (
            200, "application/zip", "attachment; filename=lz-1.zip")
        zf = zipfile.ZipFile(io.BytesIO(await r.read()))
        assert {n: zf.read(n) for n in zf.namelist()} == {"res.txt": b"result"}
        # DELETE removes the data at once, then the job.
        r = await s.delete(f"{h.base}{JOBS}lz-1/")
        assert (r.status, r.headers["Content-Type"], await r.read()) == (
            204, "application/json", b"")
        assert not key.exists()
        assert await legacy_status(s, h, "lz-1") == (404, {"message": "No such job: lz-1"})
        r = await s.get(f"{h.base}{JOBS}lz-1/file/")
        assert (r.status, await read_json(r)) == (404, {"message": GENERIC_404})
        # DELETE of a job that does not exist (any more) is a 404 in this API.
        for jid in ("lz-1", "nope"):
            r = await s.delete(f"{h.base}{JOBS}{jid}/")
            assert (r.status, await read_json(r)) == (404, {"message": f"No such job: {jid}"})


@pytest.mark.parametrize(("kwargs", "status", "message"), [
    ({"drop": ["args"]}, 400, {"args": MISSING_FORM}),
    ({"drop": ["args", "image"]}, 400, {"args": MISSING_FORM, "image": MISSING_FORM}),
    ({"args": []}, 400, {"args": MISSING_FORM}),  # an empty list is not sent at all
    ({"data_file": b"not a zip"}, 400, "data_file: Bad zip file"),
])
async def test_zipfile_submit_errors(harness: Harness, kwargs: dict[str, Any], status: int,
                                     message: Any) -> None:
    async with aiohttp.ClientSession(headers=harness.headers()) as s:
        assert await legacy_post_zip(s, harness, "lze-1", **kwargs) == (
            status, {"message": message})
        assert (await legacy_status(s, harness, "lze-1"))[0] == 404
    assert storebase_contents(harness) == []


async def test_zipfile_submit_without_data_file(harness: Harness) -> None:
    async with aiohttp.ClientSession(headers=harness.headers()) as s:
        r = await s.post(harness.base + JOBS, data=multipart(plugin_fields("lze-2"), None))
        assert (r.status, await read_json(r)) == (400, {"message": BAD_REQUEST_GENERIC})


async def test_unknown_job_status_and_file(harness: Harness) -> None:
    async with aiohttp.ClientSession(headers=harness.headers()) as s:
        assert await legacy_status(s, harness, "nope") == (404, {"message": "No such job: nope"})
        r = await s.get(f"{harness.base}{JOBS}nope/file/")
        assert (r.status, await read_json(r)) == (404, {"message": GENERIC_404})
        async with aiohttp.ClientSession() as anonymous:
            r = await anonymous.get(harness.base + JOBS)
            assert (r.status, await read_json(r)) == (
                401, {"message": "Missing authorization header."})


# ----------------------------------------------------------------------- fslink


@pytest.fixture
async def fl(tmp_path: Path) -> AsyncIterator[Harness]:
    async with open_harness(tmp_path, innetwork=True, storage_env="fslink") as h:
        yield h


def build_tree(sb: Path) -> None:
    up = sb / UPLOADS
    (up / "sub").mkdir(parents=True)
    (up / "a.txt").write_text("A")
    (up / "sub" / "b.txt").write_text("B")
    (up / "home_bob.chrislink").write_text("home/bob")
    (sb / "home" / "bob").mkdir(parents=True)
    (sb / "home" / "bob" / "notes.txt").write_text("N")
    (sb / OUT).mkdir(parents=True)


async def legacy_post_fslink(s: aiohttp.ClientSession, h: Harness, jid: str,
                             **overrides: Any) -> tuple[int, Any]:
    fields = {"input_dirs": [UPLOADS], "output_dir": OUT, **overrides}
    return await post_form(s, h, JOBS, plugin_fields(jid, **fields))


async def test_fslink_post_copies_then_submits(fl: Harness) -> None:
    sb = fl.config.storebase_mount
    build_tree(sb)
    key = sb / "key-lf-1"
    async with aiohttp.ClientSession(headers=fl.headers()) as s:
        status, body = await legacy_post_fslink(s, fl, "lf-1")
        assert status == 201, body
        assert list(body["data"]) == DATA_KEYS
        assert {k: body["data"][k] for k in ("jid", "nfiles", "path")} == {
            "jid": "lf-1", "nfiles": 3, "path": str(key / "incoming")}
        assert STAMP.fullmatch(body["data"]["timestamp"])
        assert (body["compute"]["jid"], body["compute"]["status"]) == ("lf-1", "notStarted")
        # The inputs were staged before the answer.
        assert all_files(key / "incoming") == {"a.txt": "A", "sub/b.txt": "B",
                                               "home_bob/notes.txt": "N"}
        assert await job_spec_mounts(fl, "lf-1") == [Mount("key-lf-1/incoming", INCOMING, True),
                                                    Mount(OUT, OUTGOING, False)]
        assert (await legacy_wait(s, fl, "lf-1"))["status"] == "finishedSuccessfully"
        # The plugin writes into the shared output dir; the listing needs its path.
        (sb / OUT / "res.txt").write_text("R")
        (sb / OUT / "evil.chrislink").write_text("home/bob")
        r = await s.get(f"{fl.base}{JOBS}lf-1/file/")
        assert (r.status, await read_json(r)) == (
            400, {"message": "job_output_path: query parameter is required"})
        r = await s.get(f"{fl.base}{JOBS}lf-1/file/?job_output_path=/{OUT}/")
        assert r.status == 200
        assert r.headers["Content-Disposition"] == "attachment; filename=lf-1.json"
        assert await r.read() == json.dumps(
            {"job_output_path": OUT, "rel_file_paths": ["res.txt"]}).encode()
        assert not (sb / OUT / "evil.chrislink").exists()
        # DELETE: the key dir goes at once, the shared data stays.
        r = await s.delete(f"{fl.base}{JOBS}lf-1/")
        assert r.status == 204
        assert not key.exists()
        assert (sb / OUT / "res.txt").is_file() and (sb / UPLOADS / "a.txt").is_file()
        assert (await legacy_status(s, fl, "lf-1"))[0] == 404
        assert [(n, st) for n, _, st in await fleet_names(s, fl)] == [
            ("lf-1", "COMPLETE"), ("lf-1-copy", "COMPLETE")]
        r = await s.get(f"{fl.base}copyjobs/lf-1/")
        assert r.status == 404


@pytest.mark.parametrize(("overrides", "message"), [
    ({"input_dirs": []}, "input_dirs: field is required"),
    ({"input_dirs": [], "output_dir": ""}, "input_dirs: field is required"),
    ({"output_dir": ""}, "output_dir: field is required"),
    ({"drop": ["args"]}, {"args": MISSING_FORM}),
])
async def test_fslink_post_validation(fl: Harness, overrides: dict[str, Any],
                                      message: Any) -> None:
    async with aiohttp.ClientSession(headers=fl.headers()) as s:
        assert await legacy_post_fslink(s, fl, "lfv-1", **overrides) == (
            400, {"message": message})
        assert await fleet_names(s, fl) == []


async def test_fslink_post_with_failing_copy(fl: Harness) -> None:
    sb = fl.config.storebase_mount
    build_tree(sb)
    evil = sb / UPLOADS / "evil.chrislink"
    evil.write_text(OUT)  # a link to the job's own output dir fails the copy
    async with aiohttp.ClientSession(headers=fl.headers()) as s:
        status, body = await legacy_post_fslink(s, fl, "lf-2")
        assert (status, body) == (400, {"message": (
            "input_dirs: Error copying files from shared filesystem: ChRIS link "
            f"'{UPLOADS}/evil.chrislink' points to '{OUT}', which is the job's output dir or "
            f"one of its ancestors ('{OUT}')")})
        # No plugin job; the failed copy job is gone so that a later POST tries again.
        assert (await legacy_status(s, fl, "lf-2"))[0] == 404
        assert (await s.get(f"{fl.base}copyjobs/lf-2/")).status == 404
        evil.unlink()
        status, body = await legacy_post_fslink(s, fl, "lf-2")
        assert (status, body["data"]["nfiles"]) == (201, 3)
        assert (await legacy_wait(s, fl, "lf-2"))["status"] == "finishedSuccessfully"
