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
