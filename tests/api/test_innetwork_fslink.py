"""pfcon conformance over HTTP in in-network ``fslink`` mode (pfcon-api.md §1.3,
§1.5-§1.11, §3.4, §3.6, §4.2): server info, copy jobs on a real storeBase tree,
the plugin copy guard, mounts, output listings and delete jobs.

The HTTP translation of pfcon's mocked TestCopyJobList, TestPluginJobList,
TestPluginJobFile, TestUploadJobList (fslink part), TestDeleteJobList,
TestPluginJobCopyGuard and TestDeleteJobSiblingGuard.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
import requests
import yarl
from pfconclient.client import Client

from agent.protocol import Mount
from controller.states import State
from tests.api.conformance_support import (
    COLLECTIONS,
    COMPUTE_KEYS,
    GENERIC_404,
    MISSING_FORM,
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
    INNETWORK_INFO_KEYS,
    NO_COPY,
    OUTGOING,
    SIBLING_ACTIVE,
    all_files,
    fleet_names,
    force_state,
    job_spec_mounts,
    post_copy,
    post_form,
    post_innetwork_plugin,
    read_params,
    runtime_mounts,
    skipped,
)
from tests.conftest import Harness

FSLINK = {"innetwork": True, "storage_env": "fslink"}
UPLOADS = "home/alice/uploads"
FEED_DATA = "home/alice/feeds/feed_1/pl-dircopy_1/data"
OUT = "home/alice/feeds/feed_1/pl-dircopy_1/pl-app_2/data"
LISTING_REQUIRED = {"message": "job_output_path: query parameter is required"}


@pytest.fixture
async def fs(tmp_path: Path) -> AsyncIterator[Harness]:
    async with open_harness(tmp_path, **FSLINK) as h:
        yield h


@pytest.fixture
async def fs_idle(tmp_path: Path) -> AsyncIterator[Harness]:
    """fslink without any agent: every job stays notStarted."""
    async with open_harness(tmp_path, agent=False, **FSLINK) as h:
        yield h


def build_tree(sb: Path) -> None:
    """CUBE's storage: uploads with a ChRIS link to bob's home, whose own link leads
    to his pipelines (pfcon-api.md §3.6), a feed's data dir and an output dir."""
    up = sb / UPLOADS
    (up / "sub").mkdir(parents=True)
    (up / "a.txt").write_text("A")
    (up / "sub" / "b.txt").write_text("B")
    (up / "home_bob.chrislink").write_text("home/bob\n")
    bob = sb / "home" / "bob"
    bob.mkdir(parents=True)
    (bob / "notes.txt").write_text("N")
    (bob / "PIPELINES_bob.chrislink").write_text("PIPELINES/bob")
    (sb / "PIPELINES" / "bob").mkdir(parents=True)
    (sb / "PIPELINES" / "bob" / "pipeline.yml").write_text("P")
    (sb / FEED_DATA).mkdir(parents=True)
    (sb / FEED_DATA / "c.txt").write_text("C")
    (sb / OUT).mkdir(parents=True)


STAGED = {"a.txt": "A", "sub/b.txt": "B", "home_bob/notes.txt": "N",
          "home_bob/PIPELINES_bob/pipeline.yml": "P", "c.txt": "C"}


def copy_created(jid: str, cmd: str) -> dict[str, Any]:
    return {"compute": {"jid": jid, "image": "", "cmd": cmd, "status": "notStarted",
                        "message": "queued", "timestamp": ZERO_TIME, "logs": ""}}


async def copy_ok(s: aiohttp.ClientSession, h: Harness, jid: str,
                  input_dirs: tuple[str, ...] = (UPLOADS,), output_dir: str = OUT) -> None:
    status, body = await post_copy(s, h, jid, input_dirs, output_dir)
    assert status == 201, body
    done = await wait_status(s, h, jid, collection="copyjobs")
    assert (done["status"], done["message"]) == ("finishedSuccessfully", "exited"), done


# ----------------------------------------------------------------- server info


