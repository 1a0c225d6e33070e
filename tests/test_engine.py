"""End to end on CPU: the real engine with a real worker process on the bundled model."""
from __future__ import annotations

import asyncio
import random

import pytest
import pytest_asyncio

from esp.engine import EngineConfig, SamplingParams
from esp.engine.engine import Engine

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def engine():
    async with Engine(EngineConfig(kv_tokens_per_instance=2048, dtype="float64")) as eng:
        yield eng


async def collect(engine, prompt, params, request_id=None):
    outs = [o async for o in engine.generate(prompt, params, request_id)]
    return outs


def all_free(engine) -> bool:
    s = engine.scheduler
    return s.free_slots() == [a.num_slots for a in s.allocators] and not s.requests


async def settled(engine, timeout_s: float = 10.0) -> bool:
    """Once the steps in flight have returned (an aborted request's stream ends at once; its
    slots are freed when its step comes back): are all slots free?"""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while engine.scheduler.in_flight and loop.time() < deadline:
        await asyncio.sleep(0.01)
    return all_free(engine)


async def test_concurrent_requests_match_their_solo_runs(engine):
    rng = random.Random(0)
    prompts = [[1] + [rng.randrange(3, engine.model_config.vocab_size) for _ in range(n)]
               for n in (5, 40, 200, 17, 90, 300)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    solo = []
    for p in prompts:
        outs = await collect(engine, p, params)
        solo.append(outs[-1].token_ids)
    together = await asyncio.gather(*(collect(engine, p, params) for p in prompts))
    assert [outs[-1].token_ids for outs in together] == solo
    assert all(len(t) == 12 for t in solo)
    assert all_free(engine)


async def test_streamed_deltas_add_up(engine):
    outs = await collect(engine, "The module provides", SamplingParams(max_tokens=20, temperature=0))
    final = outs[-1]
    assert "".join(o.text for o in outs[-1:]) == final.text
    assert "".join(o.new_text for o in outs) == final.text
    assert sum(len(o.new_token_ids) for o in outs) == len(final.token_ids)
    assert final.finish_reason in ("length", "stop")
    tok = engine.tokenizer
    prompt_ids = tok.encode("The module provides")
    output = [t for t in final.token_ids if t not in tok.eos_token_ids]
    assert final.text == tok.decode(prompt_ids + output)[len(tok.decode(prompt_ids)):]
    assert final.timing.ttft_s > 0 and final.timing.e2e_s >= final.timing.ttft_s


async def test_seeded_sampling_is_reproducible(engine):
    params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    a = (await collect(engine, "Return the", params))[-1].token_ids
    b = (await collect(engine, "Return the", params))[-1].token_ids
    c = (await collect(engine, "Return the", SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95,
                                                             top_k=50, seed=99, ignore_eos=True)))[-1].token_ids
    assert a == b and a != c


async def test_abort_frees_slots(engine):
    params = SamplingParams(max_tokens=500, temperature=0, ignore_eos=True)
    gen = engine.generate("Abort me", params, request_id="to-abort")
    first = await gen.__anext__()
    assert first.new_token_ids
    assert engine.abort("to-abort")
    rest = [o async for o in gen]
    assert rest[-1].finish_reason == "abort"
    assert await settled(engine)


async def test_closing_the_stream_aborts(engine):
    gen = engine.generate("Close me", SamplingParams(max_tokens=500, temperature=0, ignore_eos=True))
    await gen.__anext__()
    await gen.aclose()
    for _ in range(200):
        if all_free(engine):
            break
        await asyncio.sleep(0.05)
    assert all_free(engine)


@pytest.mark.parametrize("prompt, params, message", [
    ("", SamplingParams(), "empty"),
    ([1, 10**9], SamplingParams(), "token ids"),
    ([1] * 10, SamplingParams(max_tokens=10**6), "maximum context length"),
])
async def test_bad_input_is_a_clear_error_and_the_engine_keeps_serving(engine, prompt, params, message):
    with pytest.raises(ValueError, match=message):
        await collect(engine, prompt, params)
    ok = await collect(engine, "Still here", SamplingParams(max_tokens=3, temperature=0))
    assert ok[-1].finished and all_free(engine)
