"""`esp-run bench`: replay a trace (or sample it at Poisson rates) against an in-process engine
(real or simulated) or an OpenAI-compatible URL, for each policy x rate, and report metrics.

Every timestamp comes from ``asyncio.get_running_loop().time()`` and pacing is ``asyncio.sleep``,
so the same coroutine runs on the simulator's virtual-clock loop (``--backend sim``).
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
from collections.abc import Awaitable, Callable

import numpy as np
from esp.cli.bench.metrics import SLO, RequestRecord, summarize, sweep_summary
from esp.cli.bench.workload import TraceRequest, load_dataset, load_trace, make_workload
from esp.cli.main import CLIError, engine_config, positive_int, run_async

#: send(prompt_ids, max_tokens, on_token) -> (generated tokens, error message or "")
Sender = Callable[[list[int], int, Callable[[], None]], Awaitable[tuple[int, str]]]


def add_bench_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("bench")
    g.add_argument("--backend", choices=("real", "sim"), default="real", help="in-process engine backend")
    g.add_argument("--profile", help="cost profile (preset or JSON): the TTFT SLO and sim step times")
    g.add_argument("--charge-scheduler", action="store_true",
                   help="with --backend sim: charge each schedule()'s wall time on the virtual clock")
    g.add_argument("--url", help="benchmark this OpenAI-compatible server instead of an in-process engine")
    g.add_argument("--model-name", help="the request's model field with --url (default: first of /v1/models)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--trace", help="JSONL trace file")
    src.add_argument("--dataset", help="shipped dataset name")
    src.add_argument("--suite", choices=("paper-fig10", "paper-fig12", "paper-fig13", "paper-all"),
                     help="LoongServe's evaluation in the simulator, each system in the paper's configuration, "
                          "with the paper's metrics and numbers (esp.cli.bench.paper; other bench flags but "
                          "--json and --seed are ignored)")
    g.add_argument("--num-requests", type=positive_int, default=200)
    rates = g.add_mutually_exclusive_group()
    rates.add_argument("--rate", type=float, help="requests/s (omitted: replay the trace's timestamps)")
    rates.add_argument("--rates", help="comma-separated requests/s: a sweep")
    g.add_argument("--burstiness", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max-context", type=positive_int, help="scale lengths to fit (default: the model's)")
    g.add_argument("--fit", choices=("scale", "scale-input", "clip"), default="scale",
                   help="how lengths fit --max-context (see esp.cli.bench.workload)")
    g.add_argument("--policies", help="comma-separated policy bundles to sweep (default: --policy)")
    g.add_argument("--slo-ttft-scale", type=float, default=5.0, help="TTFT SLO = scale x predicted prefill")
    g.add_argument("--slo-ttft-floor", type=float, default=0.25, help="TTFT SLO floor, seconds")
    g.add_argument("--slo-tpot", type=float, default=0.1, help="TPOT SLO, seconds")
    g.add_argument("--json", dest="json_out", metavar="OUT", help="write config, results and sweep as JSON")
    g.add_argument("--plot", metavar="OUT.png", help="plot attainment and latency against rate")
    g.add_argument("--no-progress", action="store_true")
    from esp.cli.bench.paper import add_suite_flags
    add_suite_flags(p.add_argument_group("--suite"))


def parse_rates(args: argparse.Namespace) -> list[float | None]:
    if args.rates is None and args.rate is None:
        return [None]
    text = args.rates if args.rates is not None else str(args.rate)
    try:
        rates = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise CLIError(f"--rates must be comma-separated numbers, got {text!r}") from None
    if not rates or not all(r > 0 for r in rates):
        raise CLIError(f"rates must be positive requests/s, got {text!r}")
    return sorted(set(rates))


def prompt_ids(seed: int, index: int, length: int, vocab: int) -> list[int]:
    """Deterministic pseudo-random token ids in [3, vocab) for request ``index``."""
    return np.random.default_rng([seed, index]).integers(3, max(vocab, 4), size=length).tolist()


async def replay(workload: list[TraceRequest], prompts: list[list[int]], send: Sender,
                 on_done: Callable[[], None] | None = None) -> tuple[list[RequestRecord], float]:
    """Send each request at its ``arrival_s`` (from now) and record it. Returns the records
    (in workload order) and the run's duration, all on the running loop's clock. One driver
    sleeps from arrival to arrival and starts each request then, so only the requests under way
    hold a task or a timer."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()

    async def one(req: TraceRequest, prompt: list[int]) -> RequestRecord:
        times: list[float] = []
        try:
            n, error = await send(prompt, req.output_len, lambda: times.append(loop.time() - t0))
        except (ValueError, RuntimeError, OSError) as err:
            n, error = 0, str(err) or type(err).__name__
        end = loop.time() - t0
        if on_done is not None:
            on_done()
        return RequestRecord(req.input_len, n, req.arrival_s, times[0] if times else None, tuple(times),
                             None if error else end, not error, error)

    started: dict[int, asyncio.Task] = {}
    try:
        for i in sorted(range(len(workload)), key=lambda i: workload[i].arrival_s):
            delay = t0 + workload[i].arrival_s - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            started[i] = asyncio.create_task(one(workload[i], prompts[i]))
        records = await asyncio.gather(*(started[i] for i in range(len(workload))))
    except BaseException:
        for task in started.values():
            task.cancel()
        raise
    return list(records), loop.time() - t0