async def test_server_info(fs: Harness) -> None:
    expected = {"server_version": "0.0.0+unknown", "pfcon_innetwork": True,
                "storage_env": "fslink", "requires_copy_job": True,
                "requires_upload_job": False, "container_env": "docker",
                "compute_volume_type": "host"}
    async with aiohttp.ClientSession(headers=fs.headers()) as s:
        for collection in COLLECTIONS:
            r = await s.get(f"{fs.base}{collection}/")
            assert (r.status, r.headers["Content-Type"]) == (200, "application/json")
            body = await read_json(r)
            assert ordered(body) == ordered(expected)
            assert list(body) == INNETWORK_INFO_KEYS
        r = await s.get(fs.base + "jobs/")
        legacy = await read_json(r)
    assert r.status == 200
    assert ordered(legacy) == ordered({k: v for k, v in expected.items()
                                       if not k.startswith("requires_")})


# ------------------------------------------------------------------ copy jobs


async def test_copy_stages_inputs_relative_to_each_prefix(fs: Harness) -> None:
    sb = fs.config.storebase_mount
    build_tree(sb)
    before = all_files(sb)
    async with aiohttp.ClientSession(headers=fs.headers()) as s:
        status, body = await post_copy(s, fs, "/cp-1", [f"/{UPLOADS}/", FEED_DATA], f"/{OUT}/",
                                       cpu_limit="500", memory_limit="100")
        assert status == 201
        assert ordered(body) == ordered(copy_created("cp-1", f"copy {UPLOADS} {FEED_DATA}"))
        params = read_params(fs, "cp-1", "job_params.json")
        assert ordered(params) == ordered({"jid": "cp-1", "storage_env": "fslink",
                                           "input_dirs": [UPLOADS, FEED_DATA],
                                           "output_dir": OUT})
        done = await wait_status(s, fs, "cp-1", collection="copyjobs")
        assert list(done) == COMPUTE_KEYS
        assert {k: done[k] for k in ("jid", "image", "cmd", "status", "message")} == {
            "jid": "cp-1", "image": "", "cmd": f"copy {UPLOADS} {FEED_DATA}",
            "status": "finishedSuccessfully", "message": "exited"}
        job = await fleet_job(s, fs, "cp-1-copy")
        assert (job["jid"], job["kind"], job["attempt"]) == ("cp-1", "copy", 1)
        # The copy job is not the plugin job.
        assert await get_status(s, fs, "cp-1") == (404, {"message": "No such job: cp-1"})
    key = sb / "key-cp-1"
    assert all_files(key / "incoming") == STAGED
    assert (key / "outgoing").is_dir()
    assert not any(p.name.endswith(".chrislink") for p in (key / "incoming").rglob("*"))
    # The shared storage itself is only read.
    assert {k: v for k, v in all_files(sb).items() if not k.startswith("key-")} == before


async def test_copy_of_python_pfconclient_integration_tree(fs: Harness) -> None:
    """python-pfconclient's own fslink flow (pfcon-api.md §8.4, §3.6 observed case)."""
    sb = fs.config.storebase_mount
    (sb / "home/user/cube/test").mkdir(parents=True)
    (sb / "home/user/cube/test/test_file.txt").write_text("T")
    (sb / "home/user/cube/test.chrislink").write_text("home/user/cube/test")
    (sb / "home/user/cube_out/j").mkdir(parents=True)
    async with aiohttp.ClientSession(headers=fs.headers()) as s:
        await copy_ok(s, fs, "cube-1", ("home/user/cube",), "home/user/cube_out/j")
    assert all_files(sb / "key-cube-1" / "incoming") == {"test/test_file.txt": "T"}


async def test_copy_without_input_dirs_still_runs(fs: Harness) -> None:
    async with aiohttp.ClientSession(headers=fs.headers()) as s:
        status, body = await post_copy(s, fs, "cp-empty", [], OUT)
        assert status == 201
        assert ordered(body) == ordered(copy_created("cp-empty", "copy"))
        assert read_params(fs, "cp-empty", "job_params.json") == {
            "jid": "cp-empty", "storage_env": "fslink", "input_dirs": [], "output_dir": OUT}
        done = await wait_status(s, fs, "cp-empty", collection="copyjobs")
        assert done["status"] == "finishedSuccessfully"
    incoming = fs.config.storebase_mount / "key-cp-empty" / "incoming"
    assert incoming.is_dir()
    assert list(incoming.iterdir()) == []


