"""pfcon conformance over HTTP: global conventions (§1.1), server info (§1.3), auth and
health (§1.12, §6).  Zipfile (out-of-network) mode."""

from __future__ import annotations

import asyncio
import json
import time
import warnings
from pathlib import Path
from urllib.parse import urljoin

import aiohttp
import jwt
import pytest
import requests

from controller.auth import issue_agent_token
from tests.api.conformance_support import (
    COLLECTIONS,
    INFO_KEYS,
    METHOD_NOT_ALLOWED,
    MISSING_JSON,
    NO_JSON_415,
    open_harness,
    plugin_fields,
    read_json,
)
from tests.conftest import Harness

NOT_FOUND_TITLE = "<title>404 Not Found</title>"
PROD_SECRET = "prod-secret-key-0123456789abcdef0123456789"


def forge(claims: dict[str, object], key: str, algorithm: str = "HS256") -> str:
    with warnings.catch_warnings():  # PyJWT warns about short keys for HS512
        warnings.simplefilter("ignore")
        return jwt.encode(claims, key, algorithm=algorithm)


def in_two_days() -> int:
    return int(time.time()) + 2 * 86400


# ------------------------------------------------------------------ §1.1 globals


@pytest.mark.parametrize(("method", "path", "location"), [
    ("GET", "health", "health/"),
    ("POST", "auth-token", "auth-token/"),
    ("GET", "pluginjobs", "pluginjobs/"),
    ("POST", "pluginjobs", "pluginjobs/"),
    ("GET", "deletejobs/j1", "deletejobs/j1/"),
    ("DELETE", "copyjobs/j1", "copyjobs/j1/"),
    ("GET", "pluginjobs/j1/file?job_output_path=a/b", "pluginjobs/j1/file/?job_output_path=a/b"),
])
async def test_missing_trailing_slash_is_308_to_slashed_url(harness: Harness, method: str,
                                                           path: str, location: str) -> None:
    # No token: the redirect happens while routing, before any auth check.
    async with aiohttp.ClientSession() as s:
        r = await s.request(method, harness.base + path, allow_redirects=False)
        assert r.status == 308
        assert urljoin(str(r.url), r.headers["Location"]) == harness.base + location


@pytest.mark.parametrize("path", ["nope/", "nope", "pluginjobs/j1/other/", "jobs1/",
                                  "pluginjobs/j1/file/extra/", "../v2/pluginjobs/"])
async def test_unknown_route_is_html_404_without_auth(harness: Harness, path: str) -> None:
    async with aiohttp.ClientSession() as s:
        for headers in ({}, {"Authorization": "Bearer garbage"}):
            r = await s.get(harness.base + path, headers=headers, allow_redirects=False)
            assert r.status == 404
            assert r.content_type == "text/html"
            assert NOT_FOUND_TITLE in await r.text()


@pytest.mark.parametrize(("method", "path"), [
    ("PUT", "pluginjobs/"), ("DELETE", "pluginjobs/"), ("PATCH", "copyjobs/"),
    ("POST", "pluginjobs/j1/"), ("PUT", "deletejobs/j1/"), ("POST", "pluginjobs/j1/file/"),
    ("DELETE", "pluginjobs/j1/file/"), ("GET", "auth-token/"), ("POST", "health/"),
])
async def test_known_route_wrong_method_is_json_405(harness: Harness, method: str,
                                                    path: str) -> None:
    async with aiohttp.ClientSession(headers=harness.headers()) as s:
        r = await s.request(method, harness.base + path)
        assert r.status == 405
        assert r.headers["Content-Type"] == "application/json"
        assert await read_json(r) == {"message": METHOD_NOT_ALLOWED}


@pytest.mark.parametrize(("path", "allow"), [
    ("pluginjobs/", "GET, HEAD, OPTIONS, POST"),
    ("pluginjobs/j1/", "DELETE, GET, HEAD, OPTIONS"),
    ("pluginjobs/j1/file/", "GET, HEAD, OPTIONS"),
    ("deletejobs/j1/", "DELETE, GET, HEAD, OPTIONS"),
])
async def test_options_on_a_protected_route_needs_a_token(harness: Harness, path: str,
                                                          allow: str) -> None:
    async with aiohttp.ClientSession() as s:
        r = await s.options(harness.base + path)
        assert r.status == 401
        assert await read_json(r) == {"message": "Missing authorization header."}
        r = await s.options(harness.base + path, headers={"Authorization": "Bearer junk"})
        assert r.status == 401
        r = await s.options(harness.base + path, headers=harness.headers())
        assert r.status == 200
        assert r.headers["Allow"] == allow
        assert await r.read() == b""