def engine_sender(engine) -> Sender:
    from esp.engine.sampling_params import SamplingParams

    async def send(prompt: list[int], max_tokens: int, on_token: Callable[[], None]) -> tuple[int, str]:
        n, error = 0, ""
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0)
        async for out in engine.generate(prompt, params):
            if out.new_token_ids:
                on_token()
                n += len(out.new_token_ids)
            if out.error or out.finish_reason in ("error", "abort"):
                error = out.error or f"request finished with {out.finish_reason}"
        return n, error
    return send


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="req", file=sys.stderr, leave=False)


def _run_loop(coro, backend: str):
    if backend == "sim":
        from esp.engine.sim import run_virtual
        return run_virtual(coro)
    return run_async(coro)


def _workloads(args: argparse.Namespace, rates: list[float | None], max_context: int | None) -> dict:
    try:
        source = load_trace(args.trace) if args.trace else load_dataset(args.dataset)
        return {rate: make_workload(source, args.num_requests, rate, args.seed, args.burstiness, max_context,
                                    fit=args.fit)
                for rate in rates}
    except (ValueError, OSError) as err:
        raise CLIError(str(err)) from None


def _slo(args: argparse.Namespace, cost) -> SLO:
    predict = None if cost is None else (lambda n: cost.prefill_time([n], 1))
    return SLO(args.slo_ttft_scale, args.slo_ttft_floor, args.slo_tpot, predict)


def _prompts(workload: list[TraceRequest], seed: int, vocab: int, synthetic: bool) -> list:
    if synthetic:
        from esp.engine.sim import SyntheticPrompt
        return [SyntheticPrompt(r.input_len) for r in workload]
    return [prompt_ids(seed, i, r.input_len, vocab) for i, r in enumerate(workload)]


async def _replay_with_bar(workload, prompts, send: Sender, desc: str, progress: bool):
    bar = _progress(len(workload), desc, progress)
    try:
        return await replay(workload, prompts, send, bar.update if bar else None)
    finally:
        if bar is not None:
            bar.close()


async def _run_one(args, label: str, rate: float | None, workload, vocab: int, send: Sender, slo: SLO) -> dict:
    prompts = _prompts(workload, args.seed, vocab, args.backend == "sim" and not args.url)
    records, duration = await _replay_with_bar(workload, prompts, send,
                                               f"{label} @ {rate if rate is not None else 'trace'}",
                                               not args.no_progress)
    return summarize(records, duration, slo) | {"records": [r.to_dict() for r in records]}


async def engine_records(cfg, workload: list[TraceRequest], seed: int = 0, label: str = "",
                         progress: bool = False) -> tuple[list[RequestRecord], float, object]:
    """Replay ``workload`` on a fresh in-process engine built from ``cfg`` (real or simulated: run
    it under :func:`esp.engine.sim.run_virtual` for ``backend="sim"``). Returns the records, the
    run's duration and the engine's cost model."""
    from esp.engine.engine import Engine
    async with Engine(cfg) as engine:
        vocab = engine.model_config.vocab_size
        vocab = min(vocab, getattr(engine.tokenizer, "vocab_size", None) or vocab)
        prompts = _prompts(workload, seed, vocab, cfg.backend == "sim")
        records, duration = await _replay_with_bar(workload, prompts, engine_sender(engine), label, progress)
        return records, duration, engine.cost_model


