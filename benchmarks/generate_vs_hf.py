"""Decode throughput: esp-serve with 16 concurrent mixed-length requests against
transformers' `generate` on the same model and prompts, on this machine (one run, one ratio).

    .venv/bin/python benchmarks/generate_vs_hf.py [--requests 16] [--max-tokens 64]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import time

import torch


def make_prompts(vocab: int, n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [rng.choice([16, 64, 128, 256, 512, 1024]) for _ in range(n)]
    return [[1] + [rng.randrange(3, vocab) for _ in range(L - 1)] for L in lengths]


async def run_esp(model_dir, prompts, max_tokens, threads) -> float:
    from esp.engine import EngineConfig, SamplingParams
    from esp.engine.engine import Engine

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    config = EngineConfig(model=str(model_dir), kv_tokens_per_instance=32768, threads_per_instance=threads,
                          dtype="float32")
    async with Engine(config) as engine:
        async def one(p):
            async for out in engine.generate(p, params):
                last = out
            return last
        await one(prompts[0][:8])
        t0 = time.perf_counter()
        outs = await asyncio.gather(*(one(p) for p in prompts))
        wall = time.perf_counter() - t0
    return sum(o.completion_tokens for o in outs) / wall


def run_hf(model_dir, prompts, max_tokens, threads) -> float:
    from transformers import LlamaForCausalLM

    torch.set_num_threads(threads)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    kwargs = dict(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids[:1, -8:], attention_mask=mask[:1, -8:], **{**kwargs, "max_new_tokens": 2,
                                                                       "min_new_tokens": 2})
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, **kwargs)
        wall = time.perf_counter() - t0
    return (out.shape[1] - width) * len(prompts) / wall


def main() -> None:
    from esp.engine.config import bundled_model_dir
    from esp.engine.model_config import ModelConfig

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(bundled_model_dir()))
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    prompts = make_prompts(ModelConfig.from_dir(args.model).vocab_size, args.requests)
    esp = asyncio.run(run_esp(args.model, prompts, args.max_tokens, args.threads))
    hf = run_hf(args.model, prompts, args.max_tokens, args.threads)
    print(json.dumps({"requests": args.requests, "prompt_lens": sorted(len(p) for p in prompts),
                      "max_tokens": args.max_tokens, "esp_tokens_per_s": round(esp, 1),
                      "hf_generate_tokens_per_s": round(hf, 1), "ratio_esp_over_hf": round(esp / hf, 2)}))


if __name__ == "__main__":
    main()
