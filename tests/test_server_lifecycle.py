"""`serve()`'s lifecycle with a real engine: it listens before the model loads, answers 503
while starting and while draining, ends open streams with `abort` + `[DONE]` on stop, and
leaves a caller's engine running when it is cancelled."""
from __future__ import annotations

import asyncio
import json
import socket

import aiohttp
import pytest
from server_helpers import PROMPT, assert_error_body, parse_sse, serving, still_serves, wait_all_free, wait_for_model

from esp.engine import EngineConfig
from esp.engine.engine import Engine
from esp.engine.errors import EngineStartError
from esp.engine.server import ServerOptions, serve

LONG = {"prompt": PROMPT, "max_tokens": 3000, "ignore_eos": True, "temperature": 0, "stream": True}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_port_in_use_fails_before_the_engine_starts():
    engine = Engine(EngineConfig(kv_tokens_per_instance=1024))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(EngineStartError) as info:
            await serve(engine, ServerOptions(port=port), on_ready=lambda url: pytest.fail("ready"))
    assert str(info.value) == f"cannot listen on 127.0.0.1:{port}: address already in use; choose another --port"
    assert not engine.started


async def test_serve_starts_its_engine_then_drains_and_stops_it():
    await wait_for_model()
    engine = Engine(EngineConfig(kv_tokens_per_instance=4096))
    options = ServerOptions(port=free_port(), shutdown_timeout=1.0)
    url = f"http://127.0.0.1:{options.port}"
    stop = asyncio.Event()
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(engine, options, on_ready=ready.set_result, stop=stop))
    async with aiohttp.ClientSession() as http:
        seen = await _while_starting(http, url, ready, task)
        assert "starting" in seen, "the socket should answer while the model loads"
        assert await asyncio.wait_for(ready, 120) == url
        async with http.get(url + "/health") as resp:
            assert resp.status == 200

        resp = await http.post(url + "/v1/completions", json=LONG)
        assert resp.status == 200
        first = await resp.content.readuntil(b"\n\n")
        assert json.loads(first[6:])["choices"][0]["text"]
        stop.set()
        await asyncio.sleep(0.2)
        async with http.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1}) as refused:
            assert refused.status == 503
            assert "shutting down" in assert_error_body(await refused.json(), 503)["message"]
        async with http.get(url + "/health") as health:
            assert health.status == 503 and (await health.json())["status"] == "draining"
        events = parse_sse((first + await resp.read()).decode())
        resp.close()
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"][0]["finish_reason"] == "abort"
    assert all(e["choices"][0]["finish_reason"] is None for e in events[:-2])
    await asyncio.wait_for(task, 30)
    assert engine.health().status == "down"


async def _while_starting(http, url, ready, task) -> set[str]:
    """Poll until the engine is ready; returns the statuses `/health` gave meanwhile (and checks
    that `/v1/*` is 503 with Retry-After then)."""
    seen = set()
    while not ready.done():
        assert not task.done(), task.exception()
        try:
            async with http.get(url + "/health") as resp:
                body = await resp.json()
                if resp.status == 503:
                    seen.add(body["status"])
                    assert body["status"] == "starting" and int(resp.headers["Retry-After"]) >= 0
            async with http.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1}) as resp:
                if resp.status == 503:
                    assert "Retry-After" in resp.headers
                    assert_error_body(await resp.json(), 503)
        except aiohttp.ClientConnectionError:
            pass
        await asyncio.sleep(0.02)
    return seen


async def test_cancelling_serve_frees_its_requests_and_leaves_the_engine_to_the_caller():
    await wait_for_model()
    async with Engine(EngineConfig(kv_tokens_per_instance=4096)) as engine, aiohttp.ClientSession() as http:
        ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(serve(engine, ServerOptions(port=0), on_ready=ready.set_result))
        url = await asyncio.wait_for(ready, 60)
        resp = await http.post(url + "/v1/completions", json=LONG)
        await resp.content.readuntil(b"\n\n")
        assert engine.stats().running == 1
        task.cancel()
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 10)
        resp.close()
        await wait_all_free(engine)
        assert engine.health().ok
        async with serving(engine) as again:
            await still_serves(http, again, engine)
