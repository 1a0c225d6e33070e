"""LoongServe's metrics (SOSP 2024, ``ae-plot-fig-10-11-12.py``) over the bench's per-request
records: normalized latencies, the P90-goodput SLO, and the capacity rule, where a curve over the
request rate first crosses its SLO, with ratios of such crossings that keep their bounds."""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from esp.cli.bench.metrics import SLO, RequestRecord
def normalized_latencies(records: Sequence[RequestRecord]) -> dict[str, float | None]:
    """LoongServe's normalized latencies (seconds per token), means over the requests of one run:
    ``per_token`` = E2E / (input + output), ``input`` = TTFT / input, ``output`` = TPOT, where a
    request with at most one output token counts TPOT 0, as LoongServe's ``ReqResult`` does.
    A run in which any request failed has no latency a client could have seen for it: every value
    is ``inf`` then (the system does not serve that load). None for an empty run."""
    if not records:
        return dict.fromkeys(("per_token", "input", "output"))
    if not all(r.completed for r in records):
        return dict.fromkeys(("per_token", "input", "output"), math.inf)
    per_token = [r.e2e_s / max(1, r.input_len + r.output_len) for r in records]
    inp = [r.ttft_s / max(1, r.input_len) for r in records]
    out = [r.tpot_s or 0.0 for r in records]
    return {"per_token": float(np.mean(per_token)), "input": float(np.mean(inp)), "output": float(np.mean(out))}


def attainment(records: Sequence[RequestRecord], slo: SLO) -> float | None:
    """Fraction of all requests that met ``slo`` (failed requests are misses)."""
    return sum(1 for r in records if slo.attained(r)) / len(records) if records else None


def paper_goodput_slo(predict_prefill: Callable[[int], float] | None) -> SLO:
    """The SLO of LoongServe's P90 goodput (Fig. 12): TTFT <= max(25 x the predicted solo prefill,
    15 s) and TPOT <= 50 ms (one-token outputs: TTFT only)."""
    return SLO(ttft_scale=25.0, ttft_floor_s=15.0, tpot_s=0.05, predict_prefill=predict_prefill)


@dataclass(frozen=True)
class Crossing:
    """Where a curve over the request rate leaves its good side. ``bound``: ``"="`` an
    interpolated crossing; ``">="`` the curve never left it (``rate`` is the highest measured);
    ``"<"`` it was already bad at the lowest measured rate (``rate`` is that rate)."""

    rate: float
    bound: str = "="

    def to_dict(self) -> dict:
        return {"rate": self.rate, "bound": self.bound}

    def __str__(self) -> str:
        return f"{'' if self.bound == '=' else self.bound}{self.rate:.3g}"


def first_crossing(rates: Sequence[float], values: Sequence[float | None], threshold: float,
                   higher_is_better: bool = False) -> Crossing | None:
    """The paper's capacity rule (LoongServe's ``get_intersection_point``): sort the points by
    rate (None values dropped), find the first pair where the curve goes from good (``value <=
    threshold``, or ``>=`` with ``higher_is_better``) to bad, and interpolate linearly where it
    meets ``threshold``; an infinite value (a run with failures) puts the crossing at the last good
    rate. Unlike :func:`capacity`, a later recovery does not count. None without points."""
    if len(rates) != len(values):
        raise ValueError("rates and values differ in length")
    pts = sorted((float(r), float(v)) for r, v in zip(rates, values) if v is not None)
    if not pts:
        return None

    def good(v: float) -> bool:
        return v >= threshold if higher_is_better else v <= threshold

    if not good(pts[0][1]):
        return Crossing(pts[0][0], "<")
    for (r0, v0), (r1, v1) in itertools.pairwise(pts):
        if good(v1):
            continue
        if not math.isfinite(v1):
            return Crossing(r0)
        return Crossing(r0 + (threshold - v0) * (r1 - r0) / (v1 - v0))
    return Crossing(pts[-1][0], ">=")


def crossing_ratio(a: Crossing | None, b: Crossing | None) -> tuple[float, str] | None:
    """a / b with what the bounds allow: ``("=", x)`` exact, ``">="``/``">"`` at least, ``"<="``/``"<"``
    at most, ``"?"`` when both are open the same way. None if either is missing."""
    if a is None or b is None or b.rate <= 0:
        return None
    x = a.rate / b.rate
    qa, qb = a.bound, b.bound
    if qa == "=" and qb == "=":
        return x, "="
    if qa in ("=", ">=") and qb in ("=", "<"):
        return x, ">" if qb == "<" else ">="
    if qa in ("=", "<") and qb in ("=", ">="):
        return x, "<" if qa == "<" else "<="
    return x, "?"


def format_ratio(r: tuple[float, str] | None) -> str:
    if r is None:
        return "n/a"
    x, q = r
    return "open" if q == "?" else f"{'' if q == '=' else q}{x:.2f}x"
