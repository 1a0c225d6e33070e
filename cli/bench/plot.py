"""PNG plots of a rate sweep: SLO attainment and per-token latency against request rate."""
from __future__ import annotations

import math

from .metrics import sweep_summary


def _require_matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "plotting needs matplotlib: pip install 'esp-serve[bench]' (or pip install matplotlib)"
        ) from e
    return Figure, FigureCanvasAgg


def _nan(v: float | None) -> float:
    return math.nan if v is None else float(v)


def plot_sweep(results: dict[str, dict[float, dict]], out_png: str, title: str = "",
               target: float = 0.9) -> str:
    """Two panels, one line per policy: SLO attainment vs rate (with the ``target`` line)
    and mean per-token latency (E2E / (input+output)) vs rate. ``results[policy][rate]`` is a
    :func:`~esp.cli.bench.metrics.summarize` dict. Uses the Agg canvas directly (no pyplot, no
    global backend change). Returns ``out_png``."""
    Figure, FigureCanvasAgg = _require_matplotlib()
    sweep = sweep_summary(results, target)
    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)
    ax_att, ax_lat = fig.subplots(1, 2)
    for policy, s in sweep.items():
        rates = s["rates"]
        att = [_nan(a) * 100 for a in s["slo_attainment"]]
        cap = s["capacity"]
        label = f"{policy} (capacity {cap:.3g} req/s)" if cap is not None else f"{policy} (capacity n/a)"
        ax_att.plot(rates, att, marker="o", label=label)
        ax_lat.plot(rates, [_nan(v) * 1e3 for v in s["mean_per_token_latency_s"]], marker="o", label=policy)
    ax_att.axhline(target * 100, color="grey", linestyle="--", linewidth=1, label=f"{target:.0%} target")
    ax_att.set_xlabel("request rate (req/s)")
    ax_att.set_ylabel("SLO attainment (%)")
    ax_att.set_ylim(-2, 102)
    ax_att.set_title("SLO attainment")
    ax_lat.set_xlabel("request rate (req/s)")
    ax_lat.set_ylabel("mean per-token latency (ms/token)")
    ax_lat.set_title("per-token latency (E2E / (input+output))")
    for ax in (ax_att, ax_lat):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    return out_png


def plot_paper(curves: dict[str, dict[str, list[tuple[float, dict[str, float | None]]]]],
               limits: dict[str, dict[str, tuple[float, bool]]], out_png: str, title: str = "") -> str:
    """LoongServe's Fig. 10 / 12 layout: one row per dataset, one panel per metric, each metric
    divided by its SLO (1.0 is the SLO line; for attainment, share of the 90% target), one line per
    system. ``curves[dataset][system]`` = [(rate, {metric: value})]; ``limits[dataset][metric]`` =
    (threshold, higher_is_better). Returns ``out_png``."""
    Figure, FigureCanvasAgg = _require_matplotlib()
    rows = list(curves)
    metrics = max((list(limits[d]) for d in rows), key=len)
    fig = Figure(figsize=(4.2 * len(metrics), 3.2 * len(rows)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), len(metrics), squeeze=False)
    for i, d in enumerate(rows):
        for j, m in enumerate(metrics):
            ax = axes[i][j]
            if m not in limits[d]:
                ax.set_visible(False)
                continue
            thr, _ = limits[d][m]
            for system, pts in curves[d].items():
                xs = [r for r, v in pts if v.get(m) is not None]
                ys = [min(v[m] / thr, 5.0) for r, v in pts if v.get(m) is not None]
                ax.plot(xs, ys, marker="o", markersize=3, label=system)
            ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
            ax.set_ylim(0, 1.6)
            ax.set_xlim(left=0)
            ax.set_title(f"{d}: {m}", fontsize="small")
            ax.grid(True, alpha=0.3)
            if i == len(rows) - 1:
                ax.set_xlabel("request rate (req/s)")
            if j == 0:
                ax.set_ylabel("value / SLO")
    axes[0][0].legend(fontsize="x-small")
    if title:
        fig.suptitle(title, fontsize="small")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    return out_png