async def test_copy_repost_returns_the_active_or_finished_job(fs_idle: Harness) -> None:
    h = fs_idle
    async with aiohttp.ClientSession(headers=h.headers()) as s:
        status, first = await post_copy(s, h, "cp-2", [UPLOADS], OUT)
        assert status == 201
        # A re-POST of a queued copy returns it as is; nothing is rewritten.
        assert await post_copy(s, h, "cp-2", ["other"], "elsewhere") == (201, first)
        assert read_params(h, "cp-2", "job_params.json")["input_dirs"] == [UPLOADS]
        await force_state(h, "cp-2-copy", State.RUNNING, "running")
        status, body = await post_copy(s, h, "cp-2", [UPLOADS], OUT)
        assert status == 201
        assert (body["compute"]["jid"], body["compute"]["status"],
                body["compute"]["message"]) == ("cp-2", "started", "running")
        await force_state(h, "cp-2-copy", State.COMPLETE, "exited")
        status, body = await post_copy(s, h, "cp-2", [UPLOADS], OUT)
        assert (status, body["compute"]["status"]) == (201, "finishedSuccessfully")
        assert await get_status(s, h, "cp-2", "copyjobs") == (200, body)
        assert (await fleet_job(s, h, "cp-2-copy"))["attempt"] == 1


async def test_failed_copy_is_run_again_on_repost(fs: Harness) -> None:
    """A ChRIS link to the job's own output dir fails the copy (§3.6); after the
    client fixes its tree, a re-POST starts a new attempt."""
    sb = fs.config.storebase_mount
    build_tree(sb)
    evil = sb / UPLOADS / "evil.chrislink"
    evil.write_text("home/alice/feeds")  # an ancestor of the output dir
    async with aiohttp.ClientSession(headers=fs.headers()) as s:
        assert (await post_copy(s, fs, "cp-3", [UPLOADS], OUT))[0] == 201
        failed = await wait_status(s, fs, "cp-3", collection="copyjobs")
        assert (failed["jid"], failed["status"]) == ("cp-3", "finishedWithError")
        assert failed["message"] == "exited 1: " + failed["logs"].strip()  # the reason
        assert failed["logs"] == (
            f"ChRIS link '{UPLOADS}/evil.chrislink' points to 'home/alice/feeds', which is "
            f"the job's output dir or one of its ancestors ('{OUT}')\n")
        # The plugin may not run on a failed copy.
        assert await post_innetwork_plugin(s, fs, "cp-3", output_dir=OUT) == (
            409, {"message": COPY_NOT_DONE.format("finishedWithError")})
        evil.unlink()
        status, body = await post_copy(s, fs, "cp-3", [UPLOADS], OUT)
        assert status == 201
        expected = copy_created("cp-3", f"copy {UPLOADS}")["compute"]
        # (the message of a new attempt: see test_new_attempt_is_queued_like_the_first)
        assert {**body["compute"], "message": "queued"} == expected
        assert (await fleet_job(s, fs, "cp-3-copy"))["attempt"] == 2
        done = await wait_status(s, fs, "cp-3", collection="copyjobs")
        assert (done["status"], done["logs"].startswith("copied 4 files")) == (
            "finishedSuccessfully", True), done
        assert all_files(sb / "key-cp-3" / "incoming") == {
            k: v for k, v in STAGED.items() if k != "c.txt"}
        status, body = await post_innetwork_plugin(s, fs, "cp-3", output_dir=OUT)
        assert status == 201, body


async def test_new_attempt_is_queued_like_the_first(fs_idle: Harness) -> None:
    h = fs_idle
    async with aiohttp.ClientSession(headers=h.headers()) as s:
        status, first = await post_copy(s, h, "att-1", [UPLOADS], OUT)
        assert (status, first) == (201, copy_created("att-1", f"copy {UPLOADS}"))
        await force_state(h, "att-1-copy", State.EXECUTOR_ERROR, "exited 1")
        status, second = await post_copy(s, h, "att-1", [UPLOADS], OUT)
        assert (await fleet_job(s, h, "att-1-copy"))["attempt"] == 2
        assert (status, second) == (201, first)