@pytest.mark.parametrize(("path", "allow"), [("health/", "GET, HEAD, OPTIONS"),
                                             ("auth-token/", "OPTIONS, POST")])
async def test_options_on_a_public_route_needs_no_token(harness: Harness, path: str,
                                                        allow: str) -> None:
    async with aiohttp.ClientSession() as s:
        r = await s.options(harness.base + path)
        assert r.status == 200
        assert r.headers["Allow"] == allow


async def test_options_on_an_unknown_route_is_the_html_404(harness: Harness) -> None:
    async with aiohttp.ClientSession() as s:
        r = await s.options(harness.base + "nope/", headers=harness.headers())
        assert r.status == 404
        assert NOT_FOUND_TITLE in await r.text()
        r = await s.options(harness.base + "pluginjobs/j1/file?job_output_path=a",
                            allow_redirects=False)
        assert r.status == 308
        assert r.headers["Location"].endswith("/pluginjobs/j1/file/?job_output_path=a")


async def test_dev_mode_json_is_indented_and_newline_terminated(harness: Harness) -> None:
    assert harness.config.dev
    async with aiohttp.ClientSession() as s:
        r = await s.get(harness.base + "health/")
        assert r.headers["Content-Type"] == "application/json"
        assert await r.text() == '{\n    "health": "OK"\n}\n'
        r = await s.get(harness.base + "pluginjobs/")
        assert await r.text() == '{\n    "message": "Missing authorization header."\n}\n'
        r = await s.get(harness.base + "pluginjobs/", headers=harness.headers())
        text = await r.text()
        assert text == json.dumps(json.loads(text), indent=4) + "\n"
        assert text.startswith('{\n    "server_version": ')


async def test_head_is_served_for_get_routes(harness: Harness) -> None:
    async with aiohttp.ClientSession() as s:
        r = await s.head(harness.base + "health/")
        assert r.status == 200
        assert await r.read() == b""
        r = await s.head(harness.base + "pluginjobs/")
        assert r.status == 401
        r = await s.head(harness.base + "pluginjobs/", headers=harness.headers())
        assert r.status == 200


# ---------------------------------------------------------------- §1.3 info


@pytest.mark.parametrize("collection", COLLECTIONS)
async def test_server_info_on_every_collection(harness: Harness, collection: str) -> None:
    async with aiohttp.ClientSession(headers=harness.headers()) as s:
        r = await s.get(harness.base + collection + "/")
        assert r.status == 200
        assert r.headers["Content-Type"] == "application/json"
        body = await read_json(r)
    assert list(body) == INFO_KEYS
    assert body == {"server_version": harness.config.server_version, "pfcon_innetwork": False,
                    "storage_env": "zipfile", "requires_copy_job": False,
                    "requires_upload_job": False, "container_env": "docker",
                    "compute_volume_type": "host"}
    assert body["server_version"] == "0.0.0+unknown"


@pytest.mark.parametrize("collection", COLLECTIONS)
async def test_server_info_needs_a_token(harness: Harness, collection: str) -> None:
    async with aiohttp.ClientSession() as s:
        r = await s.get(harness.base + collection + "/")
        assert r.status == 401
        assert await read_json(r) == {"message": "Missing authorization header."}


async def test_podman_is_reported_as_docker(tmp_path: Path) -> None:
    async with open_harness(tmp_path, agent=False, container_env="podman",
                            compute_volume_type="docker_local_volume") as h, \
            aiohttp.ClientSession(headers=h.headers()) as s:
        body = await read_json(await s.get(h.base + "copyjobs/"))
    assert body["container_env"] == "docker"
    assert body["compute_volume_type"] == "docker_local_volume"


# ------------------------------------------------------------ §1.12 auth-token


