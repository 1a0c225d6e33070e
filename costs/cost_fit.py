"""Fit a `CostModel` to measured step times (DESIGN 7).

Each kind of step is fitted by least squares on *relative* error: every row of the design
matrix and its target are divided by the measured seconds, so the fit minimises
`sum(((pred - y) / y) ** 2)` and a 50 ms decode step counts as much as a 20 s prefill.
Prefill and decode are fitted separately per group size `dop`:

- prefill `[1, sum(len), sum(len^2)] -> (a, b, c)`
- decode  `[1, batch, kv_tokens]     -> (d0, d1, d2)`
- transfer `[1, bytes]               -> latency_s, 1 / bytes_per_s`

Coefficients are constrained to be non-negative. scipy is not a dependency, so the
constraint is enforced by a small active-set loop: solve the unconstrained problem on the
active terms; if some coefficient is negative, drop the most negative term (its coefficient
becomes 0) and refit; repeat. This is exact NNLS whenever at most one term goes negative
(the usual case: a tiny constant or quadratic term pushed below zero by noise) and a good
approximation otherwise. Columns are scaled to unit max before solving, because
`sum(len^2)` is ~1e10 while the constant column is 1.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from esp.costs.cost_model import CostModel


@dataclass(frozen=True)
class PrefillSample:
    dop: int
    lengths: tuple[int, ...]
    seconds: float


@dataclass(frozen=True)
class DecodeSample:
    dop: int
    batch_size: int
    kv_tokens: int
    seconds: float


@dataclass(frozen=True)
class TransferSample:
    nbytes: int
    seconds: float


def nnls_relative(features: np.ndarray, seconds: np.ndarray, known: np.ndarray | None = None) -> np.ndarray:
    """Non-negative coefficients minimising the sum of squared relative errors (see module doc).
    `known`: seconds of each sample already accounted for by fixed terms, so the prediction is
    `known + features @ coef` (the error is still relative to `seconds`)."""
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(seconds, dtype=np.float64)
    if np.any(~np.isfinite(y)) or np.any(y <= 0):
        raise ValueError("measured seconds must be positive and finite")
    rows = x / y[:, None]
    scale = np.abs(rows).max(axis=0)
    scale[scale == 0] = 1.0
    rows = rows / scale
    target = np.ones(len(y)) if known is None else 1.0 - np.asarray(known, dtype=np.float64) / y
    active = list(range(x.shape[1]))
    coef = np.zeros(x.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(rows[:, active], target, rcond=None)
        worst = int(np.argmin(sol))
        if sol[worst] >= 0:
            coef[active] = sol
            break
        del active[worst]
    return coef / scale


def _rel_errors(features: np.ndarray, seconds: np.ndarray, coef: np.ndarray) -> dict:
    rel = np.abs(features @ coef - seconds) / seconds
    return {"median": float(np.median(rel)), "p90": float(np.percentile(rel, 90)), "max": float(rel.max())}


def _fit_group(kind: str, dop: int | None, features: np.ndarray, seconds: np.ndarray) -> tuple[np.ndarray, dict]:
    terms = features.shape[1]
    if len(seconds) < terms:
        where = f"{kind} dop={dop}" if dop is not None else kind
        raise ValueError(f"{where}: {len(seconds)} samples, need at least {terms} (one per term)")
    coef = nnls_relative(features, seconds)
    rank = int(np.linalg.matrix_rank(features / np.abs(features).max(axis=0).clip(min=1e-300)))
    report = {"samples": len(seconds), "coefficients": [float(v) for v in coef],
              "rel_error": _rel_errors(features, seconds, coef), "rank_deficient": rank < terms}
    return coef, report


def _by_dop(samples: Iterable, kind: str) -> dict[int, list]:
    groups: dict[int, list] = defaultdict(list)
    for s in samples:
        if s.dop < 1:
            raise ValueError(f"{kind} sample with dop={s.dop}")
        groups[s.dop].append(s)
    if not groups:
        raise ValueError(f"no {kind} samples")
    return dict(sorted(groups.items()))


def prefill_features(samples: Sequence[PrefillSample]) -> np.ndarray:
    return np.array([[1.0, float(sum(s.lengths)), float(sum(n * n for n in s.lengths))] for s in samples])


def decode_features(samples: Sequence[DecodeSample]) -> np.ndarray:
    return np.array([[1.0, float(s.batch_size), float(s.kv_tokens)] for s in samples])


def fit_cost_model(prefill: Iterable[PrefillSample], decode: Iterable[DecodeSample],
                   transfer: Iterable[TransferSample], kv_bytes_per_token: int, name: str = "fitted",
                   meta: Mapping[str, object] | None = None) -> tuple[CostModel, dict]:
    """Fit all three parts; returns the model and a report
    `{"prefill": {dop: part}, "decode": {dop: part}, "transfer": part}` where each part holds
    `samples`, `coefficients`, `rel_error` (`median`/`p90`/`max` of |pred - y| / y) and
    `rank_deficient` (the samples could not tell the terms apart; coefficients are then one
    of several equally good fits)."""
    report: dict = {"prefill": {}, "decode": {}}
    tables: dict[str, dict[int, tuple[float, float, float]]] = {"prefill": {}, "decode": {}}
    for kind, samples, featurize in (("prefill", prefill, prefill_features), ("decode", decode, decode_features)):
        for dop, group in _by_dop(samples, kind).items():
            seconds = np.array([s.seconds for s in group], dtype=np.float64)
            coef, part = _fit_group(kind, dop, featurize(group), seconds)
            tables[kind][dop] = (float(coef[0]), float(coef[1]), float(coef[2]))
            report[kind][dop] = part
    moves = list(transfer)
    feats = np.array([[1.0, float(s.nbytes)] for s in moves]).reshape(-1, 2)
    coef, part = _fit_group("transfer", None, feats, np.array([s.seconds for s in moves], dtype=np.float64))
    if coef[1] <= 0:
        raise ValueError("transfer: fitted time does not grow with bytes; measure larger transfers")
    part["latency_s"], part["bytes_per_s"] = float(coef[0]), float(1.0 / coef[1])
    report["transfer"] = part
    model_meta = {"source": "fit", **dict(meta or {})}
    model = CostModel(tables["prefill"], tables["decode"], part["latency_s"], part["bytes_per_s"],
                      int(kv_bytes_per_token), name, model_meta)
    return model, report