@pytest.mark.parametrize(("fields", "message"), [
    ([("jid", "v-1"), ("input_dirs", "a/../../etc"), ("output_dir", OUT)],
     "input_dirs: path 'a/../../etc' must not contain '..'"),
    ([("jid", "v-1"), ("input_dirs", UPLOADS), ("output_dir", "home/..")],
     "output_dir: path 'home/..' must not contain '..'"),
    ([("jid", "v-1"), ("input_dirs", "C:/x"), ("output_dir", OUT)],
     "input_dirs: path 'C:/x' must be relative"),
    ([("jid", "v-1"), ("input_dirs", "../x"), ("output_dir", "\\srv\\x")],
     "output_dir: path '\\\\srv\\\\x' must be relative"),
])
async def test_copy_refuses_paths_leaving_the_storebase(fs: Harness, fields: list[tuple[str, str]],
                                                        message: str) -> None:
    async with aiohttp.ClientSession(headers=fs.headers()) as s:
        assert await post_form(s, fs, "copyjobs/", fields) == (400, {"message": message})
        assert (await get_status(s, fs, "v-1", "copyjobs"))[0] == 404
    assert list(fs.config.storebase_mount.iterdir()) == []


async def test_copy_needs_output_dir(fs: Harness) -> None:
    async with aiohttp.ClientSession(headers=fs.headers()) as s:
        assert await post_copy(s, fs, "cp-4", [UPLOADS], None) == (
            400, {"message": {"output_dir": MISSING_FORM}})


# ------------------------------------------------------------ plugin copy guard


async def test_plugin_copy_guard(fs_idle: Harness) -> None:
    h = fs_idle
    async with aiohttp.ClientSession(headers=h.headers()) as s:
        assert await post_innetwork_plugin(s, h, "g-1", output_dir=OUT) == (
            409, {"message": NO_COPY})
        assert (await post_copy(s, h, "g-1", [UPLOADS], OUT))[0] == 201
        assert await post_innetwork_plugin(s, h, "g-1", output_dir=OUT) == (
            409, {"message": COPY_NOT_DONE.format("notStarted")})
        await force_state(h, "g-1-copy", State.RUNNING, "running")
        assert await post_innetwork_plugin(s, h, "g-1", output_dir=OUT) == (
            409, {"message": COPY_NOT_DONE.format("started")})
        for jid, state, status in (("g-2", State.EXECUTOR_ERROR, "finishedWithError"),
                                   ("g-3", State.LOST, "undefined"),
                                   ("g-4", State.SYSTEM_ERROR, "finishedWithError")):
            assert (await post_copy(s, h, jid, [UPLOADS], OUT))[0] == 201
            await force_state(h, f"{jid}-copy", state, "x")
            assert await post_innetwork_plugin(s, h, jid, output_dir=OUT) == (
                409, {"message": COPY_NOT_DONE.format(status)})
        # A refused plugin POST scheduled nothing.
        names = [n for n, _, _ in await fleet_names(s, h)]
        assert names == ["g-1-copy", "g-2-copy", "g-3-copy", "g-4-copy"]
        # Validation comes before the guard.
        assert await post_innetwork_plugin(s, h, "g-5", drop=["output_dir"]) == (
            400, {"message": "output_dir: field is required"})


