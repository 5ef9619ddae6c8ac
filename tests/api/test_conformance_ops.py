"""pfcon conformance over HTTP in zipfile mode: status (§1.9), DELETE (§1.10), file/
(§1.11), copy/upload skipped (§1.6, §1.7) and deletejobs (§1.8)."""

from __future__ import annotations

import asyncio
import io
import os
import re
import time
import zipfile
from pathlib import Path

import aiohttp
import pytest

from tests.api.conformance_support import (
    COLLECTIONS,
    COMPUTE_KEYS,
    GENERIC_404,
    MISSING_FORM,
    SUFFIX,
    ZERO_TIME,
    fleet_job,
    get_status,
    open_harness,
    ordered,
    post_plugin,
    read_json,
    storebase_contents,
    wait_status,
)
from tests.conftest import Harness, start_fake_agent, stop_task

RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")
DELETE_ACTIVE = ("The plugin job is still active (status: {}). All jobs must finish before "
                 "scheduling a delete job.")


def skipped(jid: str, message: str) -> dict[str, object]:
    return {"compute": {"jid": jid, "image": "", "cmd": "", "status": "finishedSuccessfully",
                        "message": message, "timestamp": "", "logs": ""}}


async def workload_names(h: Harness) -> list[str]:
    assert h.runtime is not None
    return [handle.name for handle in await h.runtime.list_ours()]


# ---------------------------------------------------------------------- status


@pytest.mark.parametrize("collection", COLLECTIONS)
async def test_status_of_unknown_job_is_404_json(harness: Harness, collection: str) -> None:
    async with aiohttp.ClientSession(headers=harness.headers()) as s:
        for jid in ("nope", "-bad", "a b"):
            r = await s.get(f"{harness.base}{collection}/{jid}/")
            assert r.status == 404
            assert r.headers["Content-Type"] == "application/json"
            assert await read_json(r) == {"message": f"No such job: {jid}{SUFFIX[collection]}"
                                          if jid == "nope" else f"No such job: {jid}"}


async def test_plugin_job_is_not_another_kind(harness: Harness) -> None:
    async with aiohttp.ClientSession(headers=harness.headers()) as s:
        assert (await post_plugin(s, harness, "kind-1"))[0] == 201
        await wait_status(s, harness, "kind-1")
        for collection in ("copyjobs", "uploadjobs", "deletejobs"):
            status, body = await get_status(s, harness, "kind-1", collection)
            assert (status, body) == (404, {"message": f"No such job: kind-1{SUFFIX[collection]}"})


async def test_status_of_successful_job(harness: Harness) -> None:
    async with aiohttp.ClientSession(headers=harness.headers()) as s:
        status, created = await post_plugin(s, harness, "ok-1", env=["PFLEET_FAKE_LOGS=a\nb\n"])
        assert status == 201
        compute = await wait_status(s, harness, "ok-1")
        r = await s.get(harness.base + "pluginjobs/ok-1/")
        assert r.headers["Content-Type"] == "application/json"
        body = await read_json(r)
    assert list(body) == ["compute"]
    assert list(compute) == COMPUTE_KEYS
    assert {k: compute[k] for k in ("jid", "image", "cmd", "status", "message", "logs")} == {
        "jid": "ok-1", "image": created["compute"]["image"], "cmd": created["compute"]["cmd"],
        "status": "finishedSuccessfully", "message": "exited", "logs": "a\nb\n"}
    assert RFC3339.fullmatch(compute["timestamp"]), compute["timestamp"]


@pytest.mark.parametrize(("env", "message"), [
    (["PFLEET_FAKE_EXIT_CODE=3"], "exited 3"),
    (["PFLEET_FAKE_EXIT_CODE=1"], "exited 1"),
    (["PFLEET_FAKE_OOM=1"], "OOMKilled"),
    (["PFLEET_FAKE_START_ERROR=image not found: x"], "image not found: x"),
])
async def test_failures_are_finished_with_error(harness: Harness, env: list[str],
                                                message: str) -> None:
    async with aiohttp.ClientSession(headers=harness.headers()) as s:
        assert (await post_plugin(s, harness, "fail-1", env=env))[0] == 201
        compute = await wait_status(s, harness, "fail-1")
    assert (compute["status"], compute["message"]) == ("finishedWithError", message)
    assert RFC3339.fullmatch(compute["timestamp"]), compute["timestamp"]


