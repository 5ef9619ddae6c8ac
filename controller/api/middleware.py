"""The two middlewares every request passes: pfcon-shaped errors and client auth.

Errors: a pfleet ``ApiError`` becomes ``{"message": ...}`` with its status; aiohttp's
own HTTP errors become pfcon's answers (404 unknown route as an HTML page, 405 as
JSON); anything else is logged and answered 500 without a traceback.

Auth: every route except those marked public needs ``Authorization: Bearer <jwt>``;
unknown URLs answer 404 without asking for a token, as pfcon does.

OPTIONS: Flask answers it for every route by itself, after pfcon's auth check: 401
without a token on a protected route, otherwise 200 with the route's methods in
``Allow`` and no body.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from controller.api.jsonfmt import dumps_indented
from controller.auth import ClientTokenVerifier
from controller.config import Config
from controller.errors import ApiError

log = logging.getLogger("pfleet.controller.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

CONFIG = web.AppKey("pfleet.config", Config)
VERIFIER = web.AppKey("pfleet.verifier", ClientTokenVerifier)

NOT_FOUND_HTML = """<!doctype html>
<html lang=en>
<title>404 Not Found</title>
<h1>Not Found</h1>
<p>The requested URL was not found on the server. If you entered the URL manually please check your spelling and try again.</p>
"""  # noqa: E501 - the exact page pfcon's Werkzeug serves
METHOD_NOT_ALLOWED = "The method is not allowed for the requested URL."
GENERIC_NOT_FOUND = ("The requested URL was not found on the server. If you entered the URL "
                     "manually please check your spelling and try again.")


def public(handler: Handler) -> Handler:
    """Mark a handler as reachable without a token."""
    handler.pfleet_public = True  # type: ignore[attr-defined]
    return handler


def json_body(config: Config, data: Any) -> str:
    """pfcon's JSON rendering: indented in dev mode, compact otherwise; newline-ended."""
    if config.dev:
        return dumps_indented(data) + "\n"
    return json.dumps(data) + "\n"


def json_response(request: web.Request, data: Any, status: int = 200) -> web.Response:
    # Bytes, not text: aiohttp would add "; charset=utf-8"; pfcon sends exactly
    # "Content-Type: application/json".
    return web.Response(body=json_body(request.app[CONFIG], data).encode(), status=status,
                        content_type="application/json")


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return json_response(request, {"message": exc.message}, exc.status)
    except web.HTTPNotFound:
        return web.Response(text=NOT_FOUND_HTML, status=404, content_type="text/html")
    except web.HTTPMethodNotAllowed:
        return json_response(request, {"message": METHOD_NOT_ALLOWED}, 405)
    except web.HTTPRequestEntityTooLarge as exc:
        return json_response(request, {"message": exc.text or "request too large"}, 413)
    except web.HTTPException:
        raise  # redirects (308 for a missing trailing slash) and the like
    except Exception:
        log.exception("unhandled error method=%s path=%s", request.method, request.path)
        return json_response(request, {"message": "Internal Server Error"}, 500)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    match = request.match_info
    route_handler = getattr(match, "handler", None)
    if match.http_exception is not None or getattr(route_handler, "pfleet_public", False):
        return await handler(request)
    _check_token(request)
    return await handler(request)


def _check_token(request: web.Request) -> None:
    # An empty header is a missing one, as in pfcon (`if not bearer_token`).  Repeated
    # headers are joined as a WSGI server joins them for pfcon, which refuses the result
    # (a proxy may have checked another one than the first).
    header = ",".join(request.headers.getall("Authorization", ()))
    request.app[VERIFIER].check_header(header or None)


@web.middleware
async def options_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """OPTIONS on a known route, as Flask's automatic answer (after the token check of
    a protected route); on an unknown route it is a 404 like any other method."""
    if request.method != "OPTIONS":
        return await handler(request)
    refused = request.match_info.http_exception
    if isinstance(refused, web.HTTPNotFound) and not request.path.endswith("/"):
        # Werkzeug redirects OPTIONS too (aiohttp's normalize_path sees no route for it)
        slashed = request.clone(rel_url=request.rel_url.with_path(request.path + "/",
                                                                     keep_query=True))
        match = await request.app.router.resolve(slashed)
        if isinstance(match.http_exception, web.HTTPMethodNotAllowed):
            raise web.HTTPPermanentRedirect(slashed.rel_url)
    if not isinstance(refused, web.HTTPMethodNotAllowed):
        return await handler(request)
    methods = set(refused.allowed_methods) | {"OPTIONS"}
    if "GET" in methods:
        methods.add("HEAD")
    if not await _is_public(request, refused.allowed_methods):
        _check_token(request)
    return web.Response(status=200, headers={"Allow": ", ".join(sorted(methods))},
                        content_type="text/html")


async def _is_public(request: web.Request, methods: set[str]) -> bool:
    """Whether the route's handlers (one per method) are all public."""
    for method in methods:
        match = await request.app.router.resolve(request.clone(method=method))
        if not getattr(match.handler, "pfleet_public", False):
            return False
    return bool(methods)
