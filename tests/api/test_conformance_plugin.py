"""pfcon conformance over HTTP: POST /api/v1/pluginjobs/ (§1.5) in zipfile mode —
the 201 shape, parser bundles, validation order, safe staging, idempotent re-POST."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import re
import stat
import zipfile
from pathlib import Path

import aiohttp
import pytest
import requests
from yarl import URL

from controller.storage.zipmode import STAGING_DIR
from tests.api.conformance_support import (
    BAD_REQUEST_GENERIC,
    COMPUTE_KEYS,
    DATA_KEYS,
    DEFAULT_ZIP,
    ENV_RULE,
    MISSING_FORM,
    PLUGIN_REQUIRED,
    ZERO_TIME,
    fleet_job,
    get_status,
    leftovers,
    make_zip,
    make_zip_infos,
    multipart,
    open_harness,
    plugin_fields,
    post_plugin,
    read_json,
    storebase_contents,
    wait_status,
)
from tests.conftest import Harness


def jid_error(value: str) -> str:
    return (f"must start with a letter or digit and contain only letters, digits, '_', '.' "
            f"and '-' (at most 128 characters), got {value!r}")


# ------------------------------------------------------------------- 201 shape


async def test_created_response_shape(harness: Harness) -> None:
    async with aiohttp.ClientSession(headers=harness.headers()) as s:
        before = dt.datetime.now()
        r = await s.post(harness.base + "pluginjobs/", data=multipart(plugin_fields(
            "shape-1", args=["--prefix", "le le", "--dir", "home/x"], args_path_flags=["--dir"],
            env=["A=1", "B=x=y"])))
        assert r.status == 201
        assert r.headers["Content-Type"] == "application/json"
        body = await read_json(r)
    assert list(body) == ["data", "compute"]
    data, compute = body["data"], body["compute"]
    assert list(data) == DATA_KEYS
    key = harness.config.storebase_mount / "key-shape-1"
    assert data["jid"] == "shape-1"
    assert data["nfiles"] == 2
    assert data["path"] == str(key / "incoming")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}", data["timestamp"])
    stamp = dt.datetime.fromisoformat(data["timestamp"])
    assert before - dt.timedelta(seconds=1) <= stamp <= dt.datetime.now()
    assert list(compute) == COMPUTE_KEYS
    assert compute == {
        "jid": "shape-1", "image": "fnndsc/pl-app:1.0",
        "cmd": ("python3 /usr/local/bin/app --prefix 'le le' --dir /share/incoming "
                "/share/incoming /share/outgoing"),
        "status": "notStarted", "message": "queued", "timestamp": ZERO_TIME, "logs": ""}
    assert (key / "incoming" / "a.txt").read_bytes() == b"hello\n"
    assert (key / "incoming" / "sub" / "b.txt").read_bytes() == b"world\n"
    assert (key / "outgoing").is_dir()
    assert (key / "outgoing").stat().st_mode & 0o777 == 0o777  # any CONTAINER_USER writes


@pytest.mark.parametrize(("ptype", "tail"), [
    ("ds", "/share/incoming /share/outgoing"), ("fs", "/share/outgoing"),
    ("ts", "/share/outgoing")])
async def test_cmd_per_plugin_type(harness: Harness, ptype: str, tail: str) -> None:
    async with aiohttp.ClientSession(headers=harness.headers()) as s:
        status, body = await post_plugin(s, harness, f"type-{ptype}", type=ptype, args=[],
                                         entrypoint=["app"])
    assert status == 201, body
    assert body["compute"]["cmd"] == f"app {tail}"


async def test_leading_slash_of_jid_is_stripped(harness: Harness) -> None:
    async with aiohttp.ClientSession(headers=harness.headers()) as s:
        status, body = await post_plugin(s, harness, "//slash-1")
        assert status == 201, body
        assert body["data"]["jid"] == body["compute"]["jid"] == "slash-1"
        assert (harness.config.storebase_mount / "key-slash-1" / "incoming").is_dir()
        status, body = await get_status(s, harness, "slash-1")
        assert (status, body["compute"]["jid"]) == (200, "slash-1")


async def test_empty_entrypoint_element_counts_as_an_element(harness: Harness) -> None:
    # pfcon: `entrypoint: cannot be empty` only for an empty *list*; "" is one element.
    async with aiohttp.ClientSession(headers=harness.headers()) as s:
        status, body = await post_plugin(s, harness, "ep-empty", entrypoint=[""], args=[])
    assert status == 201, body
    assert body["compute"]["cmd"] == "'' /share/incoming /share/outgoing"


async def test_longest_valid_jid_is_accepted(harness: Harness) -> None:
    jid = "J" + "a_b.c-" * 21 + "x"  # 128 characters
    assert len(jid) == 128
    async with aiohttp.ClientSession(headers=harness.headers()) as s:
        status, body = await post_plugin(s, harness, jid)
    assert status == 201, body
    assert body["compute"]["jid"] == jid


async def test_pfconclient_style_multipart_is_accepted(harness: Harness) -> None:
    """requests' multipart (what python-pfconclient sends), repeated keys for lists."""
    def send() -> tuple[int, dict[str, object]]:
        r = requests.post(harness.base + "pluginjobs/", headers=harness.headers(),
                          data={"jid": "client-1", "entrypoint": ["python3", "app.py"],
                                "args": ["--x", "1"], "auid": "cube", "number_of_workers": 1,
                                "cpu_limit": 1000, "memory_limit": 200, "gpu_limit": 0,
                                "image": "img", "type": "fs"},
                          files={"data_file": DEFAULT_ZIP}, timeout=30)
        return r.status_code, r.json()

    status, body = await asyncio.to_thread(send)
    assert status == 201, body
    assert body["compute"]["cmd"] == "python3 app.py --x 1 /share/outgoing"
    assert body["data"]["nfiles"] == 2


