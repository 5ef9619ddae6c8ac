"""The Docker Engine API calls on a job's path, made directly over aiohttp.

Every job costs the runtime about six engine calls (create, start, an inspect
after each of its events, logs, remove) and a few lines of the event stream.
Through the ``docker`` SDK each call is a thread hop plus the requests/urllib3
stack (2-3 ms of CPU), and the stream needs a thread of its own: the largest part
of the agent's cost per job.  These are plain REST, so they go straight to the
engine's socket from the event loop instead; the SDK keeps what is rare (version
negotiation, info, images and pulls, volumes, listing).

Errors come back as the SDK's own exception types (``docker.errors.NotFound`` for
404, ``APIError`` with ``status_code`` and ``explanation`` otherwise), so one
error translation serves both paths; transport failures are ``OSError`` /
``aiohttp.ClientError``.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import struct
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import docker.errors

__all__ = ["TRANSPORT_ERRORS", "EngineHTTP", "demux_logs", "unsupported_url"]


TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (aiohttp.ClientError, TimeoutError)
_SCHEMES = ("unix", "tcp", "http", "https")
_FRAME = struct.Struct(">BxxxL")  # stream type, 3 padding bytes, payload length


def unsupported_url(url: str) -> str | None:
    """Why ``url`` (DOCKER_HOST style) cannot be used, or None."""
    scheme = urlsplit(url).scheme
    if scheme not in _SCHEMES:
        return (f"engine URL {url!r}: scheme {scheme or '(none)'!r} is not supported "
                f"(use one of {', '.join(s + '://' for s in _SCHEMES)})")
    return None


class _Status:
    """The parts of a response ``docker.errors.APIError`` reads (status_code, and
    url and reason in its ``str()``)."""

    def __init__(self, status_code: int, url: str, reason: str) -> None:
        self.status_code, self.url, self.reason = status_code, url, reason


class EngineHTTP:
    """A small async client for one engine, pinned to the API version the SDK
    negotiated.  Create it and call it from the event loop; ``close()`` it."""

    def __init__(self, url: str, api_version: str, *, timeout: float,
                 tls: ssl.SSLContext | None = None, connections: int = 16) -> None:
        problem = unsupported_url(url)
        if problem:
            raise ValueError(problem)
        parts = urlsplit(url)
        if parts.scheme == "unix":
            connector: aiohttp.BaseConnector = aiohttp.UnixConnector(
                path=parts.path, limit=connections)
            origin = "http://docker"
        else:
            connector = aiohttp.TCPConnector(limit=connections, ssl=tls or False)
            origin = f"{'https' if tls or parts.scheme == 'https' else 'http'}://{parts.netloc}"
        self._prefix = f"{origin}/v{api_version}"
        self._timeout = timeout
        # set by close(): an event stream waiting for its next line is not woken
        # reliably by the session closing under it, so it waits on this as well
        self._closing = asyncio.get_running_loop().create_future()
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=timeout),
            trust_env=False, skip_auto_headers=("User-Agent",))

    async def close(self) -> None:
        if not self._closing.done():
            self._closing.set_result(None)
        await self._session.close()

    async def _request(self, method: str, path: str, *, params: dict[str, str] | None = None,
                       body: Any = None, longer_by: float = 0.0) -> bytes:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else None
        timeout = aiohttp.ClientTimeout(total=self._timeout + longer_by) if longer_by else None
        async with self._session.request(method, self._prefix + path, params=params,
                                         data=data, headers=headers,
                                         timeout=timeout) as response:
            payload = await response.read()
            if response.status >= 400:
                raise _api_error(_Status(response.status, path, response.reason or ""),
                                 payload)
            return payload

    async def create_container(self, config: dict[str, Any], name: str | None) -> str:
        params = {"name": name} if name else None
        answer = json.loads(await self._request("POST", "/containers/create", params=params,
                                                body=config))
        return str(answer["Id"])

    async def start(self, ref: str) -> None:
        await self._request("POST", f"/containers/{ref}/start")

    async def stop(self, ref: str, grace_s: int) -> None:
        """Stop, waiting up to ``grace_s`` before the engine kills the container."""
        await self._request("POST", f"/containers/{ref}/stop", params={"t": str(grace_s)},
                            longer_by=grace_s)

    async def inspect_container(self, ref: str) -> dict[str, Any]:
        return dict(json.loads(await self._request("GET", f"/containers/{ref}/json")))

    async def remove_container(self, ref: str, *, force: bool) -> None:
        params = {"force": "1" if force else "0", "v": "0"}
        await self._request("DELETE", f"/containers/{ref}", params=params)

    async def logs(self, ref: str, tail: int) -> bytes:
        """The last ``tail`` lines of stdout and stderr, in the order written."""
        raw = await self._request("GET", f"/containers/{ref}/logs",
                                  params={"stdout": "1", "stderr": "1", "tail": str(tail)})
        return demux_logs(raw)


    async def events(self, filters: dict[str, list[str]], *,
                     on_open: Callable[[], None] | None = None) -> AsyncIterator[dict[str, Any]]:
        """The engine's event stream (one JSON object a line), until it ends;
        ``on_open`` is called once the engine has accepted the subscription."""
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self._timeout)
        async with self._session.get(self._prefix + "/events",
                                     params={"filters": json.dumps(filters)},
                                     timeout=timeout) as response:
            if response.status >= 400:
                raise _api_error(_Status(response.status, "/events", response.reason or ""),
                                 await response.read())
            if on_open is not None:
                on_open()
            while True:
                read = asyncio.ensure_future(response.content.readline())
                try:
                    await asyncio.wait((read, self._closing),
                                       return_when=asyncio.FIRST_COMPLETED)
                except BaseException:
                    read.cancel()
                    raise
                if not read.done():  # close() was called
                    read.cancel()
                    return
                line = read.result()
                if not line:
                    return
                try:
                    event = json.loads(line)
                except ValueError:
                    continue  # a keep-alive blank line
                if isinstance(event, dict):
                    yield event


def demux_logs(raw: bytes) -> bytes:
    """The payloads of the engine's multiplexed log stream (8-byte frame headers),
    or ``raw`` itself when it is not framed (a container with a TTY)."""
    out: list[bytes] = []
    pos = 0
    while pos < len(raw):
        if len(raw) - pos < _FRAME.size:
            return raw
        kind, size = _FRAME.unpack_from(raw, pos)
        if kind > 2 or pos + _FRAME.size + size > len(raw):
            return raw
        out.append(raw[pos + _FRAME.size:pos + _FRAME.size + size])
        pos += _FRAME.size + size
    return b"".join(out)


def _api_error(status: _Status, payload: bytes) -> docker.errors.APIError:
    try:
        message = str(json.loads(payload).get("message") or "")
    except (ValueError, AttributeError):
        message = payload.decode("utf-8", errors="replace").strip()
    kind = docker.errors.NotFound if status.status_code == 404 else docker.errors.APIError
    return kind(message, response=status, explanation=message)
