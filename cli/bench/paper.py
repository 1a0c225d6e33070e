"""LoongServe's evaluation (SOSP 2024, arXiv 2404.09526: Fig. 10, 12 and 13) in the simulator, in
one command::

    python benchmarks/paper.py fig10|fig12|fig13|all [--quick] [--json OUT.json.gz] [--results-md docs/results.md]
    esp-run bench --suite paper-fig10 [--quick]

Each system runs in the paper's configuration, its TP degree expressed by the simulator's cost
profile (`a800-lwm7b-tp{1,2,4,8}`, see :func:`resolve_profile`):

- ``loong``: ESP on 4 instances x TP2;
- ``vllm-tp8``: the vLLM-like ``replicas`` bundle (prefill-first) on 1 instance x TP8; in Fig. 12
  this is "LoongServe w/o ESP (TP=8)";
- ``chunked-tp8``: chunked prefill (SplitFuse) on 1 x TP8 with the paper's chunk sizes: 256
  ShareGPT, 2048 L-Eval, 16384 LV-Eval, 2048 Mixed, 512 Zipf;
- ``disagg-tp4``: DistServe-like, 1 x TP4 prefill + 1 x TP4 decode;
- ``static-sp4tp2``: ``static-sp`` on 4 x TP2 (TP2.SP4);
- ``replicas-tp2x4``: ``replicas`` on 4 x TP2 (TP2 x 4);
- ``loong-no-scaleup``: ``loong`` without decode scale-up (Fig. 13; see :data:`NO_SCALE_UP`);
- ``loong-fcfs``: ``loong`` dispatching in arrival order, as the paper does (Fig. 10's ablation of
  the response-ratio order);
- ``loong-slo``: ``loong`` with every request telling it the project's SLO (below) as its ``slo``
  (TTFT and TPOT targets), as a client would.

Metrics, from the per-request records of each run (LoongServe's ``ae-plot-fig-10-11-12.py``):

- **capacity** (Fig. 10, 13): the rate where the mean normalized latency (per-token
  E2E/(in+out), input TTFT/in, output TPOT) first crosses the dataset's SLO (:data:`DATASETS`),
  by linear interpolation (:func:`~esp.cli.bench.paper_metrics.first_crossing`);
- **P90 goodput** (Fig. 12, and every dataset here): the rate where the share of requests with
  TTFT <= max(25 x the predicted solo prefill at SP4TP2, 15 s) and TPOT <= 50 ms first falls
  under 90%;
- **90% attainment** (this project's, every dataset): the same with `esp-run bench`'s length-aware
  SLO, TTFT <= max(5 x the predicted solo prefill on one TP2 instance, 0.25 s), TPOT <= 100 ms.

Rates: each (dataset, system) walks a geometric ladder (x1.5) from a start rate derived from the
cost model (:func:`start_rate`), down while the lowest rate already misses, up until every
stopping metric (all but the output latency) has crossed or the system is saturated (every
request arrived within the first fifth of the run: a higher rate changes nothing; a run with a
failed request is over every latency SLO, and its failures count against the shares), then bisects
each bracketing pair once (geometric mean). Every
system sees the same requests at a given rate (one seed). A run in which any request fails
(refused, or out of memory) counts as over every latency SLO.
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from esp.cli.bench.metrics import SLO, RequestRecord
from esp.cli.bench.paper_metrics import Crossing, attainment, first_crossing, normalized_latencies, paper_goodput_slo
from esp.cli.bench.paper_report import plot, print_table, update_results_md
from esp.cli.bench.paper_systems import (DATASETS, FIGURES, LATENCY_METRICS, SHARE_METRICS, SYSTEMS, DatasetSpec,
                                         System, metrics_of, threshold)
from esp.cli.bench.workload import TraceRequest, load_dataset, make_workload
from esp.cli.main import policy_option
from esp.costs.presets import load_profile


# --------------------------------------------------------------------------- profiles
def resolve_profile(tp: int, tmpdir: Path | None = None) -> tuple[str, str]:
    """The simulator profile of a TP-`tp` instance and how it was found: the calibrated preset
    `a800-lwm7b-tp{tp}` when it loads; else a roofline with `tp` (written as JSON under `tmpdir`);
    else the one-GPU `a800-lwm7b` preset (TP not modeled)."""
    name = f"a800-lwm7b-tp{tp}"
    try:
        cost = load_profile(name)
        return name, f"{name} ({cost.meta.get('source', 'preset')})"
    except (ValueError, ImportError):
        pass
    try:
        from esp.policies.presets import A800_80GB, LWM_7B, roofline_profile
        cost = roofline_profile(LWM_7B, A800_80GB, tp=tp)
        path = Path(tmpdir or ".") / f"roofline-a800-lwm7b-tp{tp}.json"
        path.write_text(json.dumps(cost.to_json()))
        return str(path), f"roofline_profile(tp={tp}) (no calibrated preset)"
    except (ImportError, TypeError, AttributeError):
        return "a800-lwm7b", "a800-lwm7b (one GPU per instance: TP not modeled)"


# --------------------------------------------------------------------------- one run
@dataclass
class Point:
    rate: float
    records: list[RequestRecord]
    duration_s: float
    wall_s: float
    latency: dict[str, float | None]  # seconds per token
    shares: dict[str, float | None]  # per SHARE_METRICS key: the share of requests within its SLO

    @property
    def goodput(self) -> float | None:
        """The share of requests within the P90-goodput SLO."""
        return self.shares["p90"]

    @property
    def saturated(self) -> bool:
        """Every request had arrived before a fifth of the run was over: a higher rate only
        compresses the arrivals of a backlog the system drains at its own pace."""
        return max(r.arrival_s for r in self.records) < 0.2 * self.duration_s

    def value(self, metric: str) -> float | None:
        return self.shares[metric] if metric in SHARE_METRICS else self.latency[metric]

    def to_dict(self) -> dict:
        return {"rate": self.rate, "duration_s": self.duration_s, "wall_s": round(self.wall_s, 3),
                "normalized_latency_s": self.latency, "p90_attainment": self.goodput,
                "esp_attainment": self.shares["attain"],
                "failed": sum(1 for r in self.records if not r.completed),
                "records": {k: [rec[k] for rec in (r.to_dict() for r in self.records)]
                            for k in ("arrival_s", "input_len", "output_len", "first_token_s", "end_s",
                                      "ttft_s", "tpot_s", "success", "error")}}


def engine_config(system: System, profile: str, chunk: int, slo: SLO | None = None):
    """`slo`: the project's, which the engine serves if `system.serves_slo`."""
    from esp.engine.config import EngineConfig
    options = dict(system.options) | ({"chunk_size": chunk} if system.chunked else {})
    return EngineConfig(instances=system.instances, policy=system.policy, backend="sim", profile=profile,
                        policy_options=options, max_waiting_requests=None, max_waiting_tokens=sys.maxsize,
                        log_requests=False, slo=slo.service() if system.serves_slo and slo else None)


