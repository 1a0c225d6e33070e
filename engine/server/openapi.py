"""The OpenAPI 3.1 document served at `GET /openapi.json`: every route, the request bodies (from
the same field tables the parser enforces, see `fields`), the response objects and the errors."""
from __future__ import annotations

from esp.engine.server.fields import CHAT, COMPLETION
from esp.engine.server.options import ServerOptions

ERROR_TEXT = {
    400: "invalid request: `param` names the field", 401: "missing or incorrect API key",
    404: "unknown model (`code: model_not_found`) or route", 413: "the body is over the size limit",
    415: "the body is not declared as application/json", 500: "internal error; the message gives a request id",
    503: "the engine cannot take the request now (starting, overloaded, recovering, draining or down); "
         "`Retry-After` says when trying again may help",
}
GENERATE_ERRORS = (400, 404, 413, 415, 500, 503)

USAGE = {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"], "properties": {
    "prompt_tokens": {"type": "integer"}, "completion_tokens": {"type": "integer"},
    "total_tokens": {"type": "integer"},
    "esp": {"type": "object", "description": "how ESP ran the request: prefill_group, keep_plan, decode_groups, "
                                             "masters, scale_events, preemptions, recomputed"}}}
FINISH = {"enum": ["stop", "length", "abort", None]}


def _object(kind: str, choice: dict) -> dict:
    return {"type": "object", "required": ["id", "object", "created", "model", "choices"], "properties": {
        "id": {"type": "string"}, "object": {"const": kind}, "created": {"type": "integer"},
        "model": {"type": "string"}, "choices": {"type": "array", "items": {
            "type": "object", "required": ["index", "finish_reason"],
            "properties": {"index": {"const": 0}, "logprobs": {"type": "null"}, "finish_reason": FINISH, **choice}}},
        "usage": {"anyOf": [{"$ref": "#/components/schemas/Usage"}, {"type": "null"}]}}}


SCHEMAS = {
    "CompletionRequest": COMPLETION.schema(),
    "ChatCompletionRequest": CHAT.schema(),
    "Usage": USAGE,
    "Completion": _object("text_completion", {"text": {"type": "string"}}),
    "ChatCompletion": _object("chat.completion", {"message": {
        "type": "object", "properties": {"role": {"const": "assistant"}, "content": {"type": "string"}}}}),
    "ChatCompletionChunk": _object("chat.completion.chunk", {"delta": {
        "type": "object", "properties": {"role": {"const": "assistant"}, "content": {"type": "string"}}}}),
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"], "properties": {
            "message": {"type": "string"}, "type": {"type": "string"},
            "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}},
    "ModelList": {"type": "object", "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": {
        "type": "object", "required": ["id", "object", "max_model_len"], "properties": {
            "id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"},
            "owned_by": {"type": "string"}, "max_model_len": {"type": "integer"}}}}}},
    "Health": {"type": "object", "required": ["status"], "properties": {
        "status": {"enum": ["ok", "starting", "recovering", "draining", "down"]}, "error": {"type": "string"}}},
}

SSE = ("server-sent events with `stream: true`: `data: <chunk JSON>` per event, then `data: [DONE]`; with "
       "`stream_options.include_usage` a last chunk has `choices: []` and the usage")


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(name: str, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": _ref(name)}}}


def _errors(statuses: tuple[int, ...]) -> dict:
    return {str(s): _json("Error", ERROR_TEXT[s]) for s in statuses}


def _generate(summary: str, request: str, full: str, chunk: str) -> dict:
    return {"summary": summary, "requestBody": {"required": True, "content": {"application/json": {
        "schema": _ref(request)}}}, "responses": {
        "200": {"description": f"the {full} object, or {SSE}", "content": {
            "application/json": {"schema": _ref(full)}, "text/event-stream": {"schema": {
                "type": "string", "description": f"`data: ` lines, each a {chunk}, then `data: [DONE]`"}}}},
        **_errors(GENERATE_ERRORS)}}


OPERATIONS: dict[tuple[str, str], dict] = {
    ("POST", "/v1/completions"): _generate("Complete a prompt", "CompletionRequest", "Completion", "Completion"),
    ("POST", "/v1/chat/completions"): _generate("Reply to a conversation", "ChatCompletionRequest",
                                                "ChatCompletion", "ChatCompletionChunk"),
    ("GET", "/v1/models"): {"summary": "The served model", "responses": {
        "200": _json("ModelList", "one model"), **_errors((503,))}},
    ("GET", "/health"): {"summary": "Whether the engine takes requests", "responses": {
        "200": _json("Health", "ok"), "503": _json("Health", "not ok: `status` says why, `error` gives "
                                                              "details; `Retry-After` when waiting may help")}},
    ("GET", "/metrics"): {"summary": "Prometheus metrics", "responses": {"200": {
        "description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}}},
    ("GET", "/openapi.json"): {"summary": "This document", "responses": {"200": {
        "description": "OpenAPI 3.1", "content": {"application/json": {"schema": {"type": "object"}}}}}},
}


def document(options: ServerOptions) -> dict:
    """The document for a server set up with `options` (the API key adds a bearer scheme to `/v1/*`)."""
    paths: dict[str, dict] = {}
    for (method, path), op in OPERATIONS.items():
        if options.api_key and path.startswith("/v1/"):
            op = {**op, "security": [{"bearer": []}], "responses": {**op["responses"], **_errors((401,))}}
        paths.setdefault(path, {})[method.lower()] = op
    components: dict = {"schemas": SCHEMAS}
    if options.api_key:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return {"openapi": "3.1.0", "info": {"title": "esp-serve", "version": "1",
                                         "description": "An OpenAI-compatible API over an ESP engine"},
            "paths": paths, "components": components}
