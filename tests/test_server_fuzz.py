"""Fuzzing the HTTP surface: bodies drawn from the server's own OpenAPI document, and hostile
mutations of them (wrong types, huge numbers, deep nesting, lone surrogates, broken bytes).
No answer may be a 5xx, every refusal carries OpenAI's error body, and the server is healthy
and serves normally afterwards. The server (a real engine, one CPU worker) runs in a thread
with its own event loop; hypothesis drives a blocking client."""
from __future__ import annotations

import asyncio
import http.client
import json
import math
import queue
import threading
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_helpers import wait_for_model

from esp.engine import EngineConfig
from esp.engine.engine import Engine
from esp.engine.server import ServerOptions, serve

ROUTES = {"/v1/completions": "CompletionRequest", "/v1/chat/completions": "ChatCompletionRequest"}
FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MAX_TEXT, MAX_ITEMS = 24, 4


class Server:
    """`serve()` over a fresh engine in a thread; `request()` is a blocking HTTP call."""

    def __init__(self) -> None:
        self._ready: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)
        self._thread.start()
        item = self._ready.get(timeout=300)
        if isinstance(item, BaseException):
            raise item
        self.url, self._loop, self._stop, self.engine = item
        self.host, self.port = urlsplit(self.url).hostname, urlsplit(self.url).port

    async def _main(self) -> None:
        try:
            async with Engine(EngineConfig(kv_tokens_per_instance=2048)) as engine:
                stop = asyncio.Event()
                loop = asyncio.get_running_loop()
                await serve(engine, ServerOptions(port=0, shutdown_timeout=5.0),
                            on_ready=lambda url: self._ready.put((url, loop, stop, engine)), stop=stop)
        except BaseException as err:
            self._ready.put(err)
            raise

    def request(self, method: str, path: str, body: bytes | None = None,
                content_type: str = "application/json") -> tuple[int, dict, bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers={"Content-Type": content_type} if body is not None else {})
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            conn.close()

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)


@pytest.fixture(scope="module")
def server():
    asyncio.run(wait_for_model())
    srv = Server()
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def doc(server) -> dict:
    status, _, raw = server.request("GET", "/openapi.json")
    assert status == 200
    return json.loads(raw)


# -- strategies from JSON Schema (the subset the document uses) --------------------------------
def from_schema(schema: dict, doc: dict) -> st.SearchStrategy:
    if "$ref" in schema:
        return from_schema(doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]], doc)
    if "anyOf" in schema:
        return st.one_of([from_schema(s, doc) for s in schema["anyOf"]])
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
    return st.one_of([KINDS[kind](schema, doc) for kind in kinds])


def _number(s: dict, doc: dict) -> st.SearchStrategy:
    lo = s.get("exclusiveMinimum", s.get("minimum"))
    return st.floats(lo, s.get("maximum"), exclude_min="exclusiveMinimum" in s, allow_nan=False,
                     allow_infinity=False)


def _object(s: dict, doc: dict) -> st.SearchStrategy:
    props = {k: from_schema(v, doc) for k, v in s.get("properties", {}).items()}
    required = set(s.get("required", ()))
    return st.fixed_dictionaries({k: v for k, v in props.items() if k in required},
                                 optional={k: v for k, v in props.items() if k not in required})


KINDS = {
    "null": lambda s, doc: st.none(),
    "boolean": lambda s, doc: st.booleans(),
    "integer": lambda s, doc: st.integers(s.get("minimum"), s.get("maximum")),
    "number": _number,
    "string": lambda s, doc: st.text(min_size=s.get("minLength", 0),
                                     max_size=min(s.get("maxLength", MAX_TEXT), MAX_TEXT)),
    "array": lambda s, doc: st.lists(from_schema(s["items"], doc), min_size=s.get("minItems", 0),
                                     max_size=min(s.get("maxItems", MAX_ITEMS), MAX_ITEMS)),
    "object": _object,
}


@st.composite
def valid_bodies(draw, doc: dict, model: str) -> tuple[str, dict]:
    """A route and a body its schema accepts, with at most 4 new tokens (and some known models)."""
    path = draw(st.sampled_from(sorted(ROUTES)))
    body = draw(from_schema({"$ref": f"#/components/schemas/{ROUTES[path]}"}, doc))
    body["max_tokens"] = draw(st.integers(1, 4))
    body.pop("max_completion_tokens", None)
    if draw(st.booleans()):
        body["model"] = model
    return path, body