async def bench_engine(args: argparse.Namespace, policies: list[str], rates: list[float | None]) -> dict:
    from esp.engine.model_config import ModelConfig

    base = dataclasses.replace(engine_config(args), max_waiting_requests=None, max_waiting_tokens=sys.maxsize)
    if args.backend == "sim":
        base = dataclasses.replace(base, backend="sim", profile=args.profile, charge_scheduler=args.charge_scheduler)
    elif args.charge_scheduler:
        raise CLIError("--charge-scheduler needs --backend sim")
    max_context = args.max_context or (args.backend == "sim" and args.profile and _cost(args).meta.get("max_context")) \
        or ModelConfig.from_dir(base.model_dir).max_position_embeddings
    workloads = _workloads(args, rates, max_context)
    results: dict[str, dict] = {}
    for policy in policies:
        cfg = dataclasses.replace(base, policy=policy)
        results[policy] = {}
        for rate, workload in workloads.items():
            records, duration, cost = await engine_records(
                cfg, workload, args.seed, f"{policy} @ {rate if rate is not None else 'trace'}", not args.no_progress)
            slo = _slo(args, _cost(args) if args.profile else cost)
            results[policy]["trace" if rate is None else rate] = summarize(records, duration, slo) | {
                "records": [r.to_dict() for r in records]}
    return results


def _cost(args: argparse.Namespace):
    if args.profile:
        from esp.policies.presets import load_profile
        return load_profile(args.profile)
    return None


async def bench_url(args: argparse.Namespace, rates: list[float | None]) -> dict:
    from esp.cli.bench.client import ClientError, CompletionsClient

    async with CompletionsClient(args.url, args.model_name) as client:
        try:
            cards = await client.models()
        except ClientError as err:
            raise CLIError(str(err)) from None
        served = next((c for c in cards if c.get("id") == client.model), cards[0])
        max_context = args.max_context or served.get("max_model_len")
        workloads = _workloads(args, rates, max_context)
        slo = _slo(args, _cost(args))
        return {"remote": {"trace" if rate is None else rate: await _run_one(args, "remote", rate, w, 1000,
                                                                             client.complete, slo)
                           for rate, w in workloads.items()}}


def _ms(stat: dict, key: str) -> str:
    v = stat.get(key)
    return "-" if v is None else f"{v * 1e3:.1f}"


def print_table(results: dict, sweep: dict, out=sys.stdout) -> None:
    head = (f"{'policy':<12} {'rate':>8} {'done':>9} {'ttft_ms':>9} {'ttft_p99':>9} {'tpot_ms':>8} "
            f"{'tpot_p99':>8} {'out_tok/s':>9} {'attain':>7} {'goodput':>8}")
    print(head, file=out)
    for policy, by_rate in results.items():
        for rate, s in by_rate.items():
            att = s["slo_attainment"]
            print(f"{policy:<12} {rate if isinstance(rate, str) else f'{rate:g}':>8} "
                  f"{s['completed']:>4}/{s['num_requests']:<4} {_ms(s['ttft_s'], 'mean'):>9} "
                  f"{_ms(s['ttft_s'], 'p99'):>9} {_ms(s['tpot_s'], 'mean'):>8} {_ms(s['tpot_s'], 'p99'):>8} "
                  f"{s['output_token_throughput']:>9.1f} {'-' if att is None else f'{att:.0%}':>7} "
                  f"{s['goodput']:>8.2f}", file=out)
    for policy, s in sweep.items():
        cap = s["capacity"]
        print(f"capacity {policy}: {'n/a' if cap is None else f'{cap:.3g} req/s'} "
              f"(>= {s['target']:.0%} SLO attainment)", file=out)


def cmd_bench(args: argparse.Namespace) -> int:
    if args.suite:
        from esp.cli.bench.paper import run_suite
        from esp.cli.bench.paper_systems import FIGURES
        name = args.suite.removeprefix("paper-")
        figures = list(FIGURES) if name == "all" else [name]
        command = f"esp-run bench --suite {args.suite}" + " --quick" * args.quick
        run_suite(figures, args, command,
                  log=None if args.no_progress else (lambda s: print(s, file=sys.stderr, flush=True)))
        return 0
    rates = parse_rates(args)
    policies = [p.strip() for p in (args.policies or args.policy).split(",") if p.strip()]
    if not policies:
        raise CLIError("--policies is empty")
    if args.url and args.policies:
        raise CLIError("--policies needs an in-process engine, not --url")
    if args.plot and rates == [None]:
        raise CLIError("--plot needs --rate or --rates")
    if args.url:
        results = run_async(bench_url(args, rates))
    else:
        results = _run_loop(bench_engine(args, policies, rates), args.backend)
    numeric = {p: {r: s for r, s in by_rate.items() if not isinstance(r, str)} for p, by_rate in results.items()}
    sweep = sweep_summary({p: v for p, v in numeric.items() if v})
    print_table(results, sweep)
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump({"config": vars(args), "results": results, "sweep": sweep}, f, indent=1)
    if args.plot:
        from esp.cli.bench.plot import plot_sweep
        plot_sweep(numeric, args.plot, title=f"{args.trace or args.dataset}")
    return 0
