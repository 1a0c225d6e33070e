"""The paper suite's results as tables (terminal and `docs/results.md`) and plots: loong's
value on each metric, its ratio over each baseline and the paper's ratio beside it."""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from esp.cli.bench.paper_metrics import crossing_ratio, format_ratio
from esp.cli.bench.paper_systems import (DATASETS, FIGURES, METRIC_LABEL, PAPER, PAPER_NOTES, SYSTEMS, metrics_of,
                                         threshold)

if TYPE_CHECKING:
    from esp.cli.bench.paper import Result


def table_rows(result: Result) -> list[list[str]]:
    """One row per (dataset, metric): ours for each system, loong's ratio over each baseline and
    the paper's ratio beside it."""
    fig = FIGURES[result.figure]
    datasets = sorted({d for d, _ in result.curves}, key=list(DATASETS).index)
    systems = [s for s in fig.systems if any(k == s for _, k in result.curves)]
    if not systems:
        return []
    base, others = systems[0], systems[1:]
    rows = []
    for d in datasets:
        for m in metrics_of(DATASETS[d]):
            ref = result.capacity(d, base, m)
            row = [d, METRIC_LABEL[m], "n/a" if ref is None else str(ref)]
            for o in others:
                c = result.capacity(d, o, m)
                paper = PAPER.get(("zipf" if d.startswith("zipf") else d, m, o), "-")
                row.append(f"{'n/a' if c is None else c} ({format_ratio(crossing_ratio(ref, c))}; paper {paper})")
            rows.append(row)
    return rows


def markdown(result: Result) -> str:
    """The figure's table for docs/results.md. Each baseline cell: its value (loong's ratio over it;
    the paper's ratio); `>=x`: never crossed up to the highest rate run; `<x`: already over at the
    lowest; a ratio `open`: both sides are open bounds."""
    fig = FIGURES[result.figure]
    systems = [s for s in fig.systems if any(k == s for _, k in result.curves)]
    head = ["dataset", "metric (req/s)"] + [SYSTEMS[s].label + ("" if i else " (ours)")
                                              for i, s in enumerate(systems)]
    lines = [f"**{fig.title}**: {'quick mode, ' if result.quick else ''}{result.wall_s / 60:.1f} min of wall time"
             + (f" (`{result.command}`)" if result.command else "") + "; profiles "
             + ", ".join(f"TP{tp} `{how}`" for tp, how in sorted(result.profiles.items())) + ".", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(result)]
    if any(PAPER.get(k) for k in PAPER if k[2] in systems and k[0] == "zipf") and result.figure == "fig12":
        lines += ["", PAPER_NOTES]
    return "\n".join(lines) + "\n"


def print_table(result: Result, out=None) -> None:
    out = out or sys.stdout
    fig = FIGURES[result.figure]
    systems = [s for s in fig.systems if any(k == s for _, k in result.curves)]
    head = ["dataset", "metric"] + [SYSTEMS[s].label for s in systems]
    rows = table_rows(result)
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    print(f"\n{fig.title} ({result.wall_s:.0f} s wall)", file=out)
    for r in [head] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)), file=out)
    if result.figure == "fig12":
        print(PAPER_NOTES, file=out)


def update_results_md(path: str | Path, result: Result) -> None:
    """Replace the block between `<!-- paper-FIG -->` and `<!-- /paper-FIG -->` in `path` (appended
    at the end when absent); nothing else in the file changes."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    begin, end = f"<!-- paper-{result.figure} -->", f"<!-- /paper-{result.figure} -->"
    block = f"{begin}\n{markdown(result)}{end}"
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")


def plot(result: Result, out_png: str | Path) -> str:
    """Each metric over its SLO against the rate, one panel per (dataset, metric) (plot.plot_paper)."""
    from esp.cli.bench.plot import plot_paper
    curves: dict = {}
    limits: dict = {}
    for (d, s), pts in result.curves.items():
        spec = DATASETS[d]
        limits[d] = {METRIC_LABEL[m]: threshold(spec, m) for m in metrics_of(spec)}
        curves.setdefault(d, {})[SYSTEMS[s].label] = [
            (p.rate, {METRIC_LABEL[m]: p.value(m) for m in metrics_of(spec)}) for p in pts]
    return plot_paper(curves, limits, str(out_png), FIGURES[result.figure].title)
