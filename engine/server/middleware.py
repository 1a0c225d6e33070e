"""What every request passes through: a request id, the error body for every failure, the API
key, the JSON content type, CORS, and the headers every response gets."""
from __future__ import annotations

import asyncio
import hmac
import logging
import uuid
from typing import Awaitable, Callable

from aiohttp import web

from esp.engine.errors import EngineError
from esp.engine.server.errors import ApiError, internal
from esp.engine.server.options import HANDLERS, METRICS, OPTIONS, REQUEST_ID, ServerOptions

log = logging.getLogger("esp.server")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SERVER = "esp-serve"
CORS_METHODS = "GET, POST, OPTIONS"
CORS_HEADERS = "Authorization, Content-Type"
CORS_EXPOSED = "Retry-After, X-Request-Id"
JSON_CHARSETS = ("", "utf-8")


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves as OpenAI's error body; a 500 says only its request id (the cause
    goes to the log). Also tracks the running handlers, which `serve` cancels when cancelled."""
    rid = request[REQUEST_ID] = f"req-{uuid.uuid4().hex}"
    task = asyncio.current_task()
    request.app[HANDLERS].add(task)
    try:
        return await handler(request)
    except ApiError as err:
        error = err
    except EngineError as err:
        error = ApiError.of_engine(err)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        error = _of_http(request, exc)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("%s %s failed (request id %s)", request.method, request.path, rid)
        return _refuse(request, internal(rid))
    finally:
        request.app[HANDLERS].discard(task)
    if error.status == 500:
        log.error("%s %s failed (request id %s): %s", request.method, request.path, rid, error.message)
        error = internal(rid)
    return _refuse(request, error)


def _refuse(request: web.Request, error: ApiError) -> web.Response:
    request.app[METRICS].reject(error.reason)
    return error.response()


def _of_http(request: web.Request, exc: web.HTTPException) -> ApiError:
    messages = {413: f"the request body is larger than the limit of {request.app[OPTIONS].max_body_bytes} bytes"}
    message = messages.get(exc.status, f"{exc.reason}: {request.method} {request.path}")
    headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
    return ApiError(exc.status, message, headers=headers)


def bearer_auth(key: str) -> Callable:
    """`/v1/*` needs `Authorization: Bearer <key>`; `/health`, `/metrics` and `/openapi.json` stay open."""
    expected = key.encode()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/v1/"):
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            given = token.strip().encode("utf-8", "surrogateescape")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given, expected):
                raise ApiError(401, "Missing or incorrect API key: send the header `Authorization: Bearer <key>`.",
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    return check


@web.middleware
async def json_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A POST to a route must say its body is JSON (UTF-8)."""
    if request.method == "POST" and request.match_info.http_exception is None:
        if request.content_type != "application/json" or (request.charset or "").lower() not in JSON_CHARSETS:
            got = request.headers.get("Content-Type", "nothing")
            raise ApiError(415, f"Content-Type must be application/json, got {got}", code="unsupported_media_type")
    return await handler(request)


def cors_preflight(origins: tuple[str, ...]) -> Callable:
    """Answers browsers' preflight requests from the allowed origins."""

    @web.middleware
    async def preflight(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if request.method != "OPTIONS" or origin is None or "Access-Control-Request-Method" not in request.headers:
            return await handler(request)
        if not allowed(origins, origin):
            raise ApiError(403, f"origin {origin} is not allowed", code="origin_not_allowed")
        return web.Response(status=204, headers={"Access-Control-Allow-Methods": CORS_METHODS,
                                                 "Access-Control-Allow-Headers": CORS_HEADERS,
                                                 "Access-Control-Max-Age": "600"})

    return preflight


def allowed(origins: tuple[str, ...], origin: str | None) -> bool:
    return origin is not None and ("*" in origins or origin in origins)


async def response_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Before any response goes out: a minimal `Server`, the request id, CORS for allowed origins."""
    response.headers["Server"] = SERVER
    if REQUEST_ID in request:
        response.headers["X-Request-Id"] = request[REQUEST_ID]
    origins = request.app[OPTIONS].allowed_origins
    origin = request.headers.get("Origin")
    if allowed(origins, origin):
        response.headers["Access-Control-Allow-Origin"] = "*" if "*" in origins else origin
        response.headers["Access-Control-Expose-Headers"] = CORS_EXPOSED
        response.headers["Vary"] = "Origin"


def middlewares(options: ServerOptions) -> list:
    """Outermost first: errors, then CORS preflight (before auth: browsers send no key there),
    then the API key, then the content type."""
    return [errors, *([cors_preflight(options.allowed_origins)] if options.allowed_origins else []),
            *([bearer_auth(options.api_key)] if options.api_key else []), json_only]