async def test_login_returns_a_working_two_day_token(harness: Harness) -> None:
    async with aiohttp.ClientSession() as s:
        r = await s.post(harness.base + "auth-token/",
                         json={"pfcon_user": "pfcon", "pfcon_password": "pfcon1234"})
        assert r.status == 200
        assert r.headers["Content-Type"] == "application/json"
        body = await read_json(r)
        assert list(body) == ["token"]
        token = body["token"]
        assert jwt.get_unverified_header(token) == {"alg": "HS256", "typ": "JWT"}
        claims = jwt.decode(token, harness.config.secret_key, algorithms=["HS256"])
        assert sorted(claims) == ["exp", "pfcon_user"]
        assert claims["pfcon_user"] == "pfcon"
        assert abs(claims["exp"] - in_two_days()) < 120
        r = await s.get(harness.base + "pluginjobs/",
                        headers={"Authorization": f"Bearer {token}"})
        assert r.status == 200


async def test_login_accepts_json_with_charset(harness: Harness) -> None:
    async with aiohttp.ClientSession() as s:
        r = await s.post(harness.base + "auth-token/",
                         data=json.dumps({"pfcon_user": "pfcon", "pfcon_password": "pfcon1234"}),
                         headers={"Content-Type": "application/json; charset=utf-8"})
        assert r.status == 200
        assert list(await read_json(r)) == ["token"]


@pytest.mark.parametrize("body", [
    {"pfcon_user": "pfcon", "pfcon_password": "wrong"},
    {"pfcon_user": "other", "pfcon_password": "pfcon1234"},
    {"pfcon_user": "PFCON", "pfcon_password": "pfcon1234"},
])
async def test_login_with_wrong_credentials_is_400(harness: Harness, body: dict[str, str]) -> None:
    async with aiohttp.ClientSession() as s:
        r = await s.post(harness.base + "auth-token/", json=body)
        assert r.status == 400
        assert await read_json(r) == {"message": "Unable to log in with provided credentials."}


@pytest.mark.parametrize(("body", "missing"), [
    ({"pfcon_user": "pfcon"}, ["pfcon_password"]),
    ({"pfcon_password": "pfcon1234"}, ["pfcon_user"]),
    ({}, ["pfcon_user", "pfcon_password"]),
    ([], ["pfcon_user", "pfcon_password"]),
    ({"user": "pfcon", "password": "pfcon1234"}, ["pfcon_user", "pfcon_password"]),
])
async def test_login_missing_fields_are_bundled(harness: Harness, body: object,
                                                missing: list[str]) -> None:
    async with aiohttp.ClientSession() as s:
        r = await s.post(harness.base + "auth-token/", json=body)
        assert r.status == 400
        message = (await read_json(r))["message"]
    assert list(message) == missing
    assert message == dict.fromkeys(missing, MISSING_JSON)


async def test_login_form_encoded_or_empty_body_is_415(harness: Harness) -> None:
    async with aiohttp.ClientSession() as s:
        for kwargs in ({"data": {"pfcon_user": "pfcon", "pfcon_password": "pfcon1234"}}, {},
                       {"data": b"{}", "headers": {"Content-Type": "text/plain"}}):
            r = await s.post(harness.base + "auth-token/", **kwargs)  # type: ignore[arg-type]
            assert r.status == 415, kwargs
            assert await read_json(r) == {"message": NO_JSON_415}


async def test_login_with_malformed_json_is_400(harness: Harness) -> None:
    async with aiohttp.ClientSession() as s:
        r = await s.post(harness.base + "auth-token/", data=b"{not json",
                         headers={"Content-Type": "application/json"})
        assert r.status == 400
        assert isinstance((await read_json(r))["message"], str)


async def test_health_needs_no_token(harness: Harness) -> None:
    async with aiohttp.ClientSession() as s:
        for headers in ({}, {"Authorization": "Bearer garbage"}, {"Authorization": "Token x"},
                        harness.headers()):
            r = await s.get(harness.base + "health/", headers=headers)
            assert r.status == 200
            assert await read_json(r) == {"health": "OK"}


# ----------------------------------------------------------------- §6 tokens


