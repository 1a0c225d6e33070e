"""The OpenAI-compatible HTTP surface (DESIGN 9): aiohttp handlers over `Engine.generate`.

Routes: `POST /v1/completions`, `POST /v1/chat/completions` (JSON or SSE streaming),
`GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text). Every error is
OpenAI's body `{"error": {"message", "type", "param", "code"}}`. A request's generator
is always closed when its handler ends, so a client that goes away (handler cancelled or
a write failing) aborts the request and frees its KV slots.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from esp.engine.outputs import RequestOutput
from esp.engine.sampling_params import SamplingParams

log = logging.getLogger("esp.server")

MAX_BODY_BYTES = 256 << 20
COMPLETION_DEFAULT_MAX_TOKENS = 16
_PARAM_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "ignore_eos", "stop")
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class ApiError(Exception):
    """An HTTP error with OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status, headers=self.headers, dumps=_dumps)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


# -- request parsing --------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    """One parsed request. `prompt` is text or token ids; `max_tokens is None` means the
    endpoint's default (16 for completions, the rest of the context for chat)."""

    chat: bool
    prompt: str | list[int]
    prompt_param: str
    params: SamplingParams
    max_tokens: int | None
    max_tokens_param: str
    stream: bool
    include_usage: bool


_KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "number": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "bool": (lambda v: isinstance(v, bool), "a boolean"),
    "object": (lambda v: isinstance(v, dict), "an object"),
}


def _field(body: dict, name: str, kind: str, default: Any = None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    ok, what = _KINDS[kind]
    if not ok(value):
        raise ApiError(400, f"{name} must be {what}, got {json.dumps(value)[:80]}", name)
    return value


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return tuple(stop)
    raise ApiError(400, "stop must be a string or a list of strings", "stop")


def _completion_prompt(body: dict) -> str | list[int]:
    """`prompt`: a string, a list of token ids, or a one-element list of either."""
    if "prompt" not in body or body["prompt"] is None:
        raise ApiError(400, "prompt is required", "prompt")
    prompt = body["prompt"]
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) > 1:
            raise ApiError(400, "only one prompt per request is supported", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    raise ApiError(400, "prompt must be a string or a list of token ids", "prompt")


def _messages(body: dict) -> list[dict]:
    """`messages` with list-of-text-parts contents flattened to strings."""
    messages = body.get("messages")
    if messages is None:
        raise ApiError(400, "messages is required", "messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ApiError(400, "messages must be a non-empty list of message objects", "messages")
    flat = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, "only text content parts are supported", "messages")
            m = {**m, "content": "".join(p["text"] for p in content)}
        if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), (str, type(None))):
            raise ApiError(400, "each message needs a string role and a string content", "messages")
        flat.append(m)
    return flat


def _unsupported(body: dict, chat: bool) -> None:
    n = _field(body, "n", "int", 1)
    if n != 1:
        raise ApiError(400, "only n=1 is supported", "n")
    if _field(body, "best_of", "int", 1) != 1:
        raise ApiError(400, "only best_of=1 is supported", "best_of")
    if not chat and _field(body, "echo", "bool", False):
        raise ApiError(400, "echo is not supported", "echo")
    if body.get("logprobs") is not None and body.get("logprobs") is not False:
        raise ApiError(400, "logprobs are not supported", "logprobs")


