"""Workloads for ``esp-run bench``: load/save JSONL traces and build request schedules.

A trace is JSONL, one request per line: ``{"arrival_s": float, "input_len": int,
"output_len": int}`` (DESIGN section 8); other keys (``prompt``, ``synthetic``, ...) are ignored.
``make_workload`` either replays a trace's own arrival times or samples its length
distribution at a Poisson (or gamma, for ``burstiness != 1``) arrival rate, as vLLM's benchmark does.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "TraceRequest",
    "dataset_names",
    "load_dataset",
    "load_trace",
    "make_workload",
    "save_trace",
]


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float
    input_len: int
    output_len: int


def _parse(obj: object) -> TraceRequest:
    if not isinstance(obj, dict):
        raise TypeError("expected a JSON object")
    try:
        arrival, inp, out = obj["arrival_s"], obj["input_len"], obj["output_len"]
    except KeyError as e:
        raise ValueError(f"missing key {e.args[0]!r}") from None
    for key, v in (("input_len", inp), ("output_len", out)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{key} must be a non-negative integer, got {v!r}")
    if isinstance(arrival, bool) or not isinstance(arrival, (int, float)) \
            or not math.isfinite(arrival) or arrival < 0:
        raise ValueError(f"arrival_s must be a finite number >= 0, got {arrival!r}")
    return TraceRequest(float(arrival), inp, out)


def load_trace(path: str | Path) -> list[TraceRequest]:
    """Read a JSONL trace; blank lines are skipped. ValueError names the file and line."""
    path = Path(path)
    out: list[TraceRequest] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(_parse(json.loads(line)))
            except (ValueError, TypeError) as e:  # json.JSONDecodeError is a ValueError
                raise ValueError(f"{path}:{lineno}: bad trace line: {e}") from None
    return out


def save_trace(path: str | Path, requests: Iterable[TraceRequest]) -> None:
    """Write requests as JSONL (the three schema fields only)."""
    with Path(path).open("w", encoding="utf-8") as f:
        f.writelines(json.dumps({"arrival_s": r.arrival_s, "input_len": r.input_len,
                                "output_len": r.output_len}, separators=(",", ":")) + "\n" for r in requests)


def dataset_names() -> list[str]:
    """Names of the shipped datasets (``esp.traces``)."""
    from esp import traces
    return traces.names()


def load_dataset(name: str) -> list[TraceRequest]:
    """Load a shipped dataset by name; ValueError listing the choices if unknown."""
    from esp import traces
    return load_trace(traces.path(name))  # traces.path raises the ValueError


def _fit(lengths: np.ndarray, max_context: int, fit: str) -> np.ndarray:
    """lengths: (n, 2) int array of (input, output). Make input + output <= max_context.

    scale: multiply every request's input and output by one factor f = max_context / (longest
        input+output of the source distribution), floored, at least 1 (only if f < 1). This keeps
        the shape of the distribution and the order of lengths.
    clip: requests that do not fit keep their output (capped at max_context - 1) and have their
        input truncated to max_context - output; the others are unchanged.
    scale-input: outputs keep their length, capped at max_context // 8; inputs are multiplied by
        one factor so that the longest input plus that cap fits (a long-context distribution
        shrunk for a small model without losing its decode work).
    """
    if max_context < 2:
        raise ValueError(f"max_context must be >= 2, got {max_context}")
    if fit == "scale":
        longest = int(lengths.sum(axis=1).max())
        if longest <= max_context:
            return lengths
        return np.maximum(np.floor(lengths * (max_context / longest)).astype(np.int64), 1)
    if fit == "scale-input":
        cap = max(1, max_context // 8)
        out = np.minimum(lengths[:, 1], cap)
        room, longest = max_context - cap, int(lengths[:, 0].max())
        inp = lengths[:, 0] if longest <= room else lengths[:, 0] * room // longest
        return np.stack([np.maximum(inp, 1), out], axis=1)
    if fit == "clip":
        out = np.minimum(lengths[:, 1], max_context - 1)
        inp = np.minimum(lengths[:, 0], max_context - out)
        return np.stack([inp, out], axis=1)
    raise ValueError(f"fit must be 'scale', 'scale-input' or 'clip', got {fit!r}")


def make_workload(requests: list[TraceRequest], num_requests: int, rate: float | None,
                  seed: int, burstiness: float = 1.0, max_context: int | None = None,
                  min_output: int = 1, fit: str = "scale") -> list[TraceRequest]:
    """Build ``num_requests`` requests from a trace or length distribution.

    rate None: replay the first ``num_requests`` requests with the trace's own arrival times.
    rate given (req/s, ``math.inf`` = all at t=0): sample lengths from ``requests`` (without
    replacement when ``num_requests <= len(requests)``, else with), deterministic for ``seed``
    (numpy Generator); the first request arrives at 0 and inter-arrival gaps are exponential
    with mean 1/rate, or gamma(shape=burstiness, scale=1/(rate*burstiness)) when burstiness != 1
    (coefficient of variation 1/sqrt(burstiness), as in vLLM's benchmark).
    Outputs are raised to ``min_output``; then ``max_context`` (if given) is enforced with
    ``fit`` ("scale" or "clip", see ``_fit``; the scale factor comes from the whole source so it
    does not depend on the sample). Input and output lengths are always >= 1.
    """
    if not requests:
        raise ValueError("empty trace")
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    if burstiness <= 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    src = np.array([[r.input_len, r.output_len] for r in requests], dtype=np.int64)
    src[:, 0] = np.maximum(src[:, 0], 1)
    src[:, 1] = np.maximum(src[:, 1], max(1, min_output))
    if max_context is not None:
        src = _fit(src, max_context, fit)
    rng = np.random.default_rng(seed)
    if rate is None:
        if num_requests > len(requests):
            raise ValueError(f"cannot replay {num_requests} requests from a trace of "
                             f"{len(requests)}; pass a rate to resample")
        idx = np.arange(num_requests)
        arrivals = np.array([requests[i].arrival_s for i in idx], dtype=float)
    else:
        if not rate > 0:
            raise ValueError(f"rate must be > 0 req/s, got {rate}")
        idx = rng.choice(len(requests), size=num_requests,
                         replace=num_requests > len(requests))
        if math.isinf(rate):
            arrivals = np.zeros(num_requests)
        else:
            if burstiness == 1.0:
                gaps = rng.exponential(1.0 / rate, size=num_requests)
            else:
                gaps = rng.gamma(burstiness, 1.0 / (rate * burstiness), size=num_requests)
            arrivals = np.concatenate([[0.0], np.cumsum(gaps[:-1])])
    lens = src[idx]
    return [TraceRequest(float(t), int(i), int(o))
            for t, (i, o) in zip(arrivals, lens)]