async def test_running_job_is_started(harness: Harness) -> None:
    async with aiohttp.ClientSession(headers=harness.headers()) as s:
        assert (await post_plugin(s, harness, "run-1", env=["PFLEET_FAKE_RUN_FOR=30",
                                                            "PFLEET_FAKE_LOGS=l1\nl2\n"]))[0] == 201
        compute = await wait_status(s, harness, "run-1", ["started"])
        assert compute["message"] == "running"
        assert RFC3339.fullmatch(compute["timestamp"]), compute["timestamp"]
        # Logs of a running job are fetched from its agent in the background.
        deadline = time.monotonic() + 5
        while compute["logs"] != "l1\nl2\n" and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            compute = (await get_status(s, harness, "run-1"))[1]["compute"]
        assert compute["logs"] == "l1\nl2\n"
        assert compute["status"] == "started"
        assert (await s.delete(harness.base + "pluginjobs/run-1/")).status == 204


async def test_logs_are_the_last_job_logs_tail_lines(tmp_path: Path) -> None:
    async with open_harness(tmp_path, job_logs_tail=3) as h, \
            aiohttp.ClientSession(headers=h.headers()) as s:
        logs = "".join(f"line {i}\n" for i in range(1, 8))
        assert (await post_plugin(s, h, "tail-1", env=[f"PFLEET_FAKE_LOGS={logs}",
                                                       "PFLEET_FAKE_EXIT_CODE=2"]))[0] == 201
        compute = await wait_status(s, h, "tail-1")
    assert compute["status"] == "finishedWithError"
    assert compute["logs"] == "line 5\nline 6\nline 7\n"


# ---------------------------------------------------------------------- DELETE


@pytest.mark.parametrize("collection", COLLECTIONS)
async def test_delete_of_missing_job_is_204(harness: Harness, collection: str) -> None:
    async with aiohttp.ClientSession(headers=harness.headers()) as s:
        for jid in ("nope", "-bad"):
            r = await s.delete(f"{harness.base}{collection}/{jid}/")
            assert r.status == 204
            assert r.headers["Content-Type"] == "application/json"
            assert await r.read() == b""


@pytest.mark.parametrize("collection", COLLECTIONS)
async def test_delete_needs_a_token(harness: Harness, collection: str) -> None:
    async with aiohttp.ClientSession() as s:
        r = await s.delete(f"{harness.base}{collection}/nope/")
        assert r.status == 401


async def test_delete_of_finished_jobs_hides_them_but_keeps_data(harness: Harness) -> None:
    async with aiohttp.ClientSession(headers=harness.headers()) as s:
        assert (await post_plugin(s, harness, "del-1"))[0] == 201
        await wait_status(s, harness, "del-1")
        r = await s.post(harness.base + "deletejobs/", data={"jid": "del-1"})
        assert r.status == 201
        await wait_status(s, harness, "del-1", collection="deletejobs")
        for collection in ("pluginjobs", "deletejobs"):
            r = await s.delete(f"{harness.base}{collection}/del-1/")
            assert (r.status, r.headers["Content-Type"], await r.read()) == (
                204, "application/json", b"")
            status, body = await get_status(s, harness, "del-1", collection)
            assert (status, body) == (404, {"message": f"No such job: del-1{SUFFIX[collection]}"})
            # A second DELETE is as fine as the first.
            assert (await s.delete(f"{harness.base}{collection}/del-1/")).status == 204


async def test_delete_does_not_touch_storebase(harness: Harness) -> None:
    async with aiohttp.ClientSession(headers=harness.headers()) as s:
        assert (await post_plugin(s, harness, "del-2"))[0] == 201
        await wait_status(s, harness, "del-2")
        assert (await s.delete(harness.base + "pluginjobs/del-2/")).status == 204
    assert (harness.config.storebase_mount / "key-del-2" / "incoming" / "a.txt").is_file()


async def test_delete_of_running_job_ends_it(harness: Harness) -> None:
    async with aiohttp.ClientSession(headers=harness.headers()) as s:
        assert (await post_plugin(s, harness, "del-run", env=["PFLEET_FAKE_RUN_FOR=30"]))[0] == 201
        await wait_status(s, harness, "del-run", ["started"])
        assert "del-run" in await workload_names(harness)
        r = await s.delete(harness.base + "pluginjobs/del-run/")
        assert r.status == 204
        for _ in range(100):
            if "del-run" not in await workload_names(harness):
                break
            await asyncio.sleep(0.02)
        assert "del-run" not in await workload_names(harness)
        status, _ = await get_status(s, harness, "del-run")
        assert status == 404
        # The jid can be used again: a new job, with new inputs.
        status, body = await post_plugin(s, harness, "del-run")
        assert status == 201, body
        assert body["data"]["nfiles"] == 2
        assert (await wait_status(s, harness, "del-run"))["status"] == "finishedSuccessfully"