async def assert_401(h: Harness, headers: dict[str, str], message: str) -> None:
    async with aiohttp.ClientSession(headers=headers) as s:
        for method, path in (("GET", "pluginjobs/"), ("GET", "deletejobs/j1/"),
                             ("DELETE", "copyjobs/j1/"), ("GET", "pluginjobs/j1/file/"),
                             ("POST", "uploadjobs/"), ("GET", "fleet/jobs/")):
            r = await s.request(method, h.base + path)
            assert r.status == 401, (method, path)
            assert r.headers["Content-Type"] == "application/json"
            assert await read_json(r) == {"message": message}, (method, path)


async def test_no_header_is_missing(harness: Harness) -> None:
    await assert_401(harness, {}, "Missing authorization header.")


async def test_empty_header_counts_as_missing(harness: Harness) -> None:
    # pfcon: `if not request.headers.get('Authorization')` -> missing.
    await assert_401(harness, {"Authorization": ""}, "Missing authorization header.")


@pytest.mark.parametrize("value", ["Token x", "bearer x", "Bearer", "BEARER x", "Basic cGZjb24=",
                                   "JWT x"])
async def test_not_bearer_is_invalid_header(harness: Harness, value: str) -> None:
    await assert_401(harness, {"Authorization": value}, "Invalid authorization header.")


async def test_extra_pieces_are_invalid_header(harness: Harness) -> None:
    # pfleet differs: pfcon ignores everything after the second space-separated piece.
    token = harness.token()
    for value in (f"Bearer {token} junk", f"Bearer {token} {token}", f"Bearer  {token}"):
        await assert_401(harness, {"Authorization": value}, "Invalid authorization header.")


async def test_bad_tokens_are_invalid_token(harness: Harness) -> None:
    key, now = harness.config.secret_key, int(time.time())
    good = {"pfcon_user": "pfcon", "exp": in_two_days()}
    agent_token, _ = issue_agent_token(harness.config, "fake1")
    unsigned = (jwt.utils.base64url_encode(b'{"alg":"none","typ":"JWT"}').decode() + "."
                + jwt.utils.base64url_encode(json.dumps(good).encode()).decode() + ".")
    tokens = {
        "garbage": "garbage",
        "truncated": harness.token()[:-4],
        "other key": forge(good, "some-other-secret-key-that-is-long-enough"),
        "alg none": unsigned,
        "alg none via pyjwt": jwt.encode(good, None, algorithm="none"),
        "HS512": forge(good, key, "HS512"),
        # pfleet differs: exp is required and pfcon_user must be the configured user.
        "no exp": forge({"pfcon_user": "pfcon"}, key),
        "no pfcon_user": forge({"exp": in_two_days()}, key),
        "other user": forge({"pfcon_user": "mallory", "exp": in_two_days()}, key),
        "agent token": agent_token,
        "non-numeric exp": forge({"pfcon_user": "pfcon", "exp": "soon"}, key),
        "future nbf": forge({**good, "nbf": now + 3600}, key),
    }
    for name, token in tokens.items():
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as s:
            r = await s.get(harness.base + "pluginjobs/")
            assert r.status == 401, name
            assert await read_json(r) == {"message": "Invalid authorization token."}, name


async def test_expired_token(harness: Harness) -> None:
    for exp in (int(time.time()) - 5, int(time.time()) - 3 * 86400):
        token = forge({"pfcon_user": "pfcon", "exp": exp}, harness.config.secret_key)
        await assert_401(harness, {"Authorization": f"Bearer {token}"},
                         "Expired authorization token.")


async def test_token_expiring_while_cached(harness: Harness) -> None:
    token = forge({"pfcon_user": "pfcon", "exp": int(time.time()) + 2},
                  harness.config.secret_key)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as s:
        assert (await s.get(harness.base + "pluginjobs/")).status == 200
        await asyncio.sleep(max(0.0, token_exp(token) - time.time()) + 0.1)
        r = await s.get(harness.base + "pluginjobs/")
        assert r.status == 401
        assert await read_json(r) == {"message": "Expired authorization token."}


def token_exp(token: str) -> float:
    return float(jwt.decode(token, options={"verify_signature": False})["exp"])