def parse_job(body: Any, chat: bool, engine) -> Job:
    """Validate a request body; raises `ApiError` (400/404) naming the offending field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, "model must be a string", "model")
    if model is not None and model not in _served_names(engine):
        raise ApiError(404, f"The model `{model}` does not exist.", "model", "model_not_found")
    _unsupported(body, chat)
    stream = _field(body, "stream", "bool", False)
    options = _field(body, "stream_options", "object")
    if options is not None and not stream:
        raise ApiError(400, "stream_options is only allowed when stream is true", "stream_options")
    include_usage = _field(options, "include_usage", "bool", False) if options else False
    max_param = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _field(body, max_param, "int")
    kwargs = dict(
        temperature=_field(body, "temperature", "number", 1.0),
        top_p=_field(body, "top_p", "number", 1.0),
        top_k=_field(body, "top_k", "int", 0),
        seed=_field(body, "seed", "int"),
        ignore_eos=_field(body, "ignore_eos", "bool", False),
        stop=_stop(body))
    try:
        params = SamplingParams(max_tokens=max_tokens if max_tokens is not None else 1, **kwargs)
    except ValueError as err:
        raise ApiError(400, str(err).replace("max_tokens", max_param),
                       _param_of(str(err), max_param)) from None
    if chat:
        try:
            prompt: str | list[int] = engine.tokenizer.apply_chat_template(_messages(body))
        except ValueError as err:
            raise ApiError(400, str(err), "messages") from None
        prompt_param = "messages"
    else:
        prompt, prompt_param = _completion_prompt(body), "prompt"
    return Job(chat, prompt, prompt_param, params, max_tokens, max_param, stream, include_usage)


def _param_of(message: str, max_param: str) -> str | None:
    for name in _PARAM_FIELDS:
        if name in message:
            return max_param if name == "max_tokens" else name
    return None


def _served_names(engine) -> set[str]:
    names = {engine.model_name}
    config = getattr(engine, "config", None)
    if config is not None and getattr(config, "model", None):
        names.add(str(config.model))
    return names


# -- response shapes --------------------------------------------------------------------
def _usage(out: RequestOutput) -> dict:
    return {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
            "total_tokens": out.prompt_tokens + out.completion_tokens, "esp": out.esp}


@dataclass
class _Shape:
    """Builds the OpenAI objects of one request."""

    job: Job
    id: str
    model: str
    created: int
    sent_role: bool = False

    def chunk(self, text: str, finish_reason: str | None) -> dict:
        if self.job.chat:
            delta = {"content": text}
            if not self.sent_role:
                delta = {"role": "assistant", **delta}
                self.sent_role = True
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        obj = self._head("chat.completion.chunk" if self.job.chat else "text_completion")
        obj["choices"] = [choice]
        if self.job.include_usage:
            obj["usage"] = None
        return obj

    def usage_chunk(self, out: RequestOutput) -> dict:
        obj = self._head("chat.completion.chunk" if self.job.chat else "text_completion")
        obj.update(choices=[], usage=_usage(out))
        return obj

    def full(self, out: RequestOutput) -> dict:
        if self.job.chat:
            obj = self._head("chat.completion")
            choice = {"index": 0, "message": {"role": "assistant", "content": out.text}, "logprobs": None,
                      "finish_reason": out.finish_reason}
        else:
            obj = self._head("text_completion")
            choice = {"index": 0, "text": out.text, "logprobs": None, "finish_reason": out.finish_reason}
        obj.update(choices=[choice], usage=_usage(out))
        return obj

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}


def _sse(obj: Any) -> bytes:
    return f"data: {obj if isinstance(obj, str) else _dumps(obj)}\n\n".encode()


def _engine_error(message: str | None) -> dict:
    return ApiError(500, message or "the engine failed this request").body()


# -- metrics ----------------------------------------------------------------------------
class Metrics:
    """Prometheus series of one app, in its own registry (several apps may share a process)."""

    def __init__(self, engine) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("esp_requests", "Finished HTTP requests by finish reason",
                                ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("esp_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("esp_generation_tokens", "Generated tokens of finished requests",
                                         registry=r)
        running = Gauge("esp_requests_running", "Requests holding KV in the engine", registry=r)
        waiting = Gauge("esp_requests_waiting", "Requests queued for prefill", registry=r)
        running.set_function(lambda: _count(engine, running=True))
        waiting.set_function(lambda: _count(engine, running=False))
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
        self.ttft = Histogram("esp_time_to_first_token_seconds", "Time to first token", registry=r,
                              buckets=buckets)
        self.tpot = Histogram("esp_time_per_output_token_seconds", "Time per output token after the first",
                              registry=r, buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1,
                                                   0.15, 0.2, 0.3, 0.5, 1, 2.5))
        self.e2e = Histogram("esp_e2e_request_latency_seconds", "Request latency, arrival to finish",
                             registry=r, buckets=buckets)

    def finished(self, out: RequestOutput | None) -> None:
        """Record a request's end; `None` means its client went away (an abort)."""
        if out is None or not out.finished:
            self.requests.labels("abort").inc()
            return
        self.requests.labels(out.finish_reason).inc()
        self.prompt_tokens.inc(out.prompt_tokens)
        self.generation_tokens.inc(out.completion_tokens)
        t = out.timing
        if t is not None:
            for hist, value in ((self.ttft, t.ttft_s), (self.tpot, t.tpot_s), (self.e2e, t.e2e_s)):
                if value is not None:
                    hist.observe(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _count(engine, running: bool) -> int:
    sched = getattr(engine, "scheduler", None)
    if sched is None:
        return 0
    waiting = len(sched.waiting)
    return len(sched.requests) - waiting if running else waiting


# -- handlers ---------------------------------------------------------------------------
ENGINE = web.AppKey("engine", object)
METRICS = web.AppKey("metrics", Metrics)
STARTED = web.AppKey("started", int)


async def _read_body(request: web.Request) -> Any:
    raw = await request.read()
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ApiError(400, f"the request body is not valid JSON: {err}") from None


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=True)