# -------------------------------------------------------------- parser bundles


async def test_every_missing_field_is_listed_in_pfcon_order(harness: Harness) -> None:
    async with aiohttp.ClientSession(headers=harness.headers()) as s:
        for data in (multipart([], None), multipart([], DEFAULT_ZIP), {}, None):
            r = await s.post(harness.base + "pluginjobs/", data=data)
            assert r.status == 400
            message = (await read_json(r))["message"]
            assert list(message) == PLUGIN_REQUIRED
            assert message == dict.fromkeys(PLUGIN_REQUIRED, MISSING_FORM)


async def test_json_body_on_job_post_is_ignored(harness: Harness) -> None:
    async with aiohttp.ClientSession(headers=harness.headers()) as s:
        r = await s.post(harness.base + "pluginjobs/", json=dict(plugin_fields("json-1")))
        assert r.status == 400
        assert (await read_json(r))["message"] == dict.fromkeys(PLUGIN_REQUIRED, MISSING_FORM)
    assert leftovers(harness, "json-1") == []


async def test_all_bad_fields_are_bundled_at_once(harness: Harness) -> None:
    fields = plugin_fields("a b", drop=["auid", "image"], cpu_limit="abc", memory_limit="1.5",
                           gpu_limit="", number_of_workers="one", type="xx")
    async with aiohttp.ClientSession(headers=harness.headers()) as s:
        r = await s.post(harness.base + "pluginjobs/", data=multipart(fields))
        assert r.status == 400
        message = (await read_json(r))["message"]
    expected = {
        "jid": jid_error("a b"),
        "auid": MISSING_FORM,
        "number_of_workers": "invalid literal for int() with base 10: 'one'",
        "cpu_limit": "invalid literal for int() with base 10: 'abc'",
        "memory_limit": "invalid literal for int() with base 10: '1.5'",
        "gpu_limit": "invalid literal for int() with base 10: ''",
        "image": MISSING_FORM,
        "type": "xx is not a valid choice",
    }
    assert message == expected
    assert list(message) == list(expected)
    assert leftovers(harness, "a b") == []


@pytest.mark.parametrize("value", ["DS", "", "ds ", "fsx"])
async def test_type_must_be_a_choice(harness: Harness, value: str) -> None:
    async with aiohttp.ClientSession(headers=harness.headers()) as s:
        status, body = await post_plugin(s, harness, "type-bad", type=value)
    assert (status, body) == (400, {"message": {"type": f"{value} is not a valid choice"}})