def run_point(system: System, profile: str, dataset: DatasetSpec, workload: list[TraceRequest], rate: float,
              slos: Mapping[str, SLO], seed: int = 0) -> Point:
    from esp.cli.bench.runner import engine_records
    from esp.engine.sim import run_virtual
    t0 = time.perf_counter()
    records, duration, _ = run_virtual(engine_records(engine_config(system, profile, dataset.chunk, slos["attain"]),
                                                      workload, seed))
    return Point(rate, records, duration, time.perf_counter() - t0, normalized_latencies(records),
                 {m: attainment(records, slo) for m, slo in slos.items()})


def share_slos(tp2_cost) -> dict[str, SLO]:
    """The SLO of each share metric, predicting solo prefills with the TP2 profile: the paper's P90
    goodput (TTFT <= max(25 x the prefill at SP4TP2, 15 s), TPOT <= 50 ms) and the project's
    length-aware attainment (`esp-run bench`'s default: TTFT <= max(5 x the prefill on one TP2
    instance, 0.25 s), TPOT <= 100 ms)."""
    return {"p90": paper_goodput_slo(lambda n: tp2_cost.prefill_time([n], 4)),
            "attain": SLO(5.0, 0.25, 0.1, lambda n: tp2_cost.prefill_time([n], 1))}


# --------------------------------------------------------------------------- the rate ladder
def crossing(points: Sequence[Point], dataset: DatasetSpec, metric: str) -> Crossing | None:
    thr, higher = threshold(dataset, metric)
    return first_crossing([p.rate for p in points], [p.value(metric) for p in points], thr, higher)


