"""Time to first token of one long prompt on 1 instance against N instances (striped
prefill), in one run, plus the share of a prefill step spent blocked on communication.

    .venv/bin/python benchmarks/esp_ttft.py [--tokens 6000] [--instances 2] [--repeat 3]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics

from esp.engine import EngineConfig, SamplingParams
from esp.engine.engine import Engine


async def measure(instances: int, prompt: list[int], repeat: int, dtype: str) -> dict:
    config = EngineConfig(instances=instances, threads_per_instance=1, kv_tokens_per_instance=len(prompt) + 64,
                          dtype=dtype)
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    ttfts, shares = [], []
    async with Engine(config) as engine:
        for i in range(repeat + 1):
            async for out in engine.generate(prompt, params):
                pass
            stat = [s for s in engine.step_stats if s.kind == "prefill"][-1]
            if i:  # the first run warms up
                ttfts.append(out.timing.ttft_s)
                shares.append(stat.comm_s / max(stat.comm_s + stat.compute_s, 1e-9))
    return {"instances": instances, "prefill_group": list(stat.group), "ttft_s": statistics.median(ttfts),
            "comm_share": statistics.median(shares)}


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=6000)
    ap.add_argument("--instances", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    rng = random.Random(0)
    prompt = [1] + [rng.randrange(3, 2000) for _ in range(args.tokens - 1)]
    one = await measure(1, prompt, args.repeat, args.dtype)
    many = await measure(args.instances, prompt, args.repeat, args.dtype)
    print(json.dumps({"prompt_tokens": args.tokens, "one": one, "many": many,
                      "ttft_speedup": round(one["ttft_s"] / many["ttft_s"], 2)}))


if __name__ == "__main__":
    asyncio.run(main())