@pytest.mark.parametrize("field", ["number_of_workers", "cpu_limit", "memory_limit", "gpu_limit"])
async def test_negative_limits_are_refused(harness: Harness, field: str) -> None:
    # pfleet differs: pfcon hands negative values to its backend.
    async with aiohttp.ClientSession(headers=harness.headers()) as s:
        status, body = await post_plugin(s, harness, "neg-1", **{field: "-1"})
    assert (status, body) == (400, {"message": {field: "must not be negative, got -1"}})
    assert leftovers(harness, "neg-1") == []


@pytest.mark.parametrize("value", ["a/b", "..", ".", "a b", "x" * 300, "x" * 129, "", "/", "-x",
                                   "_x", ".hidden", "a\\b", "ü", "a:b", "a\nb"])
async def test_invalid_jid_is_a_bundle_error(harness: Harness, value: str) -> None:
    # pfleet differs: pfcon would let the backend fail with a 500.
    before = storebase_contents(harness)
    async with aiohttp.ClientSession(headers=harness.headers()) as s:
        status, body = await post_plugin(s, harness, value)
    assert (status, body) == (400, {"message": {"jid": jid_error(value)}})
    assert storebase_contents(harness) == before


# ------------------------------------------------------------ validation order


async def test_missing_data_file_is_werkzeugs_generic_400(harness: Harness) -> None:
    # A part without a filename is a form field, not a file (Werkzeug's rule).
    text_part = aiohttp.MultipartWriter("form-data")
    for key, value in [*plugin_fields("nofile-1"), ("data_file", "1000")]:
        text_part.append(value).set_content_disposition("form-data", name=key)
    variants = [
        multipart(plugin_fields("nofile-1"), None),
        plugin_fields("nofile-1"),  # url-encoded
        [*plugin_fields("nofile-1"), ("data_file", "1000")],  # url-encoded text field
        text_part,
    ]
    async with aiohttp.ClientSession(headers=harness.headers()) as s:
        for data in variants:
            r = await s.post(harness.base + "pluginjobs/", data=data)
            assert r.status == 400
            assert await read_json(r) == {"message": BAD_REQUEST_GENERIC}
    assert leftovers(harness, "nofile-1") == []


async def test_parser_errors_win_over_missing_data_file(harness: Harness) -> None:
    async with aiohttp.ClientSession(headers=harness.headers()) as s:
        status, body = await post_plugin(s, harness, "order-1", data_file=None, cpu_limit="x",
                                         drop=["image"])
    assert (status, body) == (400, {"message": {
        "cpu_limit": "invalid literal for int() with base 10: 'x'", "image": MISSING_FORM}})


async def test_missing_entrypoint_is_a_parser_error(harness: Harness) -> None:
    async with aiohttp.ClientSession(headers=harness.headers()) as s:
        status, body = await post_plugin(s, harness, "ep-none", drop=["entrypoint"])
    assert (status, body) == (400, {"message": {"entrypoint": MISSING_FORM}})
    assert leftovers(harness, "ep-none") == []


async def test_env_without_equals_sign(harness: Harness) -> None:
    async with aiohttp.ClientSession(headers=harness.headers()) as s:
        status, body = await post_plugin(s, harness, "env-1", env=["A=1", "NOEQUALS"])
        assert (status, body) == (400, {"message": ENV_RULE})
        # data_file is checked before env.
        status, body = await post_plugin(s, harness, "env-1", env=["NOEQUALS"], data_file=None)
        assert (status, body) == (400, {"message": BAD_REQUEST_GENERIC})
        # An empty value and an empty key both contain '='.
        status, body = await post_plugin(s, harness, "env-2", env=["A=", "=b"])
        assert status == 201, body
    assert leftovers(harness, "env-1") == []


# -------------------------------------------------------------- staging safety


async def test_bad_zip_like_the_pfconclient_cli_leaves_nothing(harness: Harness) -> None:
    def send() -> tuple[int, object]:
        r = requests.post(harness.base + "pluginjobs/", headers=harness.headers(),
                          data=plugin_fields("cli-1"), files={"data_file": b"1000"}, timeout=30)
        return r.status_code, r.json()

    assert await asyncio.to_thread(send) == (400, {"message": "data_file: Bad zip file"})
    async with aiohttp.ClientSession(headers=harness.headers()) as s:
        status, body = await post_plugin(s, harness, "cli-1", data_file=b"")
        assert (status, body) == (400, {"message": "data_file: Bad zip file"})
        status, _ = await get_status(s, harness, "cli-1")
        assert status == 404
    assert leftovers(harness, "cli-1") == []