def start_rate(dataset: DatasetSpec, tp2_cost) -> float:
    """Where the ladder starts: a quarter of what 4 x TP2 instances could prefill back to back (each
    request alone on one instance, decode ignored); the ladder walks down and up from there."""
    lengths = [r.input_len for r in load_dataset(dataset.name)]
    mean_prefill = float(np.mean([tp2_cost.prefill_time([n], 1) for n in lengths[::max(1, len(lengths) // 400)]]))
    return 0.25 * 4 / mean_prefill


def _round_rate(r: float) -> float:
    return float(f"{r:.4g}")


def sweep(system: System, profile: str, dataset: DatasetSpec, r0: float, n: int, slos: Mapping[str, SLO], *,
          seed: int = 0,
          factor: float = 1.5, max_up: int = 9, max_down: int = 3, refine: bool = True,
          log=None) -> list[Point]:
    """Run `system` on `dataset` at the rates of the ladder (see the module docstring)."""
    source = load_dataset(dataset.name)
    points: dict[float, Point] = {}
    stop = [m for m in metrics_of(dataset) if m != "output"]  # TPOT alone may never cross

    def at(k: float) -> Point:
        rate = _round_rate(r0 * factor ** k)
        if rate not in points:
            p = run_point(system, profile, dataset, make_workload(source, n, rate, seed), rate, slos, seed)
            points[rate] = p
            if log:
                lat = " ".join(f"{m}={'-' if p.latency[m] is None else f'{p.latency[m] * 1e3:.3g}'}"
                               for m in LATENCY_METRICS if dataset.slo_ms)
                log(f"  {dataset.name:9s} {system.key:17s} rate {rate:<8g} {lat} p90={p.goodput:.0%} "
                    f"attain={p.shares['attain']:.0%} "
                    f"failed={sum(1 for r in p.records if not r.completed)} wall {p.wall_s:.1f}s")
        return points[rate]

    def ordered() -> list[Point]:
        return [points[r] for r in sorted(points)]

    lo = hi = 0
    at(0)
    while lo > -max_down and any(crossing(ordered(), dataset, m).bound == "<" for m in stop):
        lo -= 1
        at(lo)
    while hi < max_up and any(crossing(ordered(), dataset, m).bound == ">=" for m in stop):
        if ordered()[-1].saturated:
            break
        hi += 1
        at(hi)
    if refine:
        ladder = sorted(points)
        for m in stop:
            c = crossing(ordered(), dataset, m)
            if c is None or c.bound != "=":
                continue
            below = [r for r in ladder if r <= c.rate]
            above = [r for r in ladder if r > c.rate]
            if below and above and above[0] / below[-1] > 1.2:
                k = math.log(math.sqrt(below[-1] * above[0]) / r0, factor)
                at(k)
    return ordered()


# --------------------------------------------------------------------------- the suite
@dataclass
class Result:
    figure: str
    profiles: dict[int, str]
    curves: dict[tuple[str, str], list[Point]]  # (dataset, system) -> points
    wall_s: float = 0.0
    quick: bool = False
    command: str = ""

    def capacity(self, dataset: str, system: str, metric: str) -> Crossing | None:
        return crossing(self.curves[(dataset, system)], DATASETS[dataset], metric)


def run_figure(name: str, *, quick: bool = False, datasets: Sequence[str] | None = None,
               systems: Sequence[str] | None = None, requests: int | None = None, seed: int = 0,
               loong_options: Mapping | None = None, log=print, tmpdir: Path | None = None,
               command: str = "") -> Result:
    """`loong_options`: policy options added to every loong system's (e.g. another TPOT target)."""
    fig = FIGURES[name]
    log = log or (lambda _: None)
    t0 = time.perf_counter()
    datasets = list(datasets or fig.datasets)
    systems = list(systems or fig.systems)
    profiles, how = {}, {}
    for key in systems:
        tp = SYSTEMS[key].tp
        if tp not in profiles:
            profiles[tp], how[tp] = resolve_profile(tp, tmpdir)
    tp2 = profiles.get(2) or resolve_profile(2, tmpdir)[0]
    tp2_cost = load_profile(tp2)
    log(f"{fig.title}")
    log("profiles: " + "; ".join(f"TP{tp}: {how[tp]}" for tp in sorted(profiles)))
    slos = share_slos(tp2_cost)
    curves = {}
    for d in datasets:
        spec = DATASETS[d]
        n = requests or (spec.quick_requests if quick else spec.requests)
        r0 = start_rate(spec, tp2_cost)
        for key in systems:
            system = SYSTEMS[key]
            if loong_options and system.policy == "loong":
                system = replace(system, options=dict(system.options) | dict(loong_options))
            curves[(d, key)] = sweep(system, profiles[system.tp], spec, r0, n, slos, seed=seed,
                                     max_up=3 if quick else 9, max_down=1 if quick else 5, refine=not quick,
                                     factor=2.0 if quick else 1.5, log=log)
    return Result(name, {tp: how[tp] for tp in profiles}, curves, time.perf_counter() - t0, quick, command)


def to_json(result: Result) -> dict:
    return {"figure": result.figure, "quick": result.quick, "wall_s": result.wall_s, "profiles": result.profiles,
            "command": result.command,
            "slo_ms": {d: DATASETS[d].slo_ms for d, _ in result.curves},
            "capacity": {f"{d}/{s}": {m: (lambda c: None if c is None else c.to_dict())(result.capacity(d, s, m))
                                      for m in metrics_of(DATASETS[d])} for d, s in result.curves},
            "runs": {f"{d}/{s}": [p.to_dict() for p in pts] for (d, s), pts in result.curves.items()}}


def from_json(data: Mapping) -> Result:
    """A :class:`Result` back from :func:`to_json`: every metric recomputed from the records (the
    P90-goodput SLO from today's TP2 profile)."""
    slos = share_slos(load_profile(resolve_profile(2)[0]))
    curves = {}
    for key, runs in data["runs"].items():
        d, s = key.split("/")
        pts = []
        for run in runs:
            cols = run["records"]
            recs = [RequestRecord.from_dict(dict(zip(cols, row))) for row in zip(*cols.values())]
            pts.append(Point(run["rate"], recs, run["duration_s"], run["wall_s"], normalized_latencies(recs),
                             {m: attainment(recs, slo) for m, slo in slos.items()}))
        curves[(d, s)] = pts
    return Result(data["figure"], {int(tp): how for tp, how in data["profiles"].items()}, curves, data["wall_s"],
                  data["quick"], data.get("command", ""))


def read_json(path: str | Path) -> list[Result]:
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [from_json(v) for v in json.load(f).values()]


def write_json(path: str | Path, results: Sequence[Result]) -> None:
    data = json.dumps({r.figure: to_json(r) for r in results}, separators=(",", ":"))
    path = Path(path)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(data)
    else:
        path.write_text(data, encoding="utf-8")


def add_suite_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="a few small runs per system (the test's mode)")
    p.add_argument("--datasets", help="comma-separated subset of the figure's datasets")
    p.add_argument("--systems", help="comma-separated subset of the figure's systems (the first is compared)")
    p.add_argument("--requests", type=int, help="requests per run (default: per dataset)")
    p.add_argument("--loong-option", type=policy_option, action="append", default=[], metavar="KEY=VALUE",
                   help="a policy option added to every loong system's (repeatable), e.g. tpot_target_s=0.07")
    p.add_argument("--results-md", metavar="MD", help="write the table into this markdown file's paper block")
    p.add_argument("--plot-dir", metavar="DIR", help="write paper-FIG.png there (needs matplotlib)")
    p.add_argument("--from-json", metavar="IN", help="render the tables (and --results-md, --plot-dir) of an earlier "
                   "--json, recomputing every metric from its records, instead of running")


def run_suite(figures: Sequence[str], args: argparse.Namespace, command: str, log=print) -> list[Result]:
    results = []
    earlier = {r.figure: r for r in read_json(args.from_json)} if args.from_json else {}
    for name in figures:
        if args.from_json:
            if name not in earlier:
                raise ValueError(f"{args.from_json} has no {name}; it has {', '.join(earlier) or 'nothing'}")
            res = earlier[name]
        else:
            res = run_figure(name, quick=args.quick, seed=getattr(args, "seed", 0) or 0,
                             datasets=args.datasets.split(",") if args.datasets else None,
                             systems=args.systems.split(",") if args.systems else None,
                             requests=args.requests, loong_options=dict(args.loong_option), log=log,
                             command=command)
        print_table(res)
        results.append(res)
        if args.plot_dir:
            plot(res, Path(args.plot_dir) / f"paper-{name}.png")
        if args.results_md:
            update_results_md(args.results_md, res)
    json_out = getattr(args, "json_out", None)
    if json_out and not args.from_json:
        write_json(json_out, results)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("figure", choices=[*FIGURES, "all"])
    ap.add_argument("--json", dest="json_out", metavar="OUT", help="runs, per-request records and capacities "
                    "(gzip when OUT ends in .gz)")
    ap.add_argument("--seed", type=int, default=0)
    add_suite_flags(ap)
    args = ap.parse_args(argv)
    figures = list(FIGURES) if args.figure == "all" else [args.figure]
    command = "python benchmarks/paper.py " + " ".join(argv if argv is not None else sys.argv[1:])
    t0 = time.perf_counter()
    run_suite(figures, args, command, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(f"\nsuite wall time: {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
