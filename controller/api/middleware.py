"""The two middlewares every request passes: pfcon-shaped errors and client auth.

Errors: a pfleet ``ApiError`` becomes ``{"message": ...}`` with its status; aiohttp's
own HTTP errors become pfcon's answers (404 unknown route as an HTML page, 405 as
JSON); anything else is logged and answered 500 without a traceback.

Auth: every route except those marked public needs ``Authorization: Bearer <jwt>``;
unknown URLs answer 404 without asking for a token, as pfcon does.
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
    # An empty header is a missing one, as in pfcon (`if not bearer_token`).  Repeated
    # headers are joined as a WSGI server joins them for pfcon, which refuses the result
    # (a proxy may have checked another one than the first).
    header = ",".join(request.headers.getall("Authorization", ()))
    request.app[VERIFIER].check_header(header or None)
    return await handler(request)
