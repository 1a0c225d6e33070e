"""The HTTP surface against a real engine (one CPU worker, the bundled model) behind a real
`serve()`. The oracle is the Python API: `Engine.generate` with the same parameters."""
from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from esp.engine import EngineConfig, SamplingParams
from esp.engine.config import bundled_model_dir
from esp.engine.engine import Engine
from esp.engine.server import serve

pytestmark = pytest.mark.asyncio(loop_scope="module")

PROMPT = "The module provides"


async def _wait_for_model(timeout_s: float = 600.0) -> None:
    weights = bundled_model_dir() / "model.safetensors"
    deadline = time.monotonic() + timeout_s
    while not weights.exists():
        if time.monotonic() > deadline:
            pytest.skip(f"{weights} does not exist")
        await asyncio.sleep(2)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def engine():
    await _wait_for_model()
    async with Engine(EngineConfig(kv_tokens_per_instance=4096)) as eng:
        yield eng


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def url(engine):
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(engine, "127.0.0.1", 0, on_ready=ready.set_result))
    done, _ = await asyncio.wait([ready, task], timeout=30, return_when=asyncio.FIRST_COMPLETED)
    assert ready in done, task.exception() if task.done() else "serve() did not get ready"
    yield ready.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


@pytest_asyncio.fixture(loop_scope="module")
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


async def oracle(engine, prompt, **params):
    outs = [o async for o in engine.generate(prompt, SamplingParams(**params))]
    return outs[-1]


async def post(http, url, path, body):
    async with http.post(url + path, json=body) as resp:
        return resp.status, await resp.json()


async def sse(http, url, path, body) -> list:
    """The `data:` payloads of a stream, decoded, with `[DONE]` kept as the string."""
    async with http.post(url + path, json=body) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        raw = await resp.text()
    events = [e for e in raw.split("\n\n") if e]
    assert raw.endswith("\n\n") and all(e.startswith("data: ") for e in events), raw
    return [e[6:] if e[6:] == "[DONE]" else json.loads(e[6:]) for e in events]


def all_free(engine) -> bool:
    s = engine.scheduler
    return s.free_slots() == [a.num_slots for a in s.allocators] and not s.requests