async def test_delete_with_remove_jobs_off_is_a_noop(tmp_path: Path) -> None:
    async with open_harness(tmp_path, remove_jobs=False) as h, \
            aiohttp.ClientSession(headers=h.headers()) as s:
        assert (await post_plugin(s, h, "keep-1"))[0] == 201
        done = await wait_status(s, h, "keep-1")
        r = await s.delete(h.base + "pluginjobs/keep-1/")
        assert (r.status, await r.read()) == (204, b"")
        assert await get_status(s, h, "keep-1") == (200, {"compute": done})


# ----------------------------------------------------------------------- file/


async def test_file_of_missing_key_dir_is_generic_404(harness: Harness) -> None:
    async with aiohttp.ClientSession(headers=harness.headers()) as s:
        r = await s.get(harness.base + "pluginjobs/nokey/file/")
        assert r.status == 404
        assert r.headers["Content-Type"] == "application/json"
        assert await read_json(r) == {"message": GENERIC_404}


async def fetch_zip(s: aiohttp.ClientSession, h: Harness, jid: str,
                    query: str = "") -> zipfile.ZipFile:
    r = await s.get(f"{h.base}pluginjobs/{jid}/file/{query}")
    assert r.status == 200
    assert r.headers["Content-Type"] == "application/zip"
    assert r.headers["Content-Disposition"] == f"attachment; filename={jid}.zip"
    zf = zipfile.ZipFile(io.BytesIO(await r.read()))
    assert zf.testzip() is None
    return zf


async def test_file_zips_outgoing(harness: Harness) -> None:
    out = harness.config.storebase_mount / "key-out-1" / "outgoing"
    (out / "sub" / "deep").mkdir(parents=True)
    (out / "res.txt").write_bytes(b"result\n")
    (out / "sub" / "deep" / "x.bin").write_bytes(bytes(range(256)) * 40)
    (out / "empty.txt").write_bytes(b"")
    (out / "evil.chrislink").write_text("home/bob")
    (out / "sub" / "nested.chrislink").write_text("home/alice")
    os.symlink("/etc/passwd", out / "passwd-link")
    os.symlink(out / "res.txt", out / "sub" / "res-link")
    os.symlink(out / "sub", out / "dir-link")
    (out / "emptydir").mkdir()
    async with aiohttp.ClientSession(headers=harness.headers()) as s:
        # job_output_path is ignored in zipfile mode.
        for query in ("", "?job_output_path=home/x"):
            zf = await fetch_zip(s, harness, "out-1", query)
            assert sorted(zf.namelist()) == ["empty.txt", "res.txt", "sub/deep/x.bin"]
            assert zf.read("res.txt") == b"result\n"
            assert zf.read("sub/deep/x.bin") == bytes(range(256)) * 40
            assert zf.read("empty.txt") == b""
            assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_DEFLATED}
    # Listing never deletes anything in zipfile mode.
    assert (out / "evil.chrislink").is_file()


async def test_file_with_empty_or_missing_outgoing_is_an_empty_zip(harness: Harness) -> None:
    key = harness.config.storebase_mount / "key-out-2"
    key.mkdir()
    async with aiohttp.ClientSession(headers=harness.headers()) as s:
        assert (await fetch_zip(s, harness, "out-2")).namelist() == []
        assert (key / "outgoing").is_dir()
        assert (await fetch_zip(s, harness, "out-2")).namelist() == []


async def test_file_after_a_plugin_run(harness: Harness) -> None:
    async with aiohttp.ClientSession(headers=harness.headers()) as s:
        assert (await post_plugin(s, harness, "out-3"))[0] == 201
        await wait_status(s, harness, "out-3")
        out = harness.config.storebase_mount / "key-out-3" / "outgoing"
        (out / "made.txt").write_text("by plugin")
        zf = await fetch_zip(s, harness, "out-3")
        assert zf.namelist() == ["made.txt"]


# ------------------------------------------------------------ copy and upload