def _symlink_entry() -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo("link")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, b"/etc/passwd"


@pytest.mark.parametrize(("entries", "message"), [
    ([(zipfile.ZipInfo("a.txt"), b"ok"), (zipfile.ZipInfo("../evil"), b"x")],
     "data_file: entry '../evil' contains '..'"),
    ([(zipfile.ZipInfo("sub/../../evil"), b"x")],
     "data_file: entry 'sub/../../evil' contains '..'"),
    ([(zipfile.ZipInfo("/abs/evil"), b"x")], "data_file: entry '/abs/evil' has an absolute path"),
    ([(zipfile.ZipInfo("a.txt"), b"ok"), _symlink_entry()],
     "data_file: entry 'link' is a symbolic link"),
])
async def test_hostile_zip_is_refused_and_leaves_nothing(
        harness: Harness, entries: list[tuple[zipfile.ZipInfo, bytes]], message: str) -> None:
    async with aiohttp.ClientSession(headers=harness.headers()) as s:
        status, body = await post_plugin(s, harness, "evil-1", data_file=make_zip_infos(entries))
    assert (status, body) == (400, {"message": message})
    assert leftovers(harness, "evil-1") == []
    assert not (harness.config.storebase_mount / "evil").exists()
    assert not (harness.config.storebase_mount.parent / "evil").exists()


async def test_data_file_before_the_other_fields(harness: Harness) -> None:
    # The zip is unpacked as it arrives, before the form has named the jid.
    form = aiohttp.FormData()
    form.add_field("data_file", DEFAULT_ZIP, filename="data_file",
                   content_type="application/octet-stream")
    for key, value in plugin_fields("first-1"):
        form.add_field(key, value)
    async with aiohttp.ClientSession(headers=harness.headers()) as s:
        r = await s.post(harness.base + "pluginjobs/", data=form)
        body = await read_json(r)
    assert (r.status, body["data"]["nfiles"]) == (201, 2), body
    incoming = harness.config.storebase_mount / "key-first-1" / "incoming"
    assert (incoming / "sub" / "b.txt").read_bytes() == b"world\n"
    assert leftovers(harness, "none") == []  # no staging dir or spool remains


async def test_zip_refused_early_still_answers_after_the_whole_body(harness: Harness) -> None:
    # '../evil' is refused at its local header; the 8 MiB that follow are read and
    # dropped so that the client gets its 400 rather than a reset connection.
    data = make_zip_infos([(zipfile.ZipInfo("../evil"), b"x"),
                           *((zipfile.ZipInfo(f"f{i}.bin"), os.urandom(1 << 20))
                             for i in range(8))])

    def send() -> tuple[int, object]:
        r = requests.post(harness.base + "pluginjobs/", headers=harness.headers(),
                          data=plugin_fields("early-1"), files={"data_file": data}, timeout=60)
        return r.status_code, r.json()

    assert await asyncio.to_thread(send) == (
        400, {"message": "data_file: entry '../evil' contains '..'"})
    assert leftovers(harness, "early-1") == []