async def wait_all_free(engine, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not all_free(engine):
        assert time.monotonic() < deadline, (engine.scheduler.free_slots(), list(engine.scheduler.requests))
        await asyncio.sleep(0.05)


async def test_completion_stream_matches_full_response_and_engine(engine, url, http):
    body = {"model": engine.model_name, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    expected = await oracle(engine, PROMPT, max_tokens=8, temperature=0, ignore_eos=True)
    status, full = await post(http, url, "/v1/completions", body)
    assert status == 200
    assert full["object"] == "text_completion" and full["model"] == engine.model_name
    assert full["choices"][0]["text"] == expected.text
    assert full["choices"][0]["finish_reason"] == "length"
    usage = full["usage"]
    assert usage["prompt_tokens"] == len(engine.tokenizer.encode(PROMPT)) == expected.prompt_tokens
    assert usage["completion_tokens"] == 8 and usage["total_tokens"] == usage["prompt_tokens"] + 8
    assert usage["esp"]["prefill_group"] == [0]

    events = await sse(http, url, "/v1/completions",
                       {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    chunks, usage_chunk = events[:-2], events[-2]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["text"], "the first chunk must carry the first token"
    assert all(c["choices"][0]["text"] for c in chunks[:-1]), "no empty chunk before the last"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected.text
    assert usage_chunk["choices"] == []
    assert {k: usage_chunk["usage"][k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")} == {
        "prompt_tokens": expected.prompt_tokens, "completion_tokens": 8,
        "total_tokens": expected.prompt_tokens + 8}
    assert "esp" in usage_chunk["usage"]
    await wait_all_free(engine)


async def test_stream_without_usage_has_no_usage_chunk(engine, url, http):
    events = await sse(http, url, "/v1/completions",
                       {"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "stream": True})
    assert events[-1] == "[DONE]"
    assert all(e["choices"] and "usage" not in e for e in events[:-1])


async def test_token_id_prompts_in_every_accepted_form(engine, url, http):
    ids = engine.tokenizer.encode(PROMPT)
    expected = await oracle(engine, ids, max_tokens=6, temperature=0, ignore_eos=True)
    for prompt in (ids, [ids], [PROMPT]):
        status, full = await post(http, url, "/v1/completions",
                                  {"prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True})
        assert status == 200, full
        assert full["choices"][0]["text"] == expected.text
        assert full["usage"]["prompt_tokens"] == len(ids)


async def test_chat_completion_full_and_streamed(engine, url, http):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a module."}]
    rendered = engine.tokenizer.apply_chat_template(messages)
    expected = await oracle(engine, rendered, max_tokens=6, temperature=0, ignore_eos=True)
    body = {"messages": messages, "max_completion_tokens": 6, "temperature": 0, "ignore_eos": True}
    status, full = await post(http, url, "/v1/chat/completions", body)
    assert status == 200, full
    assert full["object"] == "chat.completion"
    assert full["choices"][0]["message"] == {"role": "assistant", "content": expected.text}
    assert full["choices"][0]["finish_reason"] == "length"
    assert full["usage"]["prompt_tokens"] == expected.prompt_tokens
    assert full["usage"]["completion_tokens"] == 6

    events = await sse(http, url, "/v1/chat/completions",
                       {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    chunks = events[:-2]
    assert all(c["object"] == "chat.completion.chunk" for c in events[:-1])
    first = chunks[0]["choices"][0]["delta"]
    assert first["role"] == "assistant" and first["content"]
    assert all(c["choices"][0]["delta"]["content"] for c in chunks[:-1])
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:])
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected.text
    assert events[-2]["usage"]["completion_tokens"] == 6


async def test_text_parts_in_chat_content(engine, url, http):
    plain = [{"role": "user", "content": "Hello there"}]
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]}]
    body = {"max_tokens": 3, "temperature": 0, "ignore_eos": True}
    a = await post(http, url, "/v1/chat/completions", {**body, "messages": plain})
    b = await post(http, url, "/v1/chat/completions", {**body, "messages": parts})
    assert a[0] == b[0] == 200
    assert a[1]["choices"][0]["message"] == b[1]["choices"][0]["message"]


async def test_stop_string_truncates(engine, url, http):
    base = await oracle(engine, PROMPT, max_tokens=12, temperature=0, ignore_eos=True)
    text = base.text
    cut = next((i for i in range(len(text) // 3, len(text) - 1)
                if text[i:i + 2].strip() and text.find(text[i:i + 2]) == i), None)
    assert cut is not None, f"greedy output {text!r} has no usable stop string"
    stop = text[cut:cut + 2]
    body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True, "stop": [stop, "\x00never"]}
    status, full = await post(http, url, "/v1/completions", body)
    assert status == 200
    assert full["choices"][0]["text"] == text[:cut]
    assert full["choices"][0]["finish_reason"] == "stop"
    events = await sse(http, url, "/v1/completions", {**body, "stop": stop, "stream": True})
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == text[:cut]
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


async def test_max_tokens_with_ignore_eos_is_exact(engine, url, http):
    for n in (1, 7):
        status, full = await post(http, url, "/v1/completions",
                                  {"prompt": PROMPT, "max_tokens": n, "temperature": 0.8, "seed": 3,
                                   "top_p": 0.9, "top_k": 20, "ignore_eos": True})
        assert status == 200
        assert full["choices"][0]["finish_reason"] == "length"
        assert full["usage"]["completion_tokens"] == n
    expected = await oracle(engine, PROMPT, max_tokens=7, temperature=0.8, seed=3, top_p=0.9, top_k=20,
                            ignore_eos=True)
    assert full["choices"][0]["text"] == expected.text


async def test_default_max_tokens_is_sixteen_for_completions(engine, url, http):
    status, full = await post(http, url, "/v1/completions", {"prompt": PROMPT, "ignore_eos": True})
    assert status == 200 and full["usage"]["completion_tokens"] == 16


BAD_REQUESTS = [
    ("/v1/completions", b'{"prompt": "x", ', None),
    ("/v1/completions", b'\xff\xfe', None),
    ("/v1/completions", b"", None),
    ("/v1/completions", b'["prompt"]', None),
    ("/v1/completions", b'"just a string"', None),
    ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": True}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2.5}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -3}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": False}, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, "top_p"),
    ("/v1/completions", {"prompt": "x", "top_k": "all"}, "top_k"),
    ("/v1/completions", {"prompt": "x", "seed": 1.5}, "seed"),
    ("/v1/completions", {"prompt": "x", "stop": 7}, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, "stop"),
    ("/v1/completions", {"prompt": "x", "ignore_eos": "yes"}, "ignore_eos"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/completions", {"prompt": "x", "stream": True, "stream_options": {"include_usage": 1}}, "include_usage"),
    ("/v1/completions", {"prompt": "x", "n": 2}, "n"),
    ("/v1/completions", {"prompt": "x", "model": ["a"]}, "model"),
    ("/v1/completions", {"prompt": "x", "logprobs": 2}, "logprobs"),
    ("/v1/completions", {"max_tokens": 3}, "prompt"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": ["a", "b"]}, "prompt"),
    ("/v1/completions", {"prompt": [[1, 2], [3]]}, "prompt"),
    ("/v1/completions", {"prompt": [1, "a"]}, "prompt"),
    ("/v1/completions", {"prompt": [1, True]}, "prompt"),
    ("/v1/completions", {"prompt": [-1]}, "prompt"),
    ("/v1/completions", {"prompt": 42}, "prompt"),
    ("/v1/chat/completions", {"max_tokens": 3}, "messages"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": "x"},
     "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
]


@pytest.mark.parametrize("path,body,param", BAD_REQUESTS, ids=[f"{i}" for i in range(len(BAD_REQUESTS))])
async def test_bad_request_is_400_and_server_keeps_serving(engine, url, http, path, body, param):
    kwargs = {"data": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body}
    async with http.post(url + path, **kwargs) as resp:
        assert resp.status == 400, await resp.text()
        error = (await resp.json())["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["code"] is None
    assert isinstance(error["message"], str) and error["message"]
    assert error["param"] == param
    await _still_serves(engine, url, http)


async def _still_serves(engine, url, http) -> None:
    status, full = await post(http, url, "/v1/completions", {"prompt": "A", "max_tokens": 1, "ignore_eos": True})
    assert status == 200 and full["usage"]["completion_tokens"] == 1
    await wait_all_free(engine)


async def test_prompt_longer_than_context_is_400(engine, url, http):
    limit = engine.max_model_len
    for body in ({"prompt": [5] * (limit + 1)}, {"prompt": [5] * (limit - 2), "max_tokens": 3}):
        for stream in (False, True):
            status, out = await post(http, url, "/v1/completions", {**body, "stream": stream})
            assert status == 400, out
            assert out["error"]["type"] == "invalid_request_error" and out["error"]["param"] == "prompt"
            assert str(limit) in out["error"]["message"]
    await _still_serves(engine, url, http)


async def test_unknown_model_is_404_model_not_found(engine, url, http):
    status, out = await post(http, url, "/v1/completions", {"model": "gpt-17", "prompt": "x"})
    assert status == 404
    assert out["error"]["code"] == "model_not_found" and out["error"]["param"] == "model"
    assert "gpt-17" in out["error"]["message"]
    await _still_serves(engine, url, http)


async def test_unknown_route_and_wrong_method_use_the_error_body(engine, url, http):
    async with http.post(url + "/v1/nothing", json={}) as resp:
        assert resp.status == 404
        error = (await resp.json())["error"]
        assert set(error) == {"message", "type", "param", "code"}
    async with http.get(url + "/v1/completions") as resp:
        assert resp.status == 405
        assert "POST" in resp.headers["Allow"]
        assert (await resp.json())["error"]["type"] == "invalid_request_error"


async def test_client_disconnect_mid_stream_frees_slots(engine, url, http):
    body = {"prompt": PROMPT, "max_tokens": 2000, "ignore_eos": True, "temperature": 0, "stream": True}
    resp = await http.post(url + "/v1/completions", json=body)
    assert resp.status == 200
    line = await resp.content.readuntil(b"\n\n")
    assert json.loads(line[6:])["choices"][0]["text"]
    assert engine.scheduler.requests, "the request should still be running"
    resp.close()
    await wait_all_free(engine)
    await _still_serves(engine, url, http)


async def test_client_disconnect_of_full_response_frees_slots(engine, url, http):
    body = {"prompt": PROMPT, "max_tokens": 2000, "ignore_eos": True}
    task = asyncio.create_task(post(http, url, "/v1/completions", body))
    deadline = time.monotonic() + 10
    while not engine.scheduler.requests:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await wait_all_free(engine)


async def test_concurrent_streams_each_match_their_solo_run(engine, url, http):
    prompts = ["The module", "Return the value", "A list of"]
    solo = [(await oracle(engine, p, max_tokens=5, temperature=0, ignore_eos=True)).text for p in prompts]
    streams = await asyncio.gather(*(sse(http, url, "/v1/completions",
                                         {"prompt": p, "max_tokens": 5, "temperature": 0, "ignore_eos": True,
                                          "stream": True}) for p in prompts))
    assert ["".join(e["choices"][0]["text"] for e in events[:-1]) for events in streams] == solo
    await wait_all_free(engine)


async def test_models_health_and_metrics(engine, url, http):
    async with http.get(url + "/v1/models") as resp:
        models = await resp.json()
    assert models["object"] == "list" and len(models["data"]) == 1
    assert models["data"][0]["id"] == engine.model_name
    assert models["data"][0]["max_model_len"] == engine.max_model_len
    async with http.get(url + "/health") as resp:
        assert resp.status == 200 and await resp.json() == {"status": "ok"}

    before = await _metrics(http, url)
    for n in (3, 5):
        await post(http, url, "/v1/completions", {"prompt": PROMPT, "max_tokens": n, "ignore_eos": True})
    await post(http, url, "/v1/completions", {"prompt": PROMPT, "max_tokens": "bad"})
    after = await _metrics(http, url)
    assert after[("esp_requests_total", (("finish_reason", "length"),))] \
        - before.get(("esp_requests_total", (("finish_reason", "length"),)), 0) == 2
    assert after[("esp_generation_tokens_total", ())] - before.get(("esp_generation_tokens_total", ()), 0) == 8
    assert after[("esp_time_to_first_token_seconds_count", ())] \
        - before.get(("esp_time_to_first_token_seconds_count", ()), 0) == 2
    assert after[("esp_time_per_output_token_seconds_count", ())] \
        - before.get(("esp_time_per_output_token_seconds_count", ()), 0) == 2
    assert after[("esp_requests_running", ())] == 0 and after[("esp_requests_waiting", ())] == 0


async def _metrics(http, url) -> dict:
    async with http.get(url + "/metrics") as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def test_openai_client_streams_a_completion(engine, url):
    openai = pytest.importorskip("openai")
    expected = await oracle(engine, PROMPT, max_tokens=8, temperature=0, ignore_eos=True)
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as client:
        stream = await client.completions.create(
            model=engine.model_name, prompt=PROMPT, max_tokens=8, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        chunks = [c async for c in stream]
        assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
        assert chunks[-1].usage.completion_tokens == 8
        assert chunks[-1].usage.prompt_tokens == expected.prompt_tokens
        chat = await client.chat.completions.create(
            model=engine.model_name, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0)
        assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 4
        with pytest.raises(openai.BadRequestError):
            await client.completions.create(model=engine.model_name, prompt=PROMPT, max_tokens=0)
        with pytest.raises(openai.NotFoundError):
            await client.completions.create(model="nope", prompt=PROMPT, max_tokens=2)
    await wait_all_free(engine)