async def test_copy_and_upload_are_skipped_in_zipfile_mode(harness: Harness) -> None:
    async with aiohttp.ClientSession(headers=harness.headers()) as s:
        cases = [
            ("copyjobs/", {"jid": "cp-1", "output_dir": "home/out"}, "copySkipped", "cp-1"),
            ("copyjobs/", [("jid", "/cp-2"), ("input_dirs", "a"), ("input_dirs", "b"),
                           ("output_dir", "o"), ("cpu_limit", "2000"), ("memory_limit", "1")],
             "copySkipped", "cp-2"),
            ("uploadjobs/", {"jid": "up-1", "job_output_path": "/home/out"}, "uploadSkipped",
             "up-1"),
        ]
        for path, data, message, jid in cases:
            r = await s.post(harness.base + path, data=data)
            assert r.status == 201
            body = await read_json(r)
            assert ordered(body) == ordered(skipped(jid, message))
        # python-pfconclient's CLI always adds a `data_file` part: accepted and ignored.
        form = aiohttp.FormData()
        form.add_field("jid", "cp-3")
        form.add_field("output_dir", "o")
        form.add_field("data_file", b"1000", filename="data_file")
        r = await s.post(harness.base + "copyjobs/", data=form)
        assert r.status == 201
        assert ordered(await read_json(r)) == ordered(skipped("cp-3", "copySkipped"))
        # Nothing was scheduled or written.
        for collection, jid in (("copyjobs", "cp-1"), ("uploadjobs", "up-1")):
            assert (await get_status(s, harness, jid, collection))[0] == 404
    assert storebase_contents(harness) == []


@pytest.mark.parametrize(("path", "data", "message"), [
    ("copyjobs/", {"jid": "cp-1"}, {"output_dir": MISSING_FORM}),
    ("copyjobs/", {}, {"jid": MISSING_FORM, "output_dir": MISSING_FORM}),
    ("copyjobs/", {"jid": "cp-1", "output_dir": "o", "cpu_limit": "abc", "memory_limit": "-5"},
     {"cpu_limit": "invalid literal for int() with base 10: 'abc'",
      "memory_limit": "must not be negative, got -5"}),
    ("uploadjobs/", {"jid": "up-1"}, {"job_output_path": MISSING_FORM}),
    ("uploadjobs/", None, {"jid": MISSING_FORM, "job_output_path": MISSING_FORM}),
    ("uploadjobs/", {"jid": "a/b", "job_output_path": "x", "memory_limit": "1e3"},
     {"jid": "must start with a letter or digit and contain only letters, digits, '_', '.' "
             "and '-' (at most 128 characters), got 'a/b'",
      "memory_limit": "invalid literal for int() with base 10: '1e3'"}),
    ("deletejobs/", {}, {"jid": MISSING_FORM}),
    ("deletejobs/", {"jid": "d-1", "cpu_limit": "1.0"},
     {"cpu_limit": "invalid literal for int() with base 10: '1.0'"}),
])
async def test_copy_upload_delete_parser_errors(harness: Harness, path: str,
                                                data: dict[str, str] | None,
                                                message: dict[str, str]) -> None:
    async with aiohttp.ClientSession(headers=harness.headers()) as s:
        r = await s.post(harness.base + path, data=data)
        assert r.status == 400
        body = await read_json(r)
    assert body == {"message": message}
    assert list(body["message"]) == list(message)


async def test_copy_with_json_body_is_missing_parameters(harness: Harness) -> None:
    async with aiohttp.ClientSession(headers=harness.headers()) as s:
        r = await s.post(harness.base + "copyjobs/", json={"jid": "cp-1", "output_dir": "o"})
        assert (r.status, await read_json(r)) == (
            400, {"message": {"jid": MISSING_FORM, "output_dir": MISSING_FORM}})


# ------------------------------------------------------------------ deletejobs


async def test_delete_job_without_key_dir_is_skipped(harness: Harness) -> None:
    async with aiohttp.ClientSession(headers=harness.headers()) as s:
        for jid, expected in (("gone-1", "gone-1"), ("/gone-2", "gone-2")):
            r = await s.post(harness.base + "deletejobs/", data={"jid": jid})
            assert r.status == 201
            assert ordered(await read_json(r)) == ordered(skipped(expected, "deleteSkipped"))
        assert (await get_status(s, harness, "gone-1", "deletejobs"))[0] == 404


