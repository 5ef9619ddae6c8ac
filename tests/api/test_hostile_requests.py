"""Hostile requests: broken multipart and url-encoded bodies, odd JSON login bodies,
odd ``Authorization`` headers, HEAD on a download.  Each must get a pfcon-shaped 4xx
(never a 500) and leave nothing behind: no job, no ``key-<jid>``, no staged or
spooled upload.

Bodies go out as raw bytes through aiohttp's client; requests it would not send (raw
non-UTF-8 header bytes, a repeated ``Authorization`` header) go over a plain socket
to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp

from controller.store import STORE
from tests.api.conformance_support import DEFAULT_ZIP, leftovers, open_harness, plugin_fields
from tests.conftest import Harness
from tests.support.zips import make_zip

BOUNDARY = "hostile"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"
FORM = "application/x-www-form-urlencoded"
LOGIN = {"pfcon_user": "pfcon", "pfcon_password": "pfcon1234"}


def part(name: str | None, value: bytes, *headers: str, filename: str | None = None) -> bytes:
    lines = list(headers)
    if name is not None:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        lines.insert(0, f"Content-Disposition: {disposition}")
    head = "".join(f"{line}\r\n" for line in lines)
    return f"--{BOUNDARY}\r\n{head}\r\n".encode() + value + b"\r\n"


def plugin_parts(jid: str) -> bytes:
    return b"".join(part(k, v.encode()) for k, v in plugin_fields(jid))


def zip_part() -> bytes:
    return part("data_file", DEFAULT_ZIP, "Content-Type: application/octet-stream",
                filename="data_file")


END = f"--{BOUNDARY}--\r\n".encode()


async def post(s: aiohttp.ClientSession, h: Harness, path: str, body: bytes,
               content_type: str) -> tuple[int, Any]:
    r = await s.post(h.base + path, data=body, headers={"Content-Type": content_type})
    return r.status, json.loads(await r.text())


async def raw_exchange(h: Harness, request: bytes) -> bytes:
    """Send ``request`` as is on a new connection; return all that comes back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", h.server.port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(10):
            answer = await reader.read()  # the request says Connection: close
    finally:
        writer.close()
        await writer.wait_closed()
    return answer


async def raw_http(h: Harness, request: bytes) -> tuple[int, Any]:
    """Status and JSON body of the answer to a raw request."""
    head, _, body = (await raw_exchange(h, request)).partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


async def nothing_left(h: Harness, jid: str) -> None:
    assert leftovers(h, jid) == []
    assert await h.app[STORE].list_jobs(100, include_removed=True) == []


async def test_broken_multipart_bodies_are_400(harness: Harness) -> None:
    """Each is refused with a 400 that says how the body is broken (aiohttp's reader
    raised on these: each was a 500 once)."""
    jid = "mp-1"
    fields = plugin_parts(jid)
    cases = {
        # No closing boundary: the body ends inside the upload or after a field.
        "unclosed after upload": fields + zip_part(),
        "unclosed after field": fields,
        "empty body": b"",
        "no boundary at all": b"jid=mp-1",
        "unclosed after a boundary": fields + b"--" + BOUNDARY.encode(),
        "text after a boundary": b"--" + BOUNDARY.encode() + b"junk\r\n" + fields + END,
        "bad base64 part": part("jid", b"abcde", "Content-Transfer-Encoding: base64") + END,
        "unknown transfer encoding": part("jid", b"x", "Content-Transfer-Encoding: x-rot13")
        + END,
        "nested part without boundary": part("x", b"y", "Content-Type: multipart/mixed") + END,
        "part header over 8 KiB": part("n" * 9000, b"") + fields + zip_part() + END,
        "200 part headers": part("x", b"", *(f"X-H{i}: v" for i in range(200))) + END,
    }
    async with aiohttp.ClientSession(headers=harness.headers()) as s:
        for label, body in cases.items():
            status, answer = await post(s, harness, "pluginjobs/", body, MULTIPART)
            assert status == 400, (label, answer)
            assert str(answer["message"]).startswith("malformed multipart body: "), (
                label, answer)
            await nothing_left(harness, jid)
        # The same reader serves the other job routes and the legacy API.
        for path in ("copyjobs/", "uploadjobs/", "deletejobs/", "jobs/"):
            status, answer = await post(s, harness, path, cases["unclosed after field"],
                                        MULTIPART)
            assert status == 400, (path, answer)
        # Quoted boundary, preamble and epilogue are valid multipart and accepted.
        body = b"preamble\r\n" + plugin_parts("mp-ok") + zip_part() + END + b"epilogue\r\n"
        status, answer = await post(s, harness, "pluginjobs/", body,
                                    f'multipart/form-data; boundary="{BOUNDARY}"')
        assert status == 201, answer
        # `_charset_` means nothing special, as for Werkzeug (aiohttp's reader took it
        # as the default charset and then misread the next delimiter).
        body = part("_charset_", b"utf-8") + plugin_parts("mp-cs") + zip_part() + END
        status, answer = await post(s, harness, "pluginjobs/", body, MULTIPART)
        assert status == 201, answer