async def test_plugin_after_copy(fs: Harness) -> None:
    sb = fs.config.storebase_mount
    build_tree(sb)
    async with aiohttp.ClientSession(headers=fs.headers()) as s:
        await copy_ok(s, fs, "pl-1")
        # input_dirs is not needed (nor used) by fslink plugins; '/' is stripped.
        status, body = await post_innetwork_plugin(
            s, fs, "/pl-1", output_dir=f"/{OUT}/", args=["--dir", UPLOADS],
            args_path_flags=["--dir"], env=["PFLEET_FAKE_LOGS=done\n"])
        assert status == 201
        assert ordered(body) == ordered({"data": {}, "compute": {
            "jid": "pl-1", "image": "fnndsc/pl-app:1.0",
            "cmd": "python3 /usr/local/bin/app --dir /share/incoming /share/incoming "
                   "/share/outgoing",
            "status": "notStarted", "message": "queued", "timestamp": ZERO_TIME, "logs": ""}})
        expected_mounts = [Mount("key-pl-1/incoming", INCOMING, True),
                           Mount(OUT, OUTGOING, False)]
        assert await job_spec_mounts(fs, "pl-1") == expected_mounts
        done = await wait_status(s, fs, "pl-1")
        assert (done["status"], done["logs"]) == ("finishedSuccessfully", "done\n")
        assert runtime_mounts(fs, "pl-1") == expected_mounts
        # A re-POST returns the finished job: no new attempt, data {}.
        status, again = await post_innetwork_plugin(s, fs, "pl-1", output_dir=OUT)
        assert (status, again) == (201, {"data": {}, "compute": done})
        assert (await fleet_job(s, fs, "pl-1"))["attempt"] == 1
    # fslink plugins write straight into output_dir: no outgoing is prepared for them
    # beyond the copy's, and nothing is created in the output dir by the controller.
    assert list((sb / OUT).iterdir()) == []


async def test_failed_plugin_is_run_again_after_copy_guard(fs: Harness) -> None:
    sb = fs.config.storebase_mount
    build_tree(sb)
    async with aiohttp.ClientSession(headers=fs.headers()) as s:
        await copy_ok(s, fs, "pl-2")
        env = ["PFLEET_FAKE_EXIT_CODE=3"]
        assert (await post_innetwork_plugin(s, fs, "pl-2", output_dir=OUT, env=env))[0] == 201
        assert (await wait_status(s, fs, "pl-2"))["status"] == "finishedWithError"
        # The copy guard is checked again: without a copy, no re-run.
        assert (await s.delete(fs.base + "copyjobs/pl-2/")).status == 204
        assert await post_innetwork_plugin(s, fs, "pl-2", output_dir=OUT) == (
            409, {"message": NO_COPY})
        await copy_ok(s, fs, "pl-2")
        status, body = await post_innetwork_plugin(s, fs, "pl-2", output_dir=OUT)
        assert (status, body["data"], body["compute"]["status"]) == (201, {}, "notStarted")
        assert (await fleet_job(s, fs, "pl-2"))["attempt"] == 2
        assert (await wait_status(s, fs, "pl-2"))["status"] == "finishedSuccessfully"


@pytest.mark.parametrize(("overrides", "message"), [
    ({"drop": ["output_dir"]}, "output_dir: field is required"),
    ({"output_dir": ""}, "output_dir: field is required"),
    ({"output_dir": "home/../../etc"}, "output_dir: path 'home/../../etc' must not contain '..'"),
    ({"output_dir": "C:\\x"}, "output_dir: path 'C:\\\\x' must be relative"),
    ({"output_dir": "\\x"}, "output_dir: path '\\\\x' must be relative"),
])
async def test_plugin_validation(fs: Harness, overrides: dict[str, Any], message: str) -> None:
    async with aiohttp.ClientSession(headers=fs.headers()) as s:
        assert await post_innetwork_plugin(s, fs, "val-1", **overrides) == (
            400, {"message": message})
        assert (await get_status(s, fs, "val-1"))[0] == 404
    assert list(fs.config.storebase_mount.iterdir()) == []


# --------------------------------------------------------------------- upload


async def test_upload_is_skipped_without_guard(fs: Harness) -> None:
    async with aiohttp.ClientSession(headers=fs.headers()) as s:
        status, body = await post_form(s, fs, "uploadjobs/",
                                       {"jid": "/up-1", "job_output_path": f"/{OUT}"})
        assert status == 201
        assert ordered(body) == ordered(skipped("up-1", "uploadSkipped"))
        assert (await get_status(s, fs, "up-1", "uploadjobs"))[0] == 404
        assert await fleet_names(s, fs) == []


