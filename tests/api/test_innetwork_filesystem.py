"""pfcon conformance over HTTP in in-network ``filesystem`` mode (pfcon-api.md §1.3,
§1.5, §1.6-§1.8, §1.11, §3.3, §4.2): no copy or upload jobs, plugins mount CUBE's
dirs directly, listings keep ChRIS link files."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent.protocol import Mount
from tests.api.conformance_support import (
    COLLECTIONS,
    DATA_KEYS,
    GENERIC_404,
    ZERO_TIME,
    get_status,
    open_harness,
    ordered,
    read_json,
    wait_status,
)
from tests.api.innetwork_support import (
    INCOMING,
    INNETWORK_INFO_KEYS,
    OUTGOING,
    fleet_names,
    job_spec_mounts,
    post_form,
    post_innetwork_plugin,
    runtime_mounts,
    skipped,
)
from tests.conftest import Harness

IN = "home/alice/feeds/feed_1/pl-dircopy_1/data"
OUT = "home/alice/feeds/feed_1/pl-dircopy_1/pl-app_2/data"


@pytest.fixture
async def fsys(tmp_path: Path) -> AsyncIterator[Harness]:
    async with open_harness(tmp_path, innetwork=True, storage_env="filesystem") as h:
        yield h


async def test_server_info(fsys: Harness) -> None:
    expected = {"server_version": "0.0.0+unknown", "pfcon_innetwork": True,
                "storage_env": "filesystem", "requires_copy_job": False,
                "requires_upload_job": False, "container_env": "docker",
                "compute_volume_type": "host"}
    async with aiohttp.ClientSession(headers=fsys.headers()) as s:
        for collection in COLLECTIONS:
            r = await s.get(f"{fsys.base}{collection}/")
            body = await read_json(r)
            assert (r.status, ordered(body)) == (200, ordered(expected))
            assert list(body) == INNETWORK_INFO_KEYS
        r = await s.get(fsys.base + "jobs/")
        assert (r.status, ordered(await read_json(r))) == (200, ordered(
            {k: v for k, v in expected.items() if not k.startswith("requires_")}))


async def test_plugin_mounts_input_and_output_dirs(fsys: Harness) -> None:
    sb = fsys.config.storebase_mount
    (sb / IN / "sub" / "deeper").mkdir(parents=True)
    for name in ("a.txt", "sub/b.txt", "sub/deeper/c.txt"):
        (sb / IN / name).write_text(name)
    (sb / OUT).mkdir(parents=True)
    (sb / "home/other").mkdir(parents=True)
    (sb / "home/other/ignored.txt").write_text("only input_dirs[0] is used")
    async with aiohttp.ClientSession(headers=fsys.headers()) as s:
        before = dt.datetime.now()
        status, body = await post_innetwork_plugin(
            s, fsys, "fsp-1", input_dirs=[f"/{IN}/", "home/other"], output_dir=f"/{OUT}/",
            type="fs")
        assert status == 201, body
        assert list(body) == ["data", "compute"]
        data = body["data"]
        assert list(data) == DATA_KEYS
        assert {k: data[k] for k in ("jid", "nfiles", "path")} == {
            "jid": "fsp-1", "nfiles": 3, "path": str(sb / IN)}
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}", data["timestamp"])
        assert before - dt.timedelta(seconds=1) <= dt.datetime.fromisoformat(
            data["timestamp"]) <= dt.datetime.now()
        assert body["compute"] == {
            "jid": "fsp-1", "image": "fnndsc/pl-app:1.0",
            "cmd": "python3 /usr/local/bin/app --prefix le /share/outgoing",
            "status": "notStarted", "message": "queued", "timestamp": ZERO_TIME, "logs": ""}
        expected = [Mount(IN, INCOMING, True), Mount(OUT, OUTGOING, False)]
        assert await job_spec_mounts(fsys, "fsp-1") == expected
        assert (await wait_status(s, fsys, "fsp-1"))["status"] == "finishedSuccessfully"
        assert runtime_mounts(fsys, "fsp-1") == expected
        # No copy job exists, and none was needed.
        assert [n for n, _, _ in await fleet_names(s, fsys)] == ["fsp-1"]
    # filesystem mode creates no key dir.
    assert sorted(p.name for p in sb.iterdir()) == ["home"]


async def test_nfiles_of_missing_input_dir_is_zero(fsys: Harness) -> None:
    async with aiohttp.ClientSession(headers=fsys.headers()) as s:
        status, body = await post_innetwork_plugin(s, fsys, "fsp-2", input_dirs=["home/none"],
                                                   output_dir=OUT)
        assert status == 201
        assert (body["data"]["nfiles"], body["data"]["path"]) == (
            0, str(fsys.config.storebase_mount / "home/none"))


async def test_an_output_dir_through_a_symlink_is_never_mounted(fsys: Harness,
                                                                 tmp_path: Path) -> None:
    sb = fsys.config.storebase_mount
    (sb / IN).mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (sb / "home/alice/feeds/feed_1/pl-dircopy_1/pl-app_2").symlink_to(tmp_path / "outside")
    async with aiohttp.ClientSession(headers=fsys.headers()) as s:
        status, body = await post_innetwork_plugin(s, fsys, "fsp-link", input_dirs=[IN],
                                                   output_dir=OUT)
        assert status == 201, body
        compute = await wait_status(s, fsys, "fsp-link")
    assert compute["status"] == "finishedWithError"
    assert compute["message"] == (
        f"refusing to mount {OUT!r} at /share/outgoing: "
        "'home/alice/feeds/feed_1/pl-dircopy_1/pl-app_2' is a symbolic link")
    assert fsys.runtime is not None and "fsp-link" not in fsys.runtime._workloads
    assert list((tmp_path / "outside").iterdir()) == []


@pytest.mark.parametrize(("overrides", "message"), [
    ({"drop": ["input_dirs", "output_dir"]}, "input_dirs: field is required"),
    ({"drop": ["input_dirs"], "output_dir": OUT}, "input_dirs: field is required"),
    ({"input_dirs": [IN], "drop": ["output_dir"]}, "output_dir: field is required"),
    ({"input_dirs": [IN], "output_dir": ""}, "output_dir: field is required"),
    ({"input_dirs": ["home/../.."], "output_dir": OUT},
     "input_dirs: path 'home/../..' must not contain '..'"),
    ({"input_dirs": [IN, "x/../../y"], "output_dir": OUT},
     "input_dirs: path 'x/../../y' must not contain '..'"),
    ({"input_dirs": [IN], "output_dir": "a/../../b"},
     "output_dir: path 'a/../../b' must not contain '..'"),
    ({"input_dirs": ["C:/Users"], "output_dir": OUT},
     "input_dirs: path 'C:/Users' must be relative"),
    # Validation order (§1.5 step 2): input_dirs, output_dir, entrypoint, env.
    ({"drop": ["input_dirs"], "output_dir": OUT, "entrypoint": [""], "env": ["X"]},
     "input_dirs: field is required"),
    ({"input_dirs": [IN], "output_dir": OUT, "env": ["NOEQUALS"]},
     'env: must be a list of "key=value" strings'),
])
async def test_plugin_validation(fsys: Harness, overrides: dict[str, Any], message: str) -> None:
    async with aiohttp.ClientSession(headers=fsys.headers()) as s:
        assert await post_innetwork_plugin(s, fsys, "fsv-1", **overrides) == (
            400, {"message": message})
        assert (await get_status(s, fsys, "fsv-1"))[0] == 404
    assert list(fsys.config.storebase_mount.iterdir()) == []


async def test_copy_and_upload_are_skipped(fsys: Harness) -> None:
    async with aiohttp.ClientSession(headers=fsys.headers()) as s:
        assert await post_form(s, fsys, "copyjobs/", [("jid", "fsc-1"), ("input_dirs", IN),
                                                     ("output_dir", OUT)]) == (
            201, skipped("fsc-1", "copySkipped"))
        assert await post_form(s, fsys, "uploadjobs/", {"jid": "fsc-1",
                                                       "job_output_path": OUT}) == (
            201, skipped("fsc-1", "uploadSkipped"))
        assert await fleet_names(s, fsys) == []
        # And plugins need no copy job.
        assert (await post_innetwork_plugin(s, fsys, "fsc-2", input_dirs=[IN],
                                            output_dir=OUT))[0] == 201
        # No key dir: the delete job is skipped.
        assert await post_form(s, fsys, "deletejobs/", {"jid": "fsc-2"}) == (
            201, skipped("fsc-2", "deleteSkipped"))
    assert list(fsys.config.storebase_mount.iterdir()) == []


async def test_listing_keeps_chrislink_files(fsys: Harness) -> None:
    sb = fsys.config.storebase_mount
    out = sb / OUT
    (out / "sub").mkdir(parents=True)
    (out / "res.txt").write_text("r")
    (out / "top.chrislink").write_text("home/bob")
    (out / "sub" / "nested.chrislink").write_text("home/alice")
    os.symlink("/etc/passwd", out / "passwd")
    async with aiohttp.ClientSession(headers=fsys.headers()) as s:
        for query in ("", "?job_output_path="):
            r = await s.get(f"{fsys.base}pluginjobs/fsl-1/file/{query}")
            assert (r.status, await read_json(r)) == (
                400, {"message": "job_output_path: query parameter is required"})
        r = await s.get(f"{fsys.base}pluginjobs/fsl-1/file/?job_output_path=/{OUT}/")
        assert r.status == 200
        assert r.headers["Content-Type"] == "application/json"
        assert r.headers["Content-Disposition"] == "attachment; filename=fsl-1.json"
        raw = await r.read()
        body = json.loads(raw)
        assert raw == json.dumps(body).encode()
        assert body["job_output_path"] == OUT
        assert sorted(body["rel_file_paths"]) == ["res.txt", "sub/nested.chrislink",
                                                  "top.chrislink"]
        r = await s.get(f"{fsys.base}pluginjobs/fsl-1/file/?job_output_path=home/missing")
        assert (r.status, await read_json(r)) == (404, {"message": GENERIC_404})
    assert (out / "top.chrislink").is_file()
    assert (out / "sub" / "nested.chrislink").is_file()
