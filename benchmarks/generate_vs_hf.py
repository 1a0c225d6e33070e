"""Decode throughput: esp-serve with N concurrent mixed-length requests against
transformers' `generate` on the same model and prompts, on this machine (one run, one ratio
per N), and the control plane's cost per decode step.

    .venv/bin/python benchmarks/generate_vs_hf.py [--requests 16,64] [--max-tokens 64] [--json OUT]

Control-plane overhead per decode iteration, from the engine's step records (see
`control_plane`), with the default rounds (up to 16 iterations per scheduling round) and with
one iteration per round (`--decode-steps 1`: what every token would pay without rounds).
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
    lengths = [rng.choice([64, 128, 256, 512, 1024, 2048]) for _ in range(n)]
    return [[1] + [rng.randrange(3, vocab) for _ in range(L - 1)] for L in lengths]


async def run_esp(model_dir, prompts, max_tokens, threads, decode_steps=None) -> tuple[float, dict]:
    from esp.engine import EngineConfig, SamplingParams
    from esp.engine.engine import Engine

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    kv = max(32768, sum(len(p) + max_tokens for p in prompts))
    rounds = {"decode_steps": decode_steps} if decode_steps else {}
    config = EngineConfig(model=str(model_dir), kv_tokens_per_instance=kv, threads_per_instance=threads,
                          dtype="float32", log_requests=False, **rounds)
    async with Engine(config) as engine:
        async def one(p):
            async for out in engine.generate(p, params):
                last = out
            return last
        await one(prompts[0][:8])
        engine.step_stats.clear()
        t0 = time.perf_counter()
        outs = await asyncio.gather(*(one(p) for p in prompts))
        wall = time.perf_counter() - t0
        overhead = control_plane(list(engine.step_stats))
    return sum(o.completion_tokens for o in outs) / wall, overhead


def control_plane(stats) -> dict:
    """Per decode iteration, in ms, over pairs of back-to-back decode rounds (no other step
    started between them; 1 instance, so rounds run one after another): the engine's wall time
    minus the worker's compute and communication, divided by the iterations the rounds ran.
    `in_round`: inside rounds (the step's message, each iteration's streamed tokens, the
    reply); `between_rounds`: from a round's end to the next one's start (update, scheduling)."""
    ordered = sorted(stats, key=lambda s: s.start_s)
    pairs = [(a, b) for a, b in zip(ordered, ordered[1:]) if a.kind == b.kind == "decode"]
    iters = sum(a.iterations for a, _ in pairs)
    if not iters:
        return {"decode_iterations": 0}
    per = lambda seconds: round(seconds / iters * 1e3, 3)  # noqa: E731
    in_round = sum(a.wall_s - a.compute_s - a.comm_s for a, _ in pairs)
    between = sum(b.start_s - a.start_s - a.wall_s for a, b in pairs)
    return {"decode_iterations": iters, "rounds": len(pairs), "compute_ms": per(sum(a.compute_s for a, _ in pairs)),
            "in_round_ms": per(in_round), "between_rounds_ms": per(between), "total_ms": per(in_round + between)}


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
    ap.add_argument("--requests", default="1,16,64", help="concurrent requests, comma-separated")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", metavar="OUT")
    args = ap.parse_args()
    results = []
    for n in [int(x) for x in args.requests.split(",") if x]:
        prompts = make_prompts(ModelConfig.from_dir(args.model).vocab_size, n)
        esp, overhead = asyncio.run(run_esp(args.model, prompts, args.max_tokens, args.threads))
        _, one_step = asyncio.run(run_esp(args.model, prompts, args.max_tokens, args.threads, decode_steps=1))
        hf = run_hf(args.model, prompts, args.max_tokens, args.threads)
        results.append({"requests": n, "prompt_lens": sorted(len(p) for p in prompts),
                        "max_tokens": args.max_tokens, "esp_tokens_per_s": round(esp, 1),
                        "hf_generate_tokens_per_s": round(hf, 1), "ratio_esp_over_hf": round(esp / hf, 2),
                        "control_plane": overhead, "control_plane_one_step_rounds": one_step})
        print(json.dumps(results[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