# ------------------------------------------------------------------- listings


async def listing(s: aiohttp.ClientSession, h: Harness, jid: str,
                  query: str) -> tuple[int, aiohttp.ClientResponse, bytes]:
    r = await s.get(yarl.URL(f"{h.base}pluginjobs/{jid}/file/{query}", encoded=True))
    return r.status, r, await r.read()


async def test_listing_needs_job_output_path(fs: Harness) -> None:
    (fs.config.storebase_mount / OUT).mkdir(parents=True)
    async with aiohttp.ClientSession(headers=fs.headers()) as s:
        for query in ("", "?job_output_path=", "?job_output_path", "?other=home"):
            status, r, raw = await listing(s, fs, "ls-1", query)
            assert (status, r.headers["Content-Type"], json.loads(raw)) == (
                400, "application/json", LISTING_REQUIRED), query


async def test_listing_of_missing_dir_is_generic_404(fs: Harness) -> None:
    sb = fs.config.storebase_mount
    (sb / "home" / "file.txt").parent.mkdir(parents=True)
    (sb / "home" / "file.txt").write_text("x")
    os.symlink(sb / "home", sb / "home-link")
    async with aiohttp.ClientSession(headers=fs.headers()) as s:
        for path in ("home/nope", "home/file.txt", "home-link", "/nope/"):
            status, r, raw = await listing(s, fs, "ls-2", f"?job_output_path={path}")
            assert (status, r.headers["Content-Type"], json.loads(raw)) == (
                404, "application/json", {"message": GENERIC_404}), path
        status, _, raw = await listing(s, fs, "ls-2", "?job_output_path=home/../..")
        assert (status, json.loads(raw)) == (
            400, {"message": "job_output_path: path 'home/../..' must not contain '..'"})


async def test_listing_through_a_symlinked_ancestor_is_generic_404(fs: Harness,
                                                                  tmp_path: Path) -> None:
    # a symlink on the way (not only at the end) led outside the storeBase: its files
    # were listed and its *.chrislink files deleted
    outside = tmp_path / "outside" / "data"
    outside.mkdir(parents=True)
    (outside / "secret.txt").write_text("s")
    (outside / "victim.chrislink").write_text("home/bob")
    feed = fs.config.storebase_mount / "home/alice/feeds/feed_1"
    feed.mkdir(parents=True)
    os.symlink(outside.parent, feed / "pl-evil_3")
    async with aiohttp.ClientSession(headers=fs.headers()) as s:
        status, _, raw = await listing(s, fs, "ls-5",
                                       "?job_output_path=home/alice/feeds/feed_1/pl-evil_3/data")
    assert (status, json.loads(raw)) == (404, {"message": GENERIC_404})
    assert sorted(os.listdir(outside)) == ["secret.txt", "victim.chrislink"]


async def test_listing_shape_links_and_symlinks(fs: Harness) -> None:
    sb = fs.config.storebase_mount
    out = sb / OUT
    (out / "sub" / "deep").mkdir(parents=True)
    (out / "res.txt").write_text("r")
    (out / "sub" / "s.txt").write_text("s")
    (out / "sub" / "deep" / "d.txt").write_text("d")
    (out / "evil.chrislink").write_text("home/bob")
    (out / "sub" / "deep" / "nested.chrislink").write_text("home/alice")
    os.symlink(sb / "home", out / "sneaky.chrislink")  # a symlink named like a link
    os.symlink("/etc/passwd", out / "passwd")
    os.symlink(out / "sub", out / "sub-link")
    (out / "emptydir").mkdir()
    async with aiohttp.ClientSession(headers=fs.headers()) as s:
        before = await fleet_names(s, fs)
        status, r, raw = await listing(s, fs, "ls-3", f"?job_output_path=/{OUT}/")
        assert status == 200
        assert r.headers["Content-Type"] == "application/json"
        assert r.headers["Content-Disposition"] == "attachment; filename=ls-3.json"
        body = json.loads(raw)
        assert list(body) == ["job_output_path", "rel_file_paths"]
        assert body["job_output_path"] == OUT
        files = body["rel_file_paths"]
        assert sorted(files) == ["res.txt", "sub/deep/d.txt", "sub/s.txt"]
        # os.walk order: a directory's files before those of its subdirectories.
        assert files.index("res.txt") < files.index("sub/s.txt") < files.index("sub/deep/d.txt")
        # Compact JSON without a trailing newline.
        assert raw == json.dumps(body).encode()
        # The listing schedules nothing.
        assert await fleet_names(s, fs) == before == []
    # Plugin-written ChRIS links are deleted from disk (pfcon#175); symlinks are kept.
    assert not (out / "evil.chrislink").exists()
    assert not (out / "sub" / "deep" / "nested.chrislink").exists()
    assert not (out / "sneaky.chrislink").is_symlink()
    assert (sb / "home").is_dir()
    assert (out / "passwd").is_symlink() and (out / "sub-link").is_symlink()