HOSTILE_VALUES = [None, True, False, 0, -1, 1.5, -0.0, 2**64, -2**63 - 1, 1e308, 5e-324, "", "x", "\ud800",
                  "a\udfffb", "\x00", [], [1, "a"], {}, {"a": 1}, [[[[[]]]]], "9" * 2000]


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@st.composite
def hostile_bodies(draw, doc: dict, model: str) -> tuple[str, bytes]:
    """A valid body with one thing broken, as the raw bytes sent. A broken `max_tokens` comes
    with `max_completion_tokens: 2`, so a chat never falls back to the rest of the context."""
    path, body = draw(valid_bodies(doc, model))
    field = draw(st.sampled_from(sorted(body) + ["unknown", "prompt", "messages", "stop", "model"]))
    kind = draw(st.sampled_from(["value", "surrogate", "deep", "huge-int", "not-object", "bytes", "nan"]))
    if kind == "value" and field == "max_tokens":
        body.update(max_tokens=draw(st.sampled_from(HOSTILE_VALUES)), max_completion_tokens=2)
    elif kind == "value":
        body[field] = draw(st.sampled_from(HOSTILE_VALUES) | st.integers() | st.floats() | st.text(max_size=8))
    elif kind == "surrogate":
        body[field] = draw(st.sampled_from(["\ud800", ["\udc00"], [{"role": "user", "content": "\udbff"}],
                                            [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]]))
    raw = json.dumps(body)
    if kind == "deep":
        raw = raw[:-1] + f', "{field}": {_nested(draw(st.sampled_from([63, 64, 65, 3000])))}}}'
    elif kind == "huge-int":
        raw = raw[:-1] + f', "{field}": {"7" * draw(st.sampled_from([4300, 4301, 10_000]))}}}'
    elif kind == "not-object":
        raw = json.dumps(draw(st.sampled_from([[body], "body", 1, None, True])))
    elif kind == "nan":
        raw = raw[:-1] + f', "{field}": {draw(st.sampled_from(["NaN", "Infinity", "-Infinity"]))}}}'
    data = raw.encode()
    if kind == "bytes":
        cut = draw(st.integers(0, len(data)))
        data = data[:cut] + draw(st.binary(max_size=4)) + data[cut + 1:]
    return path, data


# -- checks ---------------------------------------------------------------------------------
def check_answer(status: int, headers: dict, raw: bytes, stream: bool) -> dict | None:
    """No 5xx; a refusal has OpenAI's error body; a stream ends with `[DONE]`. Returns the error."""
    assert status < 500, raw[:500]
    if status >= 400:
        error = json.loads(raw)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        return error
    if stream:
        assert raw.endswith(b"data: [DONE]\n\n"), raw[-300:]
    else:
        assert json.loads(raw)["choices"][0]["finish_reason"] in ("stop", "length")
    return None


def expected_refusal(path: str, body: dict, vocab: int, model: str) -> str | None:
    """What the schema cannot say: a model name this server does not serve, token ids past the
    vocabulary, `stream_options` without `stream`."""
    if body.get("model") not in (None, model):
        return "model"
    if body.get("stream_options") is not None and not body.get("stream"):
        return "stream_options"
    prompt = body.get("prompt")
    ids = prompt[0] if isinstance(prompt, list) and prompt and isinstance(prompt[0], list) else prompt
    if isinstance(ids, list) and ids and isinstance(ids[0], int) and max(ids) >= vocab:
        return "prompt"
    return None


def assert_healthy_and_serving(server) -> None:
    status, _, raw = server.request("GET", "/health")
    assert status == 200, raw
    status, _, raw = server.request("POST", "/v1/completions", json.dumps(
        {"prompt": "The module", "max_tokens": 2, "ignore_eos": True}).encode())
    assert status == 200 and json.loads(raw)["usage"]["completion_tokens"] == 2, raw
    status, _, raw = server.request("GET", "/metrics")
    free = [line for line in raw.decode().splitlines() if line.startswith("esp_kv_free_slots{")]
    assert free and all(float(line.rsplit(" ", 1)[1]) == 2048 for line in free), free
    assert "esp_num_requests_running 0.0" in raw.decode()


def test_bodies_drawn_from_the_openapi_schema_are_served(server, doc):
    model = server.engine.model_name
    vocab = server.engine.model_config.vocab_size

    @FUZZ
    @given(valid_bodies(doc, model))
    def check(case):
        path, body = case
        status, headers, raw = server.request("POST", path, json.dumps(body).encode())
        error = check_answer(status, headers, raw, bool(body.get("stream")) and status == 200)
        refusal = expected_refusal(path, body, vocab, model)
        assert (error and error["param"]) == refusal, (body, raw[:300])

    check()
    assert_healthy_and_serving(server)


def test_hostile_bodies_never_get_a_5xx(server, doc):
    model = server.engine.model_name

    @FUZZ
    @given(hostile_bodies(doc, model))
    def check(case):
        path, data = case
        status, headers, raw = server.request("POST", path, data)
        check_answer(status, headers, raw, headers.get("Content-Type", "").startswith("text/event-stream"))

    check()
    assert_healthy_and_serving(server)


@pytest.mark.parametrize("value", [5e-324, 1e23, math.ulp(0.0) * 3, 100.0001, 1e-3 * (1 - 1e-12)])
def test_temperatures_just_outside_the_schema_bounds_are_400(server, value):
    status, _, raw = server.request("POST", "/v1/completions",
                                    json.dumps({"prompt": "hi", "max_tokens": 1, "temperature": value}).encode())
    assert status == 400 and json.loads(raw)["error"]["param"] == "temperature", raw
