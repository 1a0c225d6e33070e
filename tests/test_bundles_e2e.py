"""Every built-in bundle on 4 CPU instances: a mix of short and long prompts arriving together
all finish, with greedy tokens equal to each request's solo single-instance run."""
from __future__ import annotations

import asyncio
import random

import pytest

from esp.engine import EngineConfig, SamplingParams
from esp.engine.engine import Engine

pytestmark = pytest.mark.slow
PARAMS = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
LENGTHS = (12, 40, 700, 25, 1100, 90)


def prompts() -> list[list[int]]:
    rng = random.Random(11)
    return [[1] + [rng.randrange(3, 4000) for _ in range(n - 1)] for n in LENGTHS]


async def run_all(config: EngineConfig, sequential: bool) -> tuple[list[list[int]], bool]:
    async with Engine(config) as engine:
        async def one(p):
            async for out in engine.generate(p, PARAMS):
                pass
            assert out.finish_reason == "length", out.error
            return out.token_ids
        if sequential:
            results = [await one(p) for p in prompts()]
        else:
            results = list(await asyncio.gather(*(one(p) for p in prompts())))
        s = engine.scheduler
        return results, s.free_slots() == [a.num_slots for a in s.allocators] and not s.requests


@pytest.fixture(scope="module")
def solo():
    config = EngineConfig(dtype="float64", kv_tokens_per_instance=4096, threads_per_instance=2)
    tokens, _ = asyncio.run(run_all(config, sequential=True))
    return tokens


@pytest.mark.parametrize("policy, options, steps", [("loong", {}, None), ("replicas", {}, None),
                                                    ("static-sp", {}, None), ("disagg", {}, None),
                                                    ("chunked", {"chunk_size": 256}, None), ("loong", {}, 1),
                                                    ("loong", {}, 3)])
def test_bundle_finishes_everything_with_solo_tokens(solo, policy, options, steps):
    """`steps`: decode iterations per round (None: the default; rounds end early on arrivals,
    and `static-sp` runs them on 4-instance groups); 1 is one token per round trip."""
    config = EngineConfig(instances=4, dtype="float64", kv_tokens_per_instance=1500, threads_per_instance=1,
                          policy=policy, policy_options=options, **({"decode_steps": steps} if steps else {}))
    tokens, all_free = asyncio.run(run_all(config, sequential=False))
    assert tokens == solo
    assert all_free