async def test_listing_exact_body(fs: Harness) -> None:
    out = fs.config.storebase_mount / "home/u/out"
    out.mkdir(parents=True)
    (out / "only.txt").write_text("1")
    async with aiohttp.ClientSession(headers=fs.headers()) as s:
        status, _, raw = await listing(s, fs, "ls-4", "?job_output_path=home/u/out")
        assert (status, raw) == (
            200, b'{"job_output_path": "home/u/out", "rel_file_paths": ["only.txt"]}')
        out.joinpath("only.txt").unlink()
        status, _, raw = await listing(s, fs, "ls-4", "?job_output_path=home/u/out")
        assert (status, raw) == (200, b'{"job_output_path": "home/u/out", "rel_file_paths": []}')


ODD = "home/al ice/feeds/f & g+1/pl-é ü/data"


async def test_listing_of_unencoded_paths(fs: Harness) -> None:
    """python-pfconclient concatenates job_output_path into the URL unencoded
    (pfcon-api.md §8.2): requests then percent-encodes spaces and non-ASCII but
    leaves '&' and '+' raw. The server must read the path back exactly."""
    out = fs.config.storebase_mount / ODD
    out.mkdir(parents=True)
    (out / "r é+&.txt").write_text("x")
    url = fs.base + "pluginjobs/odd-1/file/?job_output_path=" + ODD
    prepared = requests.Request("GET", url).prepare()
    assert prepared.url is not None
    raw_query = prepared.url.split("?", 1)[1]
    assert raw_query == ("job_output_path=home/al%20ice/feeds/f%20&%20g+1/"
                         "pl-%C3%A9%20%C3%BC/data")
    expected = {"job_output_path": ODD, "rel_file_paths": ["r é+&.txt"]}

    def with_requests() -> tuple[int, Any]:
        r = requests.get(url, headers=fs.headers(), timeout=30)
        return r.status_code, r.json()

    def with_pfconclient() -> Any:
        return Client(fs.base, fs.token()).get_plugin_job_json_data("odd-1", ODD, timeout=30)

    assert await asyncio.to_thread(with_requests) == (200, expected)
    assert await asyncio.to_thread(with_pfconclient) == expected
    async with aiohttp.ClientSession(headers=fs.headers()) as s:
        # The same bytes on the wire without requests, then with a trailing '/' and
        # fully percent-encoded (a client that does encode).
        for query in (raw_query, raw_query + "/",
                      "job_output_path=" + quote(ODD, safe="")):
            status, _, raw = await listing(s, fs, "odd-1", "?" + query)
            assert (status, json.loads(raw)) == (200, expected), query


# ----------------------------------------------------------------- delete jobs


