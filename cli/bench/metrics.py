"""Benchmark metrics: vLLM-bench latencies, LoongServe normalized latencies, SLO attainment.

All times are seconds on one clock (seconds since the bench started): ``arrival_s`` is the
scheduled send time, so TTFT and E2E include any client-side lateness. Definitions follow
vLLM's ``benchmarks/benchmark_serving.py``:

- TTFT = first token time - arrival; E2E = end - arrival;
- TPOT = (E2E - TTFT) / (output_len - 1), only for output_len > 1;
- ITL = gaps between consecutive ``token_times`` of a request, pooled over all requests
  (a chunk carrying several tokens yields one gap, as in vLLM);
- percentiles use ``numpy.percentile`` (linear interpolation).

LoongServe adds per-token latency E2E / (input + output), input-token latency TTFT / input
(input_len > 0) and output-token latency (= TPOT), and the SLO of :class:`SLO`.

A record is *completed* iff ``success`` and it has an end time and a first-token time
(``first_token_s``, else ``token_times[0]``); every other record counts as *failed*.
Failed records are excluded from latency statistics and token throughputs but count as
SLO misses. Statistics of an empty set are ``None``; rates over zero duration are 0.0.
"""
from __future__ import annotations

import re

import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from esp.engine.slo import ServiceSLO, length_aware_ttft

#: Default prompt-length bucket edges (tokens): [0,1K), [1K,8K), [8K,32K), [32K,128K), [128K,inf).
DEFAULT_BUCKETS: tuple[int, ...] = (0, 1024, 8192, 32768, 131072)


@dataclass(frozen=True)
class RequestRecord:
    """One replayed request, as measured by the bench client."""

    input_len: int
    output_len: int  # tokens actually generated
    arrival_s: float  # scheduled send time
    first_token_s: float | None
    token_times: tuple[float, ...]  # time of each output chunk, first token included
    end_s: float | None
    success: bool
    error: str = ""

    @property
    def completed(self) -> bool:
        return self.success and self.end_s is not None and self.ttft_s is not None

    @property
    def ttft_s(self) -> float | None:
        first = self.first_token_s
        if first is None and self.token_times:
            first = self.token_times[0]
        return None if first is None else first - self.arrival_s

    @property
    def e2e_s(self) -> float | None:
        return None if self.end_s is None else self.end_s - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        """(E2E - TTFT) / (output_len - 1); None for output_len <= 1 or missing times."""
        ttft, e2e = self.ttft_s, self.e2e_s
        if self.output_len <= 1 or ttft is None or e2e is None:
            return None
        return (e2e - ttft) / (self.output_len - 1)

    @property
    def itls_s(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in itertools.pairwise(t)]

    def to_dict(self) -> dict:
        """The per-request record the bench's JSON carries (times in seconds since the bench
        started; ``ttft_s``/``tpot_s`` derived, None where undefined; ``token_times`` left out)."""
        def r(x: float | None) -> float | None:
            return None if x is None else round(float(x), 6)
        return {"arrival_s": r(self.arrival_s), "input_len": self.input_len, "output_len": self.output_len,
                "first_token_s": r(self.first_token_s if self.first_token_s is not None
                                   else (self.token_times[0] if self.token_times else None)),
                "end_s": r(self.end_s), "ttft_s": r(self.ttft_s), "tpot_s": r(self.tpot_s),
                "success": self.success, "error": self.error}

    @classmethod
    def from_dict(cls, d: dict) -> RequestRecord:
        """Inverse of :meth:`to_dict` (``token_times`` holds the first token only)."""
        first = d.get("first_token_s")
        return cls(int(d["input_len"]), int(d["output_len"]), float(d["arrival_s"]), first,
                   () if first is None else (first,), d.get("end_s"), bool(d["success"]), d.get("error", ""))