async def _generate(request: web.Request, chat: bool) -> web.StreamResponse:
    engine = request.app[ENGINE]
    job = parse_job(await _read_body(request), chat, engine)
    try:
        ids = await engine.encode(job.prompt)
    except ValueError as err:
        raise ApiError(400, str(err), job.prompt_param) from None
    params = job.params
    if job.max_tokens is None:
        default = COMPLETION_DEFAULT_MAX_TOKENS if not chat else max(1, engine.max_model_len - len(ids))
        params = dataclasses.replace(params, max_tokens=default)
    shape = _Shape(job, f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", engine.model_name,
                   int(time.time()))
    outputs = engine.generate(ids, params, request_id=shape.id)
    final: RequestOutput | None = None
    rejected = False
    try:
        try:
            out = await outputs.__anext__()
        except ValueError as err:
            rejected = True
            raise ApiError(400, str(err), job.prompt_param) from None
        except RuntimeError as err:
            rejected = True
            raise ApiError(503, str(err), headers={"Retry-After": "1"}) from None
        if out.finished:
            final = out
        if out.finish_reason == "error":
            raise ApiError(500, out.error or "the engine failed this request")
        if not job.stream:
            while not out.finished:
                out = await outputs.__anext__()
            final = out
            if out.finish_reason == "error":
                raise ApiError(500, out.error or "the engine failed this request")
            return web.json_response(shape.full(out), dumps=_dumps)
        resp = web.StreamResponse(headers=_SSE_HEADERS)
        await resp.prepare(request)
        try:
            final = await _stream(resp, shape, out, outputs)
        except ConnectionResetError:
            log.info("client of %s went away; aborting it", shape.id)
        return resp
    finally:
        await outputs.aclose()
        if not rejected:
            request.app[METRICS].finished(final)


async def _stream(resp: web.StreamResponse, shape: _Shape, out: RequestOutput, outputs) -> RequestOutput:
    """Write SSE chunks from `out` on; returns the final output. Empty non-final deltas are
    skipped, so the first chunk carries the first token's text."""
    try:
        while True:
            if out.finish_reason == "error":
                if out.new_text:
                    await resp.write(_sse(shape.chunk(out.new_text, None)))
                await resp.write(_sse(_engine_error(out.error)))
                break
            if out.new_text or out.finished:
                await resp.write(_sse(shape.chunk(out.new_text, out.finish_reason)))
            if out.finished:
                if shape.job.include_usage:
                    await resp.write(_sse(shape.usage_chunk(out)))
                break
            out = await outputs.__anext__()
    except ConnectionResetError:
        raise
    except Exception as err:
        log.exception("stream %s failed", shape.id)
        await resp.write(_sse(_engine_error(f"internal error: {err}")))
    await resp.write(_sse("[DONE]"))
    await resp.write_eof()
    return out


async def models(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    card = {"id": engine.model_name, "object": "model", "created": request.app[STARTED], "owned_by": "esp-serve",
            "root": engine.model_name, "parent": None, "max_model_len": engine.max_model_len}
    return web.json_response({"object": "list", "data": [card]}, dumps=_dumps)


async def health(request: web.Request) -> web.Response:
    backend = getattr(request.app[ENGINE], "backend", None)
    dead = "engine not started" if backend is None else backend.dead
    if dead:
        return web.json_response({"status": "error", "error": dead}, status=503)
    return web.json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


@web.middleware
async def _errors(request: web.Request, handler) -> web.StreamResponse:
    """Every failure leaves as OpenAI's error body."""
    try:
        return await handler(request)
    except ApiError as err:
        return err.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = f"{exc.reason}: {request.method} {request.path}"
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return ApiError(exc.status, message, headers=headers).response()
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as err:
        log.exception("%s %s failed", request.method, request.path)
        return ApiError(500, f"internal error: {err}").response()


def create_app(engine) -> web.Application:
    """The aiohttp application serving a started `Engine`."""
    app = web.Application(middlewares=[_errors], client_max_size=MAX_BODY_BYTES)
    app[ENGINE] = engine
    app[METRICS] = Metrics(engine)
    app[STARTED] = int(time.time())
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    return app


async def serve(engine, host: str = "127.0.0.1", port: int = 8000,
                on_ready: Callable[[str], None] | None = None, shutdown_timeout: float = 5.0) -> None:
    """Serve until cancelled. `port=0` picks a free port; `on_ready(url)` is called once
    listening, with the bound port. Handlers are cancelled when their client disconnects."""
    runner = web.AppRunner(create_app(engine), handler_cancellation=True, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0][1] if runner.addresses else port
        shown = f"[{host}]" if ":" in host else host
        if on_ready is not None:
            on_ready(f"http://{shown}:{bound}")
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