async def test_too_many_parts_are_413_and_leave_nothing(harness: Harness) -> None:
    """Empty parts cost no field bytes: they are capped by count, as Werkzeug caps them
    for pfcon (1000).  The upload sent before them is removed."""
    jid = "parts-1"
    noise = part("args", b"") * 1000
    async with aiohttp.ClientSession(headers=harness.headers()) as s:
        for body in (zip_part() + plugin_parts(jid) + noise + END,
                     plugin_parts(jid) + part("x", b"", filename="f") * 1000 + END):
            status, answer = await post(s, harness, "pluginjobs/", body, MULTIPART)
            assert (status, answer) == (413, {"message": "more than 1000 form parts"})
            await nothing_left(harness, jid)
        # Up to the cap is fine: the plugin fields, data_file and empty args.
        fill = 1000 - len(plugin_fields(jid)) - 1
        body = plugin_parts(jid) + zip_part() + part("args", b"") * fill + END
        status, answer = await post(s, harness, "pluginjobs/", body, MULTIPART)
        assert status == 201, answer


async def test_broken_url_encoded_bodies_are_400(harness: Harness) -> None:
    async with aiohttp.ClientSession(headers=harness.headers()) as s:
        status, answer = await post(s, harness, "copyjobs/", b"jid=ue-1&output_dir=\xff",
                                    FORM)
        assert status == 400, answer
        assert answer["message"].startswith("malformed form body: "), answer
        status, answer = await post(s, harness, "copyjobs/", b"jid=ue-1&output_dir=o",
                                    f"{FORM}; charset=x-no-such-charset")
        assert (status, answer) == (400, {"message": "malformed form body: unknown "
                                                     "encoding: x-no-such-charset"})
        # Broken %-escapes are kept literally (as Werkzeug does), then judged as values.
        status, answer = await post(s, harness, "copyjobs/", b"jid=ue%zz&output_dir=%", FORM)
        assert status == 400
        assert list(answer["message"]) == ["jid"], answer
    await nothing_left(harness, "ue-1")


async def test_login_json_bodies_are_read_as_flask_reads_them(harness: Harness) -> None:
    """Bytes, not text: a BOM or UTF-16 is detected and a charset parameter ignored, as
    Flask's get_json does; nesting too deep for the parser is a 400, not a 500."""
    url = harness.base + "auth-token/"
    plain = json.dumps(LOGIN).encode()
    async with aiohttp.ClientSession() as s:
        for body, ctype in ((codecs.BOM_UTF8 + plain, "application/json"),
                            (json.dumps(LOGIN).encode("utf-16"), "application/json"),
                            (plain, "application/json; charset=x-no-such-charset")):
            r = await s.post(url, data=body, headers={"Content-Type": ctype})
            assert r.status == 200, await r.text()
            assert "token" in json.loads(await r.text())
        deep = b"[" * 100_000 + b"]" * 100_000
        r = await s.post(url, data=deep, headers={"Content-Type": "application/json"})
        assert r.status == 400
        assert json.loads(await r.text())["message"].startswith("Failed to decode JSON")
        # The operators' API reads its JSON bodies the same way.
        r = await s.post(harness.base + "agents/tokens/", data=deep, headers={
            **harness.headers(), "Content-Type": "application/json"})
        assert r.status == 400