@dataclass(frozen=True)
class SLO:
    """Length-aware SLO (LoongServe / DistServe style).

    TTFT limit = max(ttft_floor_s, ttft_scale * predict_prefill(input_len)), or just
    ``ttft_floor_s`` when ``predict_prefill`` is None. A request attains the SLO iff it
    completed, TTFT <= that limit and TPOT <= ``tpot_s``; for one-token outputs TPOT is
    undefined and only TTFT counts.
    """

    ttft_scale: float = 5.0
    ttft_floor_s: float = 0.25
    tpot_s: float = 0.1
    predict_prefill: Callable[[int], float] | None = None

    def ttft_limit(self, input_len: int) -> float:
        return length_aware_ttft(input_len, self.ttft_scale, self.ttft_floor_s, self.predict_prefill) or 0.0

    def service(self) -> ServiceSLO:
        """These targets as an engine's `EngineConfig.slo` (its cost model predicts the prefill)."""
        return ServiceSLO(self.ttft_scale, self.ttft_floor_s, self.tpot_s)

    def attained(self, r: RequestRecord) -> bool:
        if not r.completed:
            return False
        ttft, tpot = r.ttft_s, r.tpot_s
        assert ttft is not None
        return ttft <= self.ttft_limit(r.input_len) and (tpot is None or tpot <= self.tpot_s)

    def to_dict(self) -> dict:
        return {"ttft_scale": self.ttft_scale, "ttft_floor_s": self.ttft_floor_s,
                "tpot_s": self.tpot_s, "length_aware": self.predict_prefill is not None}


def _pkey(p: float) -> str:
    return f"p{int(p)}" if float(p).is_integer() else f"p{p:g}"


def error_kind(message: str) -> str:
    """An error message with its numbers replaced by N, so that one cause is counted once."""
    return re.sub(r"\d+", "N", message)


def stats(values: Iterable[float], percentiles: Sequence[float] = (50, 90, 99)) -> dict:
    """mean, median and ``p<P>`` for each P (P=50 is reported as ``median`` only)."""
    a = np.asarray(list(values), dtype=np.float64)
    keys = ["mean", "median"] + [_pkey(p) for p in percentiles if p != 50]
    if a.size == 0:
        return dict.fromkeys(keys)
    out = {"mean": float(a.mean()), "median": float(np.median(a))}
    for p in percentiles:
        if p != 50:
            out[_pkey(p)] = float(np.percentile(a, p))
    return out


def _rate(n: float, duration_s: float) -> float:
    return float(n) / duration_s if duration_s > 0 else 0.0


def _summary(records: Sequence[RequestRecord], duration_s: float, slo: SLO,
             percentiles: Sequence[float]) -> dict:
    done = [r for r in records if r.completed]
    good = sum(1 for r in records if slo.attained(r))
    tin = sum(r.input_len for r in done)
    tout = sum(r.output_len for r in done)
    ttft = [r.ttft_s for r in done]
    tpot = [t for t in (r.tpot_s for r in done) if t is not None]
    e2e = [r.e2e_s for r in done]
    errors: dict[str, int] = {}
    for r in records:
        if not r.completed:
            key = error_kind(r.error or ("incomplete" if r.success else "unknown error"))
            errors[key] = errors.get(key, 0) + 1
    return {
        "num_requests": len(records),
        "completed": len(done),
        "failed": len(records) - len(done),
        "errors": errors,
        "duration_s": float(duration_s),
        "total_input_tokens": tin,
        "total_output_tokens": tout,
        "request_throughput": _rate(len(done), duration_s),
        "input_token_throughput": _rate(tin, duration_s),
        "output_token_throughput": _rate(tout, duration_s),
        "total_token_throughput": _rate(tin + tout, duration_s),
        "slo_met": good,
        "goodput": _rate(good, duration_s),
        "slo_attainment": good / len(records) if records else None,
        "ttft_s": stats(ttft, percentiles),
        "tpot_s": stats(tpot, percentiles),
        "itl_s": stats((g for r in done for g in r.itls_s), percentiles),
        "e2e_s": stats(e2e, percentiles),
        "per_token_latency_s": stats(
            (r.e2e_s / (r.input_len + r.output_len) for r in done if r.input_len + r.output_len > 0),
            percentiles),
        "input_token_latency_s": stats((r.ttft_s / r.input_len for r in done if r.input_len > 0),
                                       percentiles),
        "output_token_latency_s": stats(tpot, percentiles),
    }


def _klabel(n: float) -> str:
    if math.isinf(n):
        return "inf"
    n = int(n)
    return f"{n // 1024}K" if n and n % 1024 == 0 else str(n)