async def test_client_gone_mid_upload_leaves_nothing(harness: Harness) -> None:
    # Half of a multipart body (its zip entry half written), then the client vanishes.
    url = URL(harness.base + "pluginjobs/")
    boundary = "pfleetboundary"
    head = "".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n'
                   f"{v}\r\n" for k, v in plugin_fields("gone-1"))
    zipped = make_zip_infos([(zipfile.ZipInfo("big.bin"), os.urandom(4 << 20))])
    body = (head + f'--{boundary}\r\nContent-Disposition: form-data; name="data_file"; '
            'filename="data_file"\r\nContent-Type: application/zip\r\n\r\n').encode()
    body += zipped + f"\r\n--{boundary}--\r\n".encode()
    request = (f"POST {url.raw_path} HTTP/1.1\r\nHost: {url.host}:{url.port}\r\n"
               f"Authorization: {harness.headers()['Authorization']}\r\n"
               f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode()
    _reader, writer = await asyncio.open_connection(url.host, url.port)
    writer.write(request + body[:len(body) // 2])
    await writer.drain()
    staging = harness.config.storebase_mount / STAGING_DIR
    for _ in range(250):  # the upload has begun
        if any(staging.iterdir()):
            break
        await asyncio.sleep(0.02)
    assert any(staging.iterdir())
    writer.close()
    await writer.wait_closed()
    for _ in range(250):
        if not leftovers(harness, "gone-1"):
            break
        await asyncio.sleep(0.02)
    assert leftovers(harness, "gone-1") == []
    async with aiohttp.ClientSession(headers=harness.headers()) as s:
        assert (await get_status(s, harness, "gone-1"))[0] == 404


async def test_limits_are_413_and_leave_nothing(tmp_path: Path) -> None:
    async with open_harness(tmp_path, max_files=5, max_upload_mb=1) as h, \
            aiohttp.ClientSession(headers=h.headers()) as s:
        five = make_zip({f"f{i}.txt": b"x" for i in range(5)})
        status, body = await post_plugin(s, h, "lim-ok", data_file=five)
        assert status == 201, body
        assert body["data"]["nfiles"] == 5

        cases = [
            (make_zip({f"f{i}.txt": b"x" for i in range(6)}), "data_file: more than 5 entries"),
            (make_zip({"zeros": b"\0" * ((1 << 20) + 1)}),
             "data_file: uncompressed size over 1 MiB"),
        ]
        for data, message in cases:
            status, body = await post_plugin(s, h, "lim-1", data_file=data)
            assert (status, body) == (413, {"message": message})
            assert leftovers(h, "lim-1") == []

        # An upload over the cap is refused while streaming; the client still gets the
        # 413 (the rest of the body is drained), not a reset.
        def send() -> tuple[int, object]:
            r = requests.post(h.base + "pluginjobs/", headers=h.headers(),
                              data=plugin_fields("lim-1"),
                              files={"data_file": b"\1" * (3 << 20)}, timeout=30)
            return r.status_code, r.json()

        assert await asyncio.to_thread(send) == (
            413, {"message": "data_file: upload larger than 1 MiB"})
        assert leftovers(h, "lim-1") == []


async def test_agentless_gpu_request_is_refused_at_submit(harness: Harness) -> None:
    async with aiohttp.ClientSession(headers=harness.headers()) as s:
        status, body = await post_plugin(s, harness, "gpu-1", gpu_limit="4")
        assert (status, body) == (
            400, {"message": "gpu_limit=4 but no agent has more than 0 GPU(s)"})
        status, body = await post_plugin(s, harness, "cpu-1", cpu_limit="100000")
        assert (status, body) == (
            400, {"message": "cpu_limit=100000 but no agent has more than 64000 millicores"})
        status, _ = await get_status(s, harness, "gpu-1")
        assert status == 404
    assert leftovers(harness, "gpu-1") == []
    assert leftovers(harness, "cpu-1") == []


async def test_multi_worker_job_is_accepted_by_a_multi_worker_agent(harness: Harness) -> None:
    async with aiohttp.ClientSession(headers=harness.headers()) as s:
        status, body = await post_plugin(s, harness, "workers-2", number_of_workers="2")
        assert status == 201, body
        assert (await wait_status(s, harness, "workers-2"))["status"] == "finishedSuccessfully"


# ---------------------------------------------------------------- idempotency


async def test_repost_of_running_job_returns_it(harness: Harness) -> None:
    async with aiohttp.ClientSession(headers=harness.headers()) as s:
        status, first = await post_plugin(s, harness, "idem-run", env=["PFLEET_FAKE_RUN_FOR=30"])
        assert status == 201, first
        running = await wait_status(s, harness, "idem-run", ["started"])
        assert running["message"] == "running"
        assert running["timestamp"] != ZERO_TIME
        # Idempotency is checked before the data step: even a bad zip is not looked at.
        for data_file in (DEFAULT_ZIP, b"1000"):
            status, body = await post_plugin(s, harness, "idem-run", data_file=data_file,
                                             env=["PFLEET_FAKE_RUN_FOR=30"], image="other")
            assert status == 201, body
            assert list(body) == ["data", "compute"]
            assert body["data"] == {}
            assert list(body["compute"]) == COMPUTE_KEYS
            assert body["compute"] == running
        assert (await fleet_job(s, harness, "idem-run"))["attempt"] == 1
        # Validation still comes first.
        status, body = await post_plugin(s, harness, "idem-run", data_file=None)
        assert (status, body) == (400, {"message": BAD_REQUEST_GENERIC})
        assert (await s.delete(harness.base + "pluginjobs/idem-run/")).status == 204


async def test_repost_of_failed_job_starts_a_new_attempt(harness: Harness) -> None:
    async with aiohttp.ClientSession(headers=harness.headers()) as s:
        status, _ = await post_plugin(s, harness, "idem-fail", env=["PFLEET_FAKE_EXIT_CODE=3"])
        assert status == 201
        failed = await wait_status(s, harness, "idem-fail")
        assert (failed["status"], failed["message"]) == ("finishedWithError", "exited 3")

        new_inputs = make_zip({"only.txt": b"second"})
        status, body = await post_plugin(s, harness, "idem-fail", data_file=new_inputs)
        assert status == 201, body
        assert body["data"]["nfiles"] == 1
        assert body["compute"]["status"] == "notStarted"
        done = await wait_status(s, harness, "idem-fail")
        assert (done["status"], done["message"]) == ("finishedSuccessfully", "exited")
        assert (await fleet_job(s, harness, "idem-fail"))["attempt"] == 2
    incoming = harness.config.storebase_mount / "key-idem-fail" / "incoming"
    assert sorted(p.name for p in incoming.iterdir()) == ["only.txt"]


async def test_refused_rerun_leaves_the_failed_job_as_it_was(harness: Harness) -> None:
    async with aiohttp.ClientSession(headers=harness.headers()) as s:
        await post_plugin(s, harness, "idem-keep", env=["PFLEET_FAKE_EXIT_CODE=3"])
        failed = await wait_status(s, harness, "idem-keep")
        status, body = await post_plugin(s, harness, "idem-keep", data_file=b"1000")
        assert (status, body) == (400, {"message": "data_file: Bad zip file"})
        status, body = await get_status(s, harness, "idem-keep")
        assert (status, body) == (200, {"compute": failed})
        assert (await fleet_job(s, harness, "idem-keep"))["attempt"] == 1
    incoming = harness.config.storebase_mount / "key-idem-keep" / "incoming"
    assert sorted(p.name for p in incoming.iterdir()) == ["a.txt", "sub"]


async def test_repost_of_finished_job_returns_it_as_is(harness: Harness) -> None:
    async with aiohttp.ClientSession(headers=harness.headers()) as s:
        await post_plugin(s, harness, "idem-done", env=["PFLEET_FAKE_LOGS=done\n"])
        done = await wait_status(s, harness, "idem-done")
        assert done["status"] == "finishedSuccessfully"
        status, body = await post_plugin(s, harness, "idem-done",
                                         data_file=make_zip({"new.txt": b"n"}))
        assert (status, body) == (201, {"data": {}, "compute": done})
        assert body["compute"]["logs"] == "done\n"
        assert (await fleet_job(s, harness, "idem-done"))["attempt"] == 1
    incoming = harness.config.storebase_mount / "key-idem-done" / "incoming"
    assert not (incoming / "new.txt").exists()


async def test_repost_of_queued_job_returns_it(tmp_path: Path) -> None:
    async with open_harness(tmp_path, agent=False) as h, \
            aiohttp.ClientSession(headers=h.headers()) as s:
        status, first = await post_plugin(s, h, "idem-q")
        assert status == 201
        status, body = await post_plugin(s, h, "idem-q")
        assert (status, body) == (201, {"data": {}, "compute": first["compute"]})


async def test_zero_workers_is_refused_at_submit(harness: Harness) -> None:
    async with aiohttp.ClientSession(headers=harness.headers()) as s:
        status, body = await post_plugin(s, harness, "workers-0", number_of_workers="0")
        assert (status, body) == (400, {"message": "number_of_workers must be at least 1, "
                                                   "got number_of_workers=0"})
    assert leftovers(harness, "workers-0") == []


async def test_oversized_text_field_is_refused_without_holding_it(harness: Harness) -> None:
    async with aiohttp.ClientSession(headers=harness.headers()) as s:
        status, body = await post_plugin(s, harness, "huge-arg", args=["x" * (5 << 20)])
        assert (status, body) == (413, {"message": "form fields larger than 4 MiB"})
    assert leftovers(harness, "huge-arg") == []