async def test_odd_authorization_headers_are_401(tmp_path: Path) -> None:
    async with open_harness(tmp_path, agent=False) as h:
        token = h.token()

        def get(*headers: bytes) -> bytes:
            return (b"GET /api/v1/pluginjobs/ HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    b"Connection: close\r\n" + b"".join(x + b"\r\n" for x in headers)
                    + b"\r\n")

        # Bytes that are not UTF-8 reach PyJWT as surrogates: a 500 before.
        assert await raw_http(h, get(b"Authorization: Bearer \xff\xfe\x80")) == (
            401, {"message": "Invalid authorization token."})
        # Two headers: the first used to win, whatever a proxy checked.  pfcon's WSGI
        # server joins them, which makes the value invalid.
        valid, other = f"Authorization: Bearer {token}".encode(), b"Authorization: Bearer x"
        for pair in ((valid, other), (other, valid), (valid, valid)):
            assert await raw_http(h, get(*pair)) == (
                401, {"message": "Invalid authorization header."})
        assert (await raw_http(h, get(valid)))[0] == 200


async def test_head_of_a_zip_download_has_no_body(harness: Harness) -> None:
    """The zip is streamed; aiohttp sent what was written even to a HEAD, so the
    zip followed the headers and a keep-alive client read it as the next answer."""
    outgoing = harness.config.storebase_mount / "key-head-1" / "outgoing"
    outgoing.mkdir(parents=True)
    (outgoing / "out.txt").write_bytes(b"x" * 10_000)
    auth = f"Authorization: Bearer {harness.token()}"
    head = (f"HEAD /api/v1/pluginjobs/head-1/file/ HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"{auth}\r\n\r\n")
    get = (f"GET /api/v1/health/ HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}\r\n"
           f"Connection: close\r\n\r\n")
    # Both on one connection: the second answer must follow the first one's headers.
    answer = await raw_exchange(harness, (head + get).encode())
    first, _, rest = answer.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200 ") and b"application/zip" in first, answer[:300]
    assert rest.startswith(b"HTTP/1.1 200 "), answer[:300]
    assert rest.endswith(b'"health": "OK"\n}\n'), rest[-300:]


async def test_a_body_in_tiny_http_chunks_is_read_whole(harness: Harness) -> None:
    """Transfer-Encoding: chunked, 7 bytes per HTTP chunk: the reader takes the
    body one network read at a time, and the ends of HTTP chunks are not its end."""
    body = plugin_parts("chunked-1") + zip_part() + END

    async def pieces() -> AsyncIterator[bytes]:
        for at in range(0, len(body), 7):
            yield body[at:at + 7]

    async with aiohttp.ClientSession(headers=harness.headers()) as s:
        r = await s.post(harness.base + "pluginjobs/", data=pieces(),
                         headers={"Content-Type": MULTIPART})
        assert r.status == 201, await r.text()
        assert r.request_info.headers.get("Transfer-Encoding") == "chunked"


async def test_a_client_gone_mid_upload_leaves_nothing(harness: Harness) -> None:
    """The connection drops inside data_file, after megabytes were unpacked: the
    staged upload is removed and no job is made."""
    jid = "gone-1"
    data = make_zip({"big.bin": os.urandom(4 << 20)})  # random: deflate keeps it big
    body = plugin_parts(jid) + part("data_file", data, filename="data_file") + END
    sent = body[:len(body) - (1 << 20)]
    head = (f"POST /api/v1/pluginjobs/ HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {harness.token()}\r\nContent-Type: {MULTIPART}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    _, writer = await asyncio.open_connection("127.0.0.1", harness.server.port)
    try:
        writer.write(head + sent)
        await writer.drain()
        await until(lambda: leftovers(harness, jid), "the upload was never staged")
    finally:
        writer.transport.abort()
    await until(lambda: not leftovers(harness, jid), "the upload was left behind")
    await nothing_left(harness, jid)


async def until(condition: Callable[[], object], what: str) -> None:
    for _ in range(200):  # 10 s at most
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(what)