def bucket_label(lo: float, hi: float) -> str:
    return f"[{_klabel(lo)},{_klabel(hi)})"


def summarize(records: Sequence[RequestRecord], duration_s: float, slo: SLO,
              percentiles: Sequence[float] = (50, 90, 99),
              buckets: Sequence[int] | None = None) -> dict:
    """JSON-serializable summary of one run (see the module docstring for definitions).

    ``buckets`` are ascending input_len edges; bucket i is [edge_i, edge_{i+1}) and the
    last is [edge_last, inf). ``by_bucket`` maps labels like ``"[1K,8K)"`` to the same
    summary restricted to that bucket's records (empty buckets omitted); bucket rates are
    over the whole run's ``duration_s``, so they add up to the run's rates.
    """
    records = list(records)
    out = _summary(records, duration_s, slo, percentiles)
    out["slo"] = slo.to_dict()
    edges = [float(e) for e in (DEFAULT_BUCKETS if buckets is None else buckets)]
    if any(b <= a for a, b in itertools.pairwise(edges)):
        raise ValueError(f"bucket edges must be strictly ascending: {list(edges)}")
    by_bucket = {}
    for lo, hi in zip(edges, edges[1:] + [math.inf]):
        sel = [r for r in records if lo <= r.input_len < hi]
        if sel:
            b = _summary(sel, duration_s, slo, percentiles)
            b["bucket"] = [int(lo), None if math.isinf(hi) else int(hi)]
            by_bucket[bucket_label(lo, hi)] = b
    out["by_bucket"] = by_bucket
    return out


def capacity(rates: Sequence[float], attainments: Sequence[float | None],
             target: float = 0.9) -> float | None:
    """Highest rate sustaining ``attainment >= target`` (DistServe / LoongServe style).

    Points are sorted by rate (None attainments are dropped). Let A be the highest-rate
    point with attainment >= target. If A is the last point, its rate is returned (the
    sweep never fell below target). Otherwise the next point B is below target and the
    rate is linearly interpolated where the A-B segment crosses ``target``. A dip below
    target followed by a recovery is thus treated as noise. If no point reaches the target
    the answer is None (no extrapolation towards rate 0).
    """
    if len(rates) != len(attainments):
        raise ValueError("rates and attainments differ in length")
    pts = sorted((float(r), float(a)) for r, a in zip(rates, attainments) if a is not None)
    above = [i for i, (_, a) in enumerate(pts) if a >= target]
    if not above:
        return None
    i = above[-1]
    if i == len(pts) - 1:
        return pts[i][0]
    (r0, a0), (r1, a1) = pts[i], pts[i + 1]
    return r0 + (a0 - target) * (r1 - r0) / (a0 - a1)


def sweep_summary(results: dict[str, dict[float, dict]], target: float = 0.9) -> dict:
    """Per policy: rates (ascending), attainment, goodput, mean latencies and capacity.

    ``results[policy][rate]`` is a :func:`summarize` dict. ``by_bucket`` gives the
    attainment curve and capacity per prompt-length bucket (None where a rate had no
    request in that bucket).
    """
    out: dict[str, dict] = {}
    for policy, by_rate in results.items():
        keys = sorted(by_rate, key=float)  # keys may be strings after a JSON round trip
        rates = [float(k) for k in keys]
        runs = [by_rate[k] for k in keys]
        att = [s.get("slo_attainment") for s in runs]
        labels: list[str] = []
        for s in runs:
            labels += [k for k in s.get("by_bucket", {}) if k not in labels]
        buckets = {}
        for lab in labels:
            batt = [s.get("by_bucket", {}).get(lab, {}).get("slo_attainment") for s in runs]
            buckets[lab] = {"slo_attainment": batt, "capacity": capacity(rates, batt, target)}
        out[policy] = {
            "rates": rates,
            "slo_attainment": att,
            "goodput": [s.get("goodput") for s in runs],
            "mean_per_token_latency_s": [s.get("per_token_latency_s", {}).get("mean") for s in runs],
            "mean_ttft_s": [s.get("ttft_s", {}).get("mean") for s in runs],
            "mean_tpot_s": [s.get("tpot_s", {}).get("mean") for s in runs],
            "capacity": capacity(rates, att, target),
            "target": target,
            "by_bucket": buckets,
        }
    return out
