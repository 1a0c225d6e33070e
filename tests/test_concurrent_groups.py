"""Groups run concurrently: a long prefill on one instance does not stop decode steps on another."""
from __future__ import annotations

import asyncio
import random
import time

import pytest

from esp.engine import EngineConfig, SamplingParams
from esp.engine.engine import Engine

pytestmark = pytest.mark.slow


async def scenario() -> tuple[list[float], float, float]:
    config = EngineConfig(instances=2, policy="replicas", kv_tokens_per_instance=8192, threads_per_instance=1)
    async with Engine(config) as engine:
        decode_times: list[float] = []

        async def decoder():
            params = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
            async for out in engine.generate([1, 300, 301, 302], params):
                decode_times.extend([time.monotonic()] * len(out.new_token_ids))

        task = asyncio.create_task(decoder())
        while len(decode_times) < 3:
            await asyncio.sleep(0.01)
        rng = random.Random(0)
        long_prompt = [1] + [rng.randrange(3, 4000) for _ in range(5999)]
        start = time.monotonic()
        async for out in engine.generate(long_prompt, SamplingParams(max_tokens=1, temperature=0)):
            first_token = time.monotonic()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        prefill_groups = [s.group for s in engine.step_stats if s.kind == "prefill" and s.tokens == 6000]
        assert len(prefill_groups) == 1 and len(prefill_groups[0]) == 1
        return decode_times, start, first_token


def test_decode_tokens_keep_arriving_during_a_long_prefill():
    decode_times, start, end = asyncio.run(scenario())
    during = [t for t in decode_times if start < t < end]
    assert end - start > 1.0, "the long prefill should take long enough to observe"
    assert len(during) >= 10, f"only {len(during)} decode tokens arrived during a {end - start:.1f}s prefill"
