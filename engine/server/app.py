"""The handlers, `create_app` and `serve`.

A request's generator is always closed when its handler ends, so a client that goes away
(handler cancelled, or a write failing) aborts its request and frees its KV slots.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import time
import uuid
from typing import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from esp.engine.errors import EngineStartError, EngineUnavailable, InvalidRequest
from esp.engine.generation_defaults import defaults_of
from esp.engine.outputs import RequestOutput
from esp.engine.server import middleware
from esp.engine.server.errors import ApiError, internal, retry_after
from esp.engine.server.metrics import Metrics
from esp.engine.server.openapi import document
from esp.engine.server.options import (CREATED, DRAINING, ENGINE, HANDLERS, METRICS, OPTIONS, REQUEST_ID,
                                       ServerOptions)
from esp.engine.server.parsing import chat_prompt, decode_json, parse_job
from esp.engine.server.shapes import DONE, SSE_HEADERS, Shape, dumps, sse

log = logging.getLogger("esp.server")


def _serving(app: web.Application):
    """The engine, if it takes requests now; else a 503 (starting, or this server is stopping)."""
    engine = app[ENGINE]
    if app[DRAINING].is_set():
        raise EngineUnavailable("the server is shutting down")
    if not engine.started:
        health = engine.health()
        raise EngineUnavailable(f"the engine is {health.status}: {health.detail}", health.retry_after)
    return engine


def _served_models(engine) -> set[str]:
    model = getattr(engine.config, "model", None)
    return {engine.model_name, *([str(model)] if model else [])}


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=True)


async def _generate(request: web.Request, chat: bool) -> web.StreamResponse:
    engine = _serving(request.app)
    job = parse_job(decode_json(await request.read()), chat, _served_models(engine), defaults_of(engine.tokenizer))
    try:
        encoded = await engine.encode(await chat_prompt(engine.tokenizer, job.messages) if chat else job.prompt)
        params = job.with_max_tokens(len(encoded), engine.max_model_len)
    except InvalidRequest as err:
        raise ApiError.of_engine(err, job.param(err.param)) from None
    shape = Shape(chat, job.include_usage, f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                  engine.model_name, int(time.time()))
    outputs = engine.generate(encoded, params, request_id=shape.id, slo=job.slo)
    try:
        try:
            out = await outputs.__anext__()
        except InvalidRequest as err:
            raise ApiError.of_engine(err, job.param(err.param)) from None
        if job.stream and out.finish_reason != "error":
            return await _stream(request, shape, out, outputs)
        return await _full(request, shape, out, outputs)
    finally:
        await outputs.aclose()


async def _full(request: web.Request, shape: Shape, out: RequestOutput, outputs) -> web.Response:
    try:
        while not out.finished:
            out = await outputs.__anext__()
    finally:
        request.app[METRICS].finished(out)
    if out.finish_reason == "error":
        raise ApiError(500, f"the engine failed request {shape.id}: {out.error}")
    return web.json_response(shape.full(out), dumps=dumps)


async def _stream(request: web.Request, shape: Shape, out: RequestOutput, outputs) -> web.StreamResponse:
    """SSE chunks from `out` on. Empty deltas are not sent (the first chunk carries the first
    token's text), except the last, which carries the finish reason."""
    rid = request[REQUEST_ID]
    resp = web.StreamResponse(headers=SSE_HEADERS)
    await resp.prepare(request)
    first = True
    try:
        while True:
            failed = out.finish_reason == "error"
            if out.new_text or (out.finished and not failed):
                await resp.write(sse(shape.chunk(out.new_text, None if failed else out.finish_reason, first)))
                first = False
            if failed:
                log.error("request %s failed (request id %s): %s", shape.id, rid, out.error)
                await resp.write(sse(internal(rid).body()))
                break
            if out.finished:
                if shape.include_usage:
                    await resp.write(sse(shape.usage_chunk(out)))
                break
            out = await outputs.__anext__()
        await resp.write(DONE)
        await resp.write_eof()
    except ConnectionResetError:
        log.info("client of %s went away; aborting it", shape.id)
    except Exception:
        log.exception("stream %s failed (request id %s)", shape.id, rid)
        with contextlib.suppress(ConnectionResetError):
            await resp.write(sse(internal(rid).body()) + DONE)
            await resp.write_eof()
    finally:
        request.app[METRICS].finished(out)
    return resp


async def models(request: web.Request) -> web.Response:
    engine = _serving(request.app)
    card = {"id": engine.model_name, "object": "model", "created": request.app[CREATED], "owned_by": "esp-serve",
            "root": engine.model_name, "parent": None, "max_model_len": engine.max_model_len}
    return web.json_response({"object": "list", "data": [card]}, dumps=dumps)


async def health(request: web.Request) -> web.Response:
    h = request.app[ENGINE].health()
    if h.ok:
        return web.json_response({"status": "ok"})
    return web.json_response({"status": h.status, "error": h.detail or h.status}, status=503,
                             headers=retry_after(h.retry_after))


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].render(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(document(request.app[OPTIONS]), dumps=dumps)


ROUTES: tuple[tuple[str, str, Callable], ...] = (
    ("POST", "/v1/completions", completions),
    ("POST", "/v1/chat/completions", chat_completions),
    ("GET", "/v1/models", models),
    ("GET", "/health", health),
    ("GET", "/metrics", metrics),
    ("GET", "/openapi.json", openapi),
)


def create_app(engine, options: ServerOptions | None = None) -> web.Application:
    """The aiohttp application over `engine` (which may still be starting: `/v1/*` is 503 until
    it has started)."""
    options = options or ServerOptions()
    app = web.Application(middlewares=middleware.middlewares(options), client_max_size=options.max_body_bytes)
    app[ENGINE] = engine
    app[OPTIONS] = options
    app[METRICS] = Metrics(engine)
    app[DRAINING] = asyncio.Event()
    app[HANDLERS] = set()
    app[CREATED] = int(time.time())
    for method, path, handler in ROUTES:
        app.router.add_route(method, path, handler)
    app.on_response_prepare.append(middleware.response_headers)
    return app


async def serve(engine, options: ServerOptions | None = None, on_ready: Callable[[str], None] | None = None,
                stop: asyncio.Event | None = None) -> None:
    """Listen first (a port in use raises `EngineStartError` before any model loads), start the
    engine unless the caller did (and then stop it at the end), call `on_ready(url)`, and serve
    until `stop` is set or the task is cancelled. On `stop`, new requests get 503 while running
    ones get `options.shutdown_timeout` seconds to finish; the rest end with finish_reason
    "abort", and every stream still ends with its final chunk and `[DONE]`. Cancelling skips
    that grace. Installs no signal handlers."""
    options = options or ServerOptions()
    app = create_app(engine, options)
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=options.shutdown_timeout)
    await runner.setup()
    owned = False
    try:
        url = await _listen(runner, options)
        if not engine.started:
            owned = True
            await engine.start()
        if on_ready is not None:
            on_ready(url)
        try:
            await (stop or asyncio.Event()).wait()
        except asyncio.CancelledError:
            app[DRAINING].set()
            await _cancel(app[HANDLERS])
            raise
        app[DRAINING].set()
        aborted = await engine.drain(options.shutdown_timeout)
        log.info("drained; %d request(s) aborted", aborted)
    finally:
        await runner.cleanup()
        if owned:
            await engine.stop()


async def _cancel(tasks: set[asyncio.Task]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


_LISTEN_ERRORS = {
    errno.EADDRINUSE: "address already in use; choose another --port",
    errno.EADDRNOTAVAIL: "no such address on this machine; choose another --host",
    errno.EACCES: "permission denied; choose a port above 1023",
}


async def _listen(runner: web.AppRunner, options: ServerOptions) -> str:
    """Bind the socket; returns the URL with the port actually bound (port 0 picks a free one)."""
    try:
        await web.TCPSite(runner, options.host, options.port).start()
    except OSError as err:
        why = _LISTEN_ERRORS.get(err.errno, err.strerror or str(err))
        raise EngineStartError(f"cannot listen on {options.host}:{options.port}: {why}") from None
    bound = runner.addresses[0][1] if runner.addresses else options.port
    host = f"[{options.host}]" if ":" in options.host else options.host
    return f"http://{host}:{bound}"
