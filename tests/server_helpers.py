"""Shared by the tests/test_server*.py modules: a real `serve()` on 127.0.0.1 (port 0) and small
HTTP helpers."""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import AsyncIterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from esp.engine.config import bundled_model_dir
from esp.engine.server import ServerOptions, serve

PROMPT = "The module provides"


async def wait_for_model(timeout_s: float = 600.0) -> None:
    weights = bundled_model_dir() / "model.safetensors"
    deadline = time.monotonic() + timeout_s
    while not weights.exists():
        if time.monotonic() > deadline:
            pytest.skip(f"{weights} does not exist")
        await asyncio.sleep(2)


@contextlib.asynccontextmanager
async def serving(engine, options: ServerOptions | None = None) -> AsyncIterator[str]:
    """The URL of `serve(engine, options)` (port 0 unless `options` say otherwise); stopped
    through its `stop` event on exit."""
    stop = asyncio.Event()
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(engine, options or ServerOptions(port=0), on_ready=ready.set_result,
                                     stop=stop))
    done, _ = await asyncio.wait([ready, task], timeout=120, return_when=asyncio.FIRST_COMPLETED)
    assert ready in done, task.exception() if task.done() else "serve() did not get ready"
    try:
        yield ready.result()
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


async def post(http, url, path, body, **kwargs):
    async with http.post(url + path, json=body, **kwargs) as resp:
        return resp.status, await resp.json()


async def post_raw(http, url, path, data: bytes, content_type: str = "application/json", **headers):
    """Status, headers and JSON body of a POST of raw bytes."""
    async with http.post(url + path, data=data, headers={"Content-Type": content_type, **headers}) as resp:
        return resp.status, resp.headers, await resp.json(content_type=None)


async def sse(http, url, path, body) -> list:
    """The `data:` payloads of a stream, decoded, with `[DONE]` kept as the string."""
    async with http.post(url + path, json=body) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        raw = await resp.text()
    return parse_sse(raw)


def parse_sse(raw: str) -> list:
    events = [e for e in raw.split("\n\n") if e]
    assert raw.endswith("\n\n") and all(e.startswith("data: ") for e in events), raw
    return [e[6:] if e[6:] == "[DONE]" else json.loads(e[6:]) for e in events]


def assert_error_body(body: dict, status: int) -> dict:
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
    return error


def all_free(engine) -> bool:
    s = engine.stats()
    return s.kv_free == s.kv_capacity and s.running == 0 and s.waiting == 0


async def wait_all_free(engine, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not all_free(engine):
        assert time.monotonic() < deadline, engine.stats()
        await asyncio.sleep(0.05)


async def still_serves(http, url, engine) -> None:
    status, full = await post(http, url, "/v1/completions", {"prompt": "A", "max_tokens": 1, "ignore_eos": True})
    assert status == 200 and full["usage"]["completion_tokens"] == 1, full
    await wait_all_free(engine)


async def scrape(http, url) -> dict:
    """`{(sample name, sorted labels): value}` of `/metrics`."""
    async with http.get(url + "/metrics") as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}
