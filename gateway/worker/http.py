"""The pool worker's aiohttp helpers: JSON responses, OpenAI-shaped errors, the error middleware.
(The gateway serves with its own server, gateway/api/h1.py, which has the same two response helpers.)"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from gateway.core.errors import APIError, BadRequest, InternalError, NotFound, PayloadTooLarge

log = logging.getLogger("meshgate")

_HTTP_ERRORS: dict[int, type[APIError]] = {404: NotFound, 413: PayloadTooLarge}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json", headers=headers)


def error_response(e: APIError) -> web.Response:
    headers = {}
    retry = getattr(e, "retry_after_s", None)
    if retry is not None:
        headers["Retry-After"] = str(max(1, round(retry)))
    return json_response(e.body(), e.status, headers)


def error_middleware(on_response: Callable[[web.Request, int], None] | None = None) -> Any:
    """Every failure becomes OpenAI's error JSON with its status; never a traceback.
    on_response(request, status) is called for every answer (metrics)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            resp = await handler(request)
        except APIError as e:
            resp = error_response(e)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            err = _HTTP_ERRORS.get(e.status, BadRequest)(f"{e.reason}: {request.method} {request.path}")
            err.status = e.status
            resp = error_response(err)
        except asyncio.CancelledError:
            raise
        except ConnectionError:
            # The client went away while we answered: routine, not an error. The answer below goes
            # nowhere (aiohttp drops a write to a closed connection quietly); its status counts it.
            log.debug("%s %s: the client went away", request.method, request.path)
            resp = web.Response(status=499)
        except Exception:
            log.exception("unhandled error on %s %s", request.method, request.path)
            resp = error_response(InternalError("internal error; the request was not completed"))
        if on_response is not None:
            on_response(request, resp.status)
        return resp

    return middleware


async def read_json(request: web.Request) -> Any:
    raw = await request.read()  # raises 413 past the app's client_max_size
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("We could not parse the JSON body of your request. Send valid JSON.") from None