async def test_delete_job_removes_the_key_dir(harness: Harness) -> None:
    key = harness.config.storebase_mount / "key-dj-1"
    async with aiohttp.ClientSession(headers=harness.headers()) as s:
        assert (await post_plugin(s, harness, "dj-1"))[0] == 201
        await wait_status(s, harness, "dj-1")
        (key / "outgoing" / "result.txt").write_text("r")
        r = await s.post(harness.base + "deletejobs/", data={"jid": "dj-1"})
        assert r.status == 201
        body = await read_json(r)
        assert list(body) == ["compute"]
        assert list(body["compute"]) == COMPUTE_KEYS
        queued = {"jid": "dj-1", "image": "", "cmd": "delete key-dj-1",
                  "status": "notStarted", "message": "queued", "timestamp": ZERO_TIME,
                  "logs": ""}
        # The POST waits briefly for the delete, so it may already answer it finished.
        if body["compute"]["status"] != "notStarted":
            assert (body["compute"]["status"], body["compute"]["message"]) == (
                "finishedSuccessfully", "exited")
            assert body["compute"]["logs"] == "deleted key-dj-1\n"
        else:
            assert body["compute"] == queued
        done = await wait_status(s, harness, "dj-1", collection="deletejobs")
        assert (done["jid"], done["status"], done["message"]) == (
            "dj-1", "finishedSuccessfully", "exited")
        assert not key.exists()
        # Re-POST of the finished delete job: the key dir is gone, so it is skipped.
        r = await s.post(harness.base + "deletejobs/", data={"jid": "dj-1"})
        assert r.status == 201
        assert ordered(await read_json(r)) == ordered(skipped("dj-1", "deleteSkipped"))
        # The finished delete job still answers until it is DELETEd.
        assert (await get_status(s, harness, "dj-1", "deletejobs"))[1]["compute"] == done
        # file/ now has nothing to serve.
        r = await s.get(harness.base + "pluginjobs/dj-1/file/")
        assert (r.status, await read_json(r)) == (404, {"message": GENERIC_404})


async def test_delete_job_with_only_a_key_dir(harness: Harness) -> None:
    key = harness.config.storebase_mount / "key-dj-2"
    (key / "incoming").mkdir(parents=True)
    async with aiohttp.ClientSession(headers=harness.headers()) as s:
        r = await s.post(harness.base + "deletejobs/", data={"jid": "dj-2"})
        assert r.status == 201
        assert (await wait_status(s, harness, "dj-2", collection="deletejobs"))["status"] == (
            "finishedSuccessfully")
    assert not key.exists()


async def test_delete_job_after_failed_plugin_is_allowed(harness: Harness) -> None:
    async with aiohttp.ClientSession(headers=harness.headers()) as s:
        assert (await post_plugin(s, harness, "dj-3", env=["PFLEET_FAKE_EXIT_CODE=3"]))[0] == 201
        assert (await wait_status(s, harness, "dj-3"))["status"] == "finishedWithError"
        r = await s.post(harness.base + "deletejobs/", data={"jid": "dj-3"})
        assert r.status == 201
        await wait_status(s, harness, "dj-3", collection="deletejobs")
    assert not (harness.config.storebase_mount / "key-dj-3").exists()


async def test_delete_job_refused_while_plugin_runs(harness: Harness) -> None:
    key = harness.config.storebase_mount / "key-dj-4"
    async with aiohttp.ClientSession(headers=harness.headers()) as s:
        assert (await post_plugin(s, harness, "dj-4", env=["PFLEET_FAKE_RUN_FOR=30"]))[0] == 201
        await wait_status(s, harness, "dj-4", ["started"])
        r = await s.post(harness.base + "deletejobs/", data={"jid": "dj-4"})
        assert (r.status, await read_json(r)) == (409, {"message": DELETE_ACTIVE.format("started")})
        assert (await get_status(s, harness, "dj-4", "deletejobs"))[0] == 404
        assert (key / "incoming" / "a.txt").is_file()
        assert (await s.delete(harness.base + "pluginjobs/dj-4/")).status == 204
        # Once the plugin job is gone the delete may run.
        r = await s.post(harness.base + "deletejobs/", data={"jid": "dj-4"})
        assert r.status == 201
        await wait_status(s, harness, "dj-4", collection="deletejobs")
    assert not key.exists()


