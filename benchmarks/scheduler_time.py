"""Decision time of one `Scheduler.schedule()` with a long queue (issue 11, item 5).

Queues `--queued` requests (default 1,000) sampled from a shipped trace's length mix, all
arrived, on `--instances` idle instances of a cost profile (default the `a800-lwm7b` preset,
its KV capacity per instance), with a policy bundle (default `loong`), and times:

- `cold`: the first `schedule()` (every instance idle, nothing running): dispatch, elastic
  allocation, the Eq. 5 batching DP, keep plans, validation, slot allocation;
- `steady`: the `schedule()` after every step of the first one completed (decodes running,
  the rest of the queue waiting): the same plus decode batching and scaling.

Each is timed on a fresh scheduler `--repeats` times; the minimum and median are printed (ms)
with the number of requests dispatched. Five more runs with the policies and the KV slot
allocators wrapped by a stopwatch give, of the fastest, the milliseconds spent in the policies
(dispatch, batching with the Eq. 5 DP, scaling) and in the allocators (the wrappers' own cost is
in those runs only); the rest is the scheduler's own work (views, validation, steps). The goal
is <= 10 ms, the bar 50 ms.

Each `schedule()` runs as the engine runs it: the cyclic garbage collector paused (collections
that come due run once the steps are sent; `--collect` lets them run inside). `add()`'s time
per request is printed too: a request's view is built on arrival.

    .venv/bin/python benchmarks/scheduler_time.py [--datasets sharegpt mixed leval] [--max-prefill-tokens 500000]
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

from esp.cli.bench.workload import load_dataset, make_workload
from esp.costs.presets import load_profile
from esp.engine.protocol import DecodeBatch, MixedBatch, PrefillBatch
from esp.engine.request import Request
from esp.engine.sampling_params import SamplingParams
from esp.engine.scheduler import Scheduler
from esp.engine.sim import SimTokenizer, SyntheticPrompt
from esp.policies import PolicyOptions, load_policy_set


BREAKDOWN_RUNS = 5
"""Extra runs, after the timed ones, with the policies and allocators wrapped by a `Stopwatch`."""
POLICY_METHODS = ("dispatch", "prefill_batches", "decode_batches", "keep_plan", "decode_plan", "migrations")


class Stopwatch:
    """Milliseconds spent inside wrapped callables, by label."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}

    def wrap(self, label: str, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.ms[label] = self.ms.get(label, 0.0) + 1e3 * (time.perf_counter() - t0)
        return timed


def build(args, workload, cost, watch: Stopwatch | None = None) -> tuple[Scheduler, float]:
    """A scheduler with the workload queued, and the seconds its `add()` calls took."""
    options = PolicyOptions(max_prefill_tokens=args.max_prefill_tokens)
    slots = int(cost.meta["kv_tokens_per_instance"])
    policies = load_policy_set(args.policy, options)
    sched = Scheduler(policies, [slots] * args.instances, clock=lambda: 100.0, cost_model=cost)
    if watch is not None:  # instance attributes shadow the methods; the scheduler sees the same classes
        for part in (policies.scheduling, policies.batching, policies.scaling):
            for name in POLICY_METHODS:
                if hasattr(part, name):
                    setattr(part, name, watch.wrap("policies", getattr(part, name)))
        for alloc in sched.allocators:
            alloc.allocate = watch.wrap("allocators", alloc.allocate)
    detok, adding = SimTokenizer(), 0.0
    for i, r in enumerate(workload):
        params = SamplingParams(max_tokens=r.output_len, temperature=0, ignore_eos=True)
        req = Request(i, f"r{i}", SyntheticPrompt(r.input_len), params, seed=i, eos_ids=frozenset(),
                      detokenizer=detok.detokenizer([]), clock=lambda: 100.0, arrival=r.arrival_s)
        t0 = time.perf_counter()
        sched.add(req)
        adding += time.perf_counter() - t0
    return sched, adding


def sampled(step) -> dict:
    if isinstance(step, DecodeBatch):
        return {seq.request_id: 0 for seq in step.seqs}
    riders = list(step.decode.request_ids) if isinstance(step, MixedBatch) else []
    return {seq.request_id: 0 for seq in step.seqs if seq.sample} | dict.fromkeys(riders, 0)


def timed(sched: Scheduler, collect: bool = False) -> tuple[float, list]:
    """One `schedule()`, with the cyclic GC paused as the engine runs it (unless `collect`)."""
    if not collect:
        gc.disable()
    try:
        t0 = time.perf_counter()
        steps, failed = sched.schedule()
        dt = time.perf_counter() - t0
    finally:
        gc.enable()
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed: {failed[0].error}")
    return dt, steps


def one_run(args, workload, cost, watch: Stopwatch | None = None) -> dict:
    """A cold `schedule()` on a fresh scheduler, then, every step of it completed, a steady one:
    their seconds, requests dispatched and (with `watch`) the stopwatch's parts of each."""
    sched, adding = build(args, workload, cost, watch)
    out, steps = {"add_s": adding / len(workload)}, []
    for phase in ("cold", "steady"):
        for step in steps:  # the cold decision's steps complete before the steady one
            sched.complete(step.step_id, sampled(step))
        if watch is not None:
            watch.ms.clear()
        dt, steps = timed(sched, args.collect)
        out[phase] = (dt, sum(len(s.seqs) for s in steps if isinstance(s, (PrefillBatch, MixedBatch))),
                      dict(watch.ms) if watch is not None else {})
    return out


def measure(args, dataset: str, cost) -> dict:
    max_context = int(cost.meta.get("max_context") or 1 << 20)
    workload = make_workload(load_dataset(dataset), args.queued, float("inf"), seed=args.seed,
                             max_context=max_context)
    timed_runs = [one_run(args, workload, cost) for _ in range(args.repeats)]
    watched = [one_run(args, workload, cost, Stopwatch()) for _ in range(BREAKDOWN_RUNS)]

    def ms(phase):
        xs = [r[phase][0] for r in timed_runs]
        fastest = min(watched, key=lambda r: r[phase][0])[phase][2]
        return {"min_ms": round(1e3 * min(xs), 2), "median_ms": round(1e3 * statistics.median(xs), 2),
                "policies_ms": round(fastest.get("policies", 0.0), 2),
                "allocators_ms": round(fastest.get("allocators", 0.0), 2), "dispatched": timed_runs[-1][phase][1]}
    return {"dataset": dataset, "add_us": round(1e6 * statistics.median(r["add_s"] for r in timed_runs), 2),
            "cold": ms("cold"), "steady": ms("steady")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", nargs="+", default=["sharegpt", "mixed", "leval"])
    ap.add_argument("--queued", type=int, default=1000)
    ap.add_argument("--instances", type=int, default=8)
    ap.add_argument("--profile", default="a800-lwm7b")
    ap.add_argument("--policy", default="loong")
    ap.add_argument("--max-prefill-tokens", type=int, default=PolicyOptions.max_prefill_tokens)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--collect", action="store_true",
                    help="let the cyclic garbage collector run inside schedule() (the engine pauses it)")
    ap.add_argument("--json", action="store_true", help="print one JSON object per dataset")
    args = ap.parse_args()
    cost = load_profile(args.profile)
    print(f"# {args.policy} on {args.instances} x {cost.name}, {args.queued} queued, "
          f"max_prefill_tokens={args.max_prefill_tokens}, {args.repeats} repeats"
          f"{', garbage collector on' if args.collect else ''}")
    for dataset in args.datasets:
        row = measure(args, dataset, cost)
        if args.json:
            print(json.dumps(row))
            continue
        for phase in ("cold", "steady"):
            r = row[phase]
            print(f"{dataset:10s} {phase:6s} min {r['min_ms']:7.2f} ms  median {r['median_ms']:7.2f} ms  "
                  f"(policies {r['policies_ms']:6.2f} ms, allocators {r['allocators_ms']:6.2f} ms; "
                  f"{r['dispatched']} dispatched)")
        print(f"{dataset:10s} add()  median {row['add_us']:7.2f} us per request (its view is built on arrival)")


if __name__ == "__main__":
    main()
