"""Simulator fidelity: replay one trace on the real CPU backend and on the simulator with a
profile of this machine, and report the per-request latency error (median and p90).

    .venv/bin/esp-run profile --instances 2 --threads-per-instance 1 --kv-tokens-per-instance 8192 \
        --max-len 2048 --out docs/results/cpu-profile.json
    .venv/bin/python benchmarks/sim_fidelity.py --profile docs/results/cpu-profile.json [--num-requests 40] [--rate 1]
"""
from __future__ import annotations

import argparse
import asyncio
import json

import numpy as np

from esp.cli.bench.runner import engine_sender, prompt_ids, replay
from esp.cli.bench.workload import load_dataset, make_workload
from esp.engine import EngineConfig
from esp.engine.engine import Engine
from esp.engine.sim import SyntheticPrompt, run_virtual


async def records(config: EngineConfig, workload, sim: bool):
    async with Engine(config) as engine:
        vocab = engine.model_config.vocab_size
        prompts = [SyntheticPrompt(r.input_len) if sim else prompt_ids(0, i, r.input_len, vocab)
                   for i, r in enumerate(workload)]
        recs, _ = await replay(workload, prompts, engine_sender(engine))
        return recs


def errors(real, sim, key) -> dict:
    pairs = [(key(r), key(s)) for r, s in zip(real, sim) if r.success and s.success and key(r) and key(s)]
    rel = np.array([abs(s - r) / r for r, s in pairs])
    return {"requests": len(pairs), "median": float(np.median(rel)), "p90": float(np.percentile(rel, 90)),
            "mean_real_s": float(np.mean([r for r, _ in pairs])), "mean_sim_s": float(np.mean([s for _, s in pairs]))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", required=True)
    ap.add_argument("--dataset", default="mixed")
    ap.add_argument("--num-requests", type=int, default=40)
    ap.add_argument("--rate", type=float, default=1.0)
    ap.add_argument("--instances", type=int, default=2)
    ap.add_argument("--policy", default="loong")
    ap.add_argument("--max-context", type=int, default=2048)
    ap.add_argument("--kv-tokens-per-instance", type=int, default=8192)
    args = ap.parse_args()
    workload = make_workload(load_dataset(args.dataset), args.num_requests, args.rate, seed=0,
                             max_context=args.max_context, fit="scale-input")
    base = dict(instances=args.instances, threads_per_instance=1, policy=args.policy, profile=args.profile,
                kv_tokens_per_instance=args.kv_tokens_per_instance)
    real = asyncio.run(records(EngineConfig(**base), workload, sim=False))
    sim = run_virtual(records(EngineConfig(**base, backend="sim", decode_steps=1), workload, sim=True))
    report = {"workload": {"dataset": args.dataset, "requests": args.num_requests, "rate": args.rate,
                           "max_context": args.max_context, "policy": args.policy, "instances": args.instances},
              "e2e": errors(real, sim, lambda r: r.e2e_s), "ttft": errors(real, sim, lambda r: r.ttft_s)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