async def test_delete_job_refused_while_plugin_is_queued(tmp_path: Path) -> None:
    async with open_harness(tmp_path, agent=False) as h, \
            aiohttp.ClientSession(headers=h.headers()) as s:
        status, body = await post_plugin(s, h, "dj-5")
        assert status == 201
        assert await get_status(s, h, "dj-5") == (200, {"compute": body["compute"]})
        assert body["compute"]["status"] == "notStarted"
        r = await s.post(h.base + "deletejobs/", data={"jid": "dj-5"})
        assert (r.status, await read_json(r)) == (
            409, {"message": DELETE_ACTIVE.format("notStarted")})
        assert (h.config.storebase_mount / "key-dj-5" / "incoming").is_dir()


# ------------------------------------------------------- queued and lost jobs


async def test_deleted_queued_job_never_runs(tmp_path: Path) -> None:
    async with open_harness(tmp_path, agent=False) as h, \
            aiohttp.ClientSession(headers=h.headers()) as s:
        assert (await post_plugin(s, h, "q-del"))[0] == 201
        assert (await s.delete(h.base + "pluginjobs/q-del/")).status == 204
        assert (await post_plugin(s, h, "q-run"))[0] == 201
        h.agent, h.runtime, h.agent_task = await start_fake_agent(h.config, h.server, tmp_path)
        assert (await wait_status(s, h, "q-run"))["status"] == "finishedSuccessfully"
        assert await workload_names(h) == ["q-run"]
        assert (await get_status(s, h, "q-del"))[0] == 404


async def test_job_of_a_lost_agent_is_undefined_and_can_be_rerun(tmp_path: Path) -> None:
    async with open_harness(tmp_path, agent_lease=1.0) as h, \
            aiohttp.ClientSession(headers=h.headers()) as s:
        assert (await post_plugin(s, h, "lost-1", env=["PFLEET_FAKE_RUN_FOR=30"]))[0] == 201
        await wait_status(s, h, "lost-1", ["started"])
        await stop_task(h.agent_task)
        h.agent_task = None
        lost = await wait_status(s, h, "lost-1", ["undefined"])
        assert lost["message"] == "agent fake1 lost: no contact for 1 s"
        # The delete guard lets an undefined plugin job pass.
        r = await s.post(h.base + "deletejobs/", data={"jid": "lost-1"})
        assert r.status == 201
        assert (await read_json(r))["compute"]["status"] == "notStarted"
        assert (await s.delete(h.base + "deletejobs/lost-1/")).status == 204
        # A re-POST of an undefined job starts a new attempt.
        status, body = await post_plugin(s, h, "lost-1")
        assert status == 201, body
        assert body["data"]["nfiles"] == 2
        assert body["compute"]["status"] == "notStarted"
        assert (await fleet_job(s, h, "lost-1"))["attempt"] == 2


async def test_concurrent_posts_of_one_jid_create_one_job(harness: Harness) -> None:
    async with aiohttp.ClientSession(headers=harness.headers()) as s:
        results = await asyncio.gather(*(
            post_plugin(s, harness, "race-1", env=["PFLEET_FAKE_RUN_FOR=30"]) for _ in range(4)))
        assert [status for status, _ in results] == [201] * 4
        created = [body for _, body in results if body["data"]]
        assert len(created) == 1
        assert created[0]["data"]["nfiles"] == 2
        assert (await fleet_job(s, harness, "race-1"))["attempt"] == 1
        assert (await s.delete(harness.base + "pluginjobs/race-1/")).status == 204


async def test_file_of_an_impossible_jid_is_generic_404(harness: Harness) -> None:
    async with aiohttp.ClientSession(headers=harness.headers()) as s:
        for jid in ("-x", "a b", ".."):
            r = await s.get(f"{harness.base}pluginjobs/{jid}/file/")
            if jid == "..":  # the client resolves the dot segment: another URL
                assert r.status == 404
                continue
            assert (r.status, await read_json(r)) == (404, {"message": GENERIC_404})


async def test_json_escapes_non_ascii_like_pfcon(harness: Harness) -> None:
    async with aiohttp.ClientSession(headers=harness.headers()) as s:
        env = ["PFLEET_FAKE_LOGS=h\u00e9llo \u2713\n"]
        assert (await post_plugin(s, harness, "utf-1", env=env))[0] == 201
        await wait_status(s, harness, "utf-1")
        r = await s.get(harness.base + "pluginjobs/utf-1/")
        text = await r.text()
    assert '"logs": "h\\u00e9llo \\u2713\\n"' in text
    assert text.isascii()
