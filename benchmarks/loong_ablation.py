"""What each of loong's mechanisms beyond the paper buys, in the calibrated simulator (docs/loong.md).

Runs loong on 4 x TP2 (`a800-lwm7b-tp2`) with its mechanisms switched on one at a time, from the
paper's scheduler (arrival order, a prefill takes decoding instances whenever none other is
idle, no KV spreading, no consolidation, long prefills on every instance) to today's default, on
the paper's datasets at fixed rates near the baselines' capacities. Prints, per run, the paper's
mean normalized per-token latency (ms/token), the share of requests within the paper's
P90-goodput SLO, the share within this project's length-aware SLO, and the median TPOT of
requests under 8K tokens, each the mean over `--seeds` workloads (arrival times and lengths
drawn with seeds 0, 1, ...; near capacity one workload's shares swing by tens of points), with
the shares' lowest and highest:

    .venv/bin/python benchmarks/loong_ablation.py [--json OUT.json] [--doc docs/loong.md] \
        [--requests N] [--seeds N]

`--doc` writes the table between `<!-- loong-ablation -->` and `<!-- /loong-ablation -->` there.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path

import numpy as np

from esp.cli.bench.paper import resolve_profile, run_point, share_slos
from esp.cli.bench.paper_systems import DATASETS, SYSTEMS
from esp.cli.bench.workload import load_dataset, make_workload
from esp.costs.presets import load_profile

PAPER = {"order": "fcfs", "preempt": "always", "spread_kv": False, "consolidate": False, "keep_free": 0}
VARIANTS = (
    ("the paper's scheduler", PAPER),
    ("+ response-ratio order", PAPER | {"order": "hrrn"}),
    ("+ pauses decodes tolerate", PAPER | {"order": "hrrn", "preempt": "tolerable"}),
    ("+ KV spread, consolidation", {"keep_free": 0}),
    ("+ room for arrivals", {"keep_free_patience": 0}),
    ("+ long prompts wait for room", {"keep_free_solo_after_s": "inf"}),
    ("+ also for one-instance prefills", {"keep_free_after_s": 1.0}),
    ("+ room only past 2 s (default)", {}),
    ("default, FCFS order", {"order": "fcfs"}),
)
#: (dataset, rate): near where vLLM-TP8 and chunked-TP8 cross the per-token SLO (docs/results.md)
POINTS = (("mixed", 0.4), ("lveval", 0.15), ("leval", 2.3), ("zipf-1.2", 1.8))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", dest="json_out")
    ap.add_argument("--requests", type=int, help="requests per run (default: the suite's per dataset)")
    ap.add_argument("--doc", help="markdown file whose loong-ablation block gets the table")
    ap.add_argument("--seeds", type=int, default=4, help="workloads per point (default 4)")
    args = ap.parse_args(argv)
    profile, _ = resolve_profile(2)
    slos = share_slos(load_profile(profile))
    rows = []
    print(f"{'dataset':9s} {'rate':>6s}  {'variant':38s} {'per-token ms':>12s} {'P90 SLO':>15s} "
          f"{'esp SLO':>15s} {'TPOT<8K ms':>10s}")
    for name, rate in POINTS:
        spec = DATASETS[name]
        source = load_dataset(name)
        workloads = [make_workload(source, args.requests or spec.requests, rate, seed) for seed in range(args.seeds)]
        for label, options in VARIANTS:
            system = dataclasses.replace(SYSTEMS["loong"], options=options)
            runs = [measure(run_point(system, profile, spec, w, rate, slos)) for w in workloads]
            row = {"dataset": name, "rate": rate, "variant": label, "options": options, "seeds": runs}
            row |= {key: mean([run[key] for run in runs]) for key in runs[0]}
            rows.append(row)
            print(f"{name:9s} {rate:6g}  {label:38s} {row['per_token_ms']:12.2f} {share(row, 'p90_share'):>15s} "
                  f"{share(row, 'esp_share'):>15s} {row['short_tpot_p50_ms'] or float('nan'):10.1f}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=1)
    if args.doc:
        write_block(Path(args.doc), markdown(rows, args))
    return 0


def measure(p) -> dict:
    short = [r.tpot_s for r in p.records if r.completed and r.input_len < 8192 and r.tpot_s is not None]
    return {"per_token_ms": None if p.latency["per_token"] is None else p.latency["per_token"] * 1e3,
            "p90_share": p.shares["p90"], "esp_share": p.shares["attain"],
            "short_tpot_p50_ms": float(np.median(short)) * 1e3 if short else None}


def mean(values: list) -> float | None:
    return None if any(v is None for v in values) else float(np.mean(values))


def share(row: dict, key: str) -> str:
    """`mean% (lowest-highest)` over the seeds."""
    values = [run[key] for run in row["seeds"]]
    return f"{row[key]:.1%} ({min(values) * 100:.0f}-{max(values) * 100:.0f})"


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    command = "python benchmarks/loong_ablation.py" + (f" --requests {args.requests}" if args.requests else "") \
        + (f" --seeds {args.seeds}" if args.seeds != 4 else "")
    lines = [f"`{command}` (deterministic: the simulator's clock is virtual). Each figure is the mean over "
             f"{args.seeds} workloads (seeds 0-{args.seeds - 1}); in brackets, the lowest and highest share.", "",
             "| dataset @ req/s | variant | per-token ms | P90 SLO | esp SLO | TPOT < 8K ms |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        tpot = "-" if r["short_tpot_p50_ms"] is None else f"{r['short_tpot_p50_ms']:.1f}"
        lines.append(f"| {r['dataset']} @ {r['rate']:g} | {r['variant']} | {r['per_token_ms']:.2f} | "
                     f"{share(r, 'p90_share')} | {share(r, 'esp_share')} | {tpot} |")
    return "\n".join(lines) + "\n"


def write_block(path: Path, block: str) -> None:
    begin, end = "<!-- loong-ablation -->", "<!-- /loong-ablation -->"
    text = path.read_text(encoding="utf-8")
    text = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: f"{begin}\n{block}{end}", text, flags=re.S)
    path.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    raise SystemExit(main())