async def test_auth_drains_large_body_before_401(harness: Harness) -> None:
    """A 5 MiB multipart POST with a bad token gets the 401, not a connection reset."""
    url = harness.base + "pluginjobs/"
    payload = b"\0" * (5 << 20)

    def send(headers: dict[str, str]) -> tuple[int, object]:
        r = requests.post(url, headers=headers, data=plugin_fields("big"),
                          files={"data_file": payload}, timeout=30)
        return r.status_code, r.json()

    status, body = await asyncio.to_thread(send, {"Authorization": "Bearer garbage"})
    assert (status, body) == (401, {"message": "Invalid authorization token."})
    status, body = await asyncio.to_thread(send, {})
    assert (status, body) == (401, {"message": "Missing authorization header."})
    assert not (harness.config.storebase_mount / "key-big").exists()


# --------------------------------------------------------------- production


async def test_production_mode_is_compact_and_uses_its_own_credentials(tmp_path: Path) -> None:
    async with open_harness(tmp_path, agent=False, dev=False, secret_key=PROD_SECRET,
                            pfcon_user="cube", pfcon_password="s3cret") as h, \
            aiohttp.ClientSession() as s:
        r = await s.get(h.base + "health/")
        assert r.headers["Content-Type"] == "application/json"
        assert await r.text() == '{"health": "OK"}\n'

        r = await s.get(h.base + "pluginjobs/")
        assert (r.status, await r.text()) == (401, '{"message": "Missing authorization header."}\n')

        r = await s.post(h.base + "auth-token/",
                         json={"pfcon_user": "pfcon", "pfcon_password": "pfcon1234"})
        assert (r.status, await r.text()) == (
            400, '{"message": "Unable to log in with provided credentials."}\n')

        r = await s.post(h.base + "auth-token/", json={})
        assert r.status == 400
        assert await r.text() == json.dumps(
            {"message": {"pfcon_user": MISSING_JSON, "pfcon_password": MISSING_JSON}}) + "\n"
        assert (await r.text()).startswith('{"message": {"pfcon_user": "Missing required')

        r = await s.post(h.base + "auth-token/",
                         json={"pfcon_user": "cube", "pfcon_password": "s3cret"})
        assert r.status == 200
        text = await r.text()
        token = json.loads(text)["token"]
        assert text == f'{{"token": "{token}"}}\n'
        assert jwt.decode(token, PROD_SECRET, algorithms=["HS256"])["pfcon_user"] == "cube"

        r = await s.get(h.base + "deletejobs/", headers={"Authorization": f"Bearer {token}"})
        assert r.status == 200
        info = await r.text()
        assert info == json.dumps(json.loads(info)) + "\n"
        assert list(json.loads(info)) == INFO_KEYS

        r = await s.get(h.base + "pluginjobs/nope/", headers={"Authorization": f"Bearer {token}"})
        assert (r.status, await r.text()) == (404, '{"message": "No such job: nope"}\n')

        # A token of the dev key (or of the dev user) does not pass here.
        dev = forge({"pfcon_user": "pfcon", "exp": in_two_days()},
                    "pfleet-dev-secret-key-not-for-production")
        mine_but_dev_user = forge({"pfcon_user": "pfcon", "exp": in_two_days()}, PROD_SECRET)
        for bad in (dev, mine_but_dev_user):
            r = await s.get(h.base + "pluginjobs/", headers={"Authorization": f"Bearer {bad}"})
            assert (r.status, await r.text()) == (
                401, '{"message": "Invalid authorization token."}\n')



@pytest.mark.parametrize("body", [
    {"pfcon_user": None, "pfcon_password": "pfcon1234"},
    {"pfcon_user": "pfcon", "pfcon_password": ""},
    {"pfcon_user": "", "pfcon_password": ""},
    {"pfcon_user": 1, "pfcon_password": "pfcon1234"},
])
async def test_login_present_but_empty_fields_are_bad_credentials(harness: Harness,
                                                                  body: object) -> None:
    # Flask-RESTful's reqparse counts a key that is present (even null or "") as given.
    async with aiohttp.ClientSession() as s:
        r = await s.post(harness.base + "auth-token/", json=body)
        assert (r.status, await read_json(r)) == (
            400, {"message": "Unable to log in with provided credentials."})
