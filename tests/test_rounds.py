"""Multi-step decode rounds on the real engine and the non-blocking pipe writes behind them.

A round streams each iteration's tokens, and ends after the iteration in progress when a
request arrives or is aborted; greedy tokens equal those of one-token rounds (the oracle: a
second engine with `decode_steps=1`). The pipe writer keeps order and frames messages as
`multiprocessing.Connection` reads them."""
from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing
import threading

import pytest
import pytest_asyncio

from esp.engine import EngineConfig, SamplingParams
from esp.engine.engine import Engine
from esp.engine.protocol import KeepRange, PrefillBatch, PrefillSeq, SampleSpec
from esp.engine.workers import _Link

in_engine_loop = pytest.mark.asyncio(loop_scope="module")
BASE = EngineConfig(instances=2, kv_tokens_per_instance=2048, dtype="float64", threads_per_instance=1,
                    log_requests=False)
PROMPTS = [[1] + [(37 * i + 11 * j) % 3000 + 3 for j in range(n)] for i, n in enumerate((20, 90, 45))]


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def engine():
    async with Engine(dataclasses.replace(BASE, decode_steps=64)) as eng:
        yield eng


@pytest.fixture(scope="module")
def one_token_rounds():
    """Greedy tokens of each prompt alone, one decode iteration per round trip."""
    async def run():
        async with Engine(dataclasses.replace(BASE, decode_steps=1)) as eng:
            return [[o async for o in eng.generate(p, greedy(40))][-1].token_ids for p in PROMPTS]
    return asyncio.run(run())


@in_engine_loop
async def test_a_round_streams_every_token(engine, one_token_rounds):
    outs = [o async for o in engine.generate(PROMPTS[0], greedy(40))]
    assert [len(o.new_token_ids) for o in outs] == [1] * 40
    assert outs[-1].token_ids == one_token_rounds[0]
    rounds = [s for s in engine.step_stats if s.kind == "decode"]
    assert rounds[-1].iterations == 39  # the tokens left after the prefill's, in one round


@in_engine_loop
async def test_an_arrival_ends_the_round_after_its_iteration(engine, one_token_rounds):
    engine.step_stats.clear()
    first = engine.generate(PROMPTS[1], greedy(40))
    outs = [await anext(first) for _ in range(5)]
    second = [o async for o in engine.generate(PROMPTS[2], greedy(40))]
    outs += [o async for o in first]
    assert outs[-1].token_ids == one_token_rounds[1] and second[-1].token_ids == one_token_rounds[2]
    first_round = next(s for s in engine.step_stats if s.kind == "decode")
    assert first_round.iterations < 39, "the round ran on instead of letting the new prompt in"
    prefills = [s.start_s for s in engine.step_stats if s.kind == "prefill"]
    assert prefills[1] < first_round.start_s + first_round.wall_s + 0.5


@in_engine_loop
async def test_an_abort_ends_the_round_and_frees_every_slot(engine):
    engine.step_stats.clear()
    stream = engine.generate(PROMPTS[0], SamplingParams(max_tokens=60, temperature=0, ignore_eos=True),
                             request_id="to-abort")
    for _ in range(3):
        await anext(stream)
    assert engine.abort("to-abort")
    rest = [o async for o in stream]
    assert rest[-1].finish_reason == "abort"
    while engine.scheduler.in_flight:
        await asyncio.sleep(0.01)
    (round_,) = [s for s in engine.step_stats if s.kind == "decode"]
    assert round_.iterations < 59
    s = engine.scheduler
    assert s.free_slots() == [a.num_slots for a in s.allocators] and not s.requests


def test_link_writes_big_and_small_messages_in_order():
    """A prompt above `BIG_TOKENS` is pickled off the loop; the small steps sent after it still
    arrive after it, and a pipe too small for it drains through the loop's writer."""
    recv_end, send_end = multiprocessing.Pipe(duplex=False)
    big = 4 * _Link.BIG_TOKENS
    msgs = [PrefillBatch(1, (0,), (PrefillSeq(1, list(range(big)), (KeepRange(0, 0, big, range(big)),),
                                             SampleSpec(greedy(1), 0, 0)),))]
    msgs += [PrefillBatch(i, (0,), (), released={0: (i,)}) for i in range(2, 40)]
    got = []
    reader = threading.Thread(target=lambda: got.extend(recv_end.recv() for _ in msgs))

    async def send_all():
        link = _Link(0, send_end, None, None)
        for m in msgs:
            link.send(m)
        reader.start()
        while link._out:
            await asyncio.sleep(0.01)
        link.close()
    asyncio.run(send_all())
    reader.join(30)
    assert [m.step_id for m in got] == list(range(1, 40))
    assert list(got[0].seqs[0].token_ids) == list(range(big)) and got[5].released == {0: (6,)}