async def test_delete_job_removes_key_dir_but_not_shared_data(fs: Harness) -> None:
    sb = fs.config.storebase_mount
    build_tree(sb)
    async with aiohttp.ClientSession(headers=fs.headers()) as s:
        await copy_ok(s, fs, "dl-1")
        assert (await post_innetwork_plugin(s, fs, "dl-1", output_dir=OUT))[0] == 201
        await wait_status(s, fs, "dl-1")
        (sb / OUT / "result.txt").write_text("R")
        shared = {k: v for k, v in all_files(sb).items() if not k.startswith("key-")}
        status, body = await post_form(s, fs, "deletejobs/", {"jid": "dl-1"})
        assert status == 201
        # The POST waits briefly for the delete: it answers either the queued job or,
        # usually, the finished one.
        if body["compute"]["status"] == "notStarted":
            assert ordered(body) == ordered({"compute": {
                "jid": "dl-1", "image": "", "cmd": "delete key-dl-1", "status": "notStarted",
                "message": "queued", "timestamp": ZERO_TIME, "logs": ""}})
        else:
            assert list(body["compute"]) == ["jid", "image", "cmd", "status", "message",
                                             "timestamp", "logs"]
            assert (body["compute"]["status"], body["compute"]["message"]) == (
                "finishedSuccessfully", "exited")
        done = await wait_status(s, fs, "dl-1", collection="deletejobs")
        assert (done["jid"], done["status"], done["message"]) == (
            "dl-1", "finishedSuccessfully", "exited")
        assert not (sb / "key-dl-1").exists()
        assert {k: v for k, v in all_files(sb).items() if not k.startswith("key-")} == shared
        assert await post_form(s, fs, "deletejobs/", {"jid": "dl-1"}) == (
            201, skipped("dl-1", "deleteSkipped"))
        # The client's cleanup: DELETE of copy, plugin and delete jobs.
        for collection in ("copyjobs", "pluginjobs", "deletejobs"):
            r = await s.delete(f"{fs.base}{collection}/dl-1/")
            assert (r.status, await r.read()) == (204, b"")
        assert [(n, st) for n, _, st in await fleet_names(s, fs)] == [
            ("dl-1", "COMPLETE"), ("dl-1-copy", "COMPLETE"), ("dl-1-delete", "COMPLETE")]


async def test_delete_job_sibling_guard(fs_idle: Harness) -> None:
    h = fs_idle
    key = h.config.storebase_mount / "key-sg-1"

    async def delete() -> tuple[int, Any]:
        return await post_form(s, h, "deletejobs/", {"jid": "sg-1"})

    async with aiohttp.ClientSession(headers=h.headers()) as s:
        assert (await post_copy(s, h, "sg-1", [UPLOADS], OUT))[0] == 201
        assert key.is_dir()
        assert await delete() == (409, {"message": SIBLING_ACTIVE.format("copy", "notStarted")})
        await force_state(h, "sg-1-copy", State.RUNNING, "running")
        assert await delete() == (409, {"message": SIBLING_ACTIVE.format("copy", "started")})
        await force_state(h, "sg-1-copy", State.COMPLETE, "exited")
        assert (await post_innetwork_plugin(s, h, "sg-1", output_dir=OUT))[0] == 201
        assert await delete() == (409, {"message": SIBLING_ACTIVE.format("plugin", "notStarted")})
        await force_state(h, "sg-1", State.RUNNING, "running")
        assert await delete() == (409, {"message": SIBLING_ACTIVE.format("plugin", "started")})
        assert (await get_status(s, h, "sg-1", "deletejobs"))[0] == 404
        await force_state(h, "sg-1", State.EXECUTOR_ERROR, "exited 1")
        status, body = await delete()
        assert (status, body["compute"]["status"], body["compute"]["cmd"]) == (
            201, "notStarted", "delete key-sg-1")
        # A re-POST returns the queued delete job.
        assert await delete() == (201, body)
    assert key.is_dir()  # no agent: nothing ran


async def test_delete_job_without_key_dir_skips_the_guard(fs_idle: Harness) -> None:
    h = fs_idle
    async with aiohttp.ClientSession(headers=h.headers()) as s:
        assert (await post_copy(s, h, "sg-2", [UPLOADS], OUT))[0] == 201
        shutil.rmtree(h.config.storebase_mount / "key-sg-2")
        assert await post_form(s, h, "deletejobs/", {"jid": "sg-2"}) == (
            201, skipped("sg-2", "deleteSkipped"))
        assert (await get_status(s, h, "sg-2", "deletejobs"))[0] == 404
