"""LoongServe's batching step (paper Eq. 5): split length-sorted requests and free-slot-sorted
instances into contiguous prefill batches, minimizing the sum over requests of predicted
prefill time divided by input length. Instances may be left unused.

`f[i][j]` is the best cost of the first `i` requests on the first `j` instances:
`f[i][j] = min(f[i][j-1], min_{k<i, l<j} f[k][l] + C(k, i, l, j))`, where batch
`requests[k:i]` runs on the `d = j - l` instances `instances[l:j]` if its prompts fit in their
free slots, at cost `C = T_d(requests[k:i]) * sum_{r in k..i-1} 1 / len_r` with the paper's
Eq. 7 `T_d = a_d + b_d * sum(len) + c_d * sum(len^2)`.

**Why it is fast and still exact.** For one source column `l` and group size `d`, the matrix
`M[i][k] = f[k][l] + C(k, i, l, l + d)` is Monge on its finite entries: with `S`, `Q`, `H` the
interval sums of `len`, `len^2` and `1/len` (all non-negative and additive), `C` is
`a*H + b*S*H + c*Q*H`, and a product of two non-negative interval sums `x*y` satisfies
`x(k,i) y(k,i) + x(k',i') y(k',i') <= x(k,i') y(k,i') + x(k',i) y(k',i)` for `k < k' < i < i'`
(the difference is `x_A y_Z + x_Z y_A >= 0` over the outer pieces). Its finite entries form
a band: `f[k][l]` is finite for `k` up to some `K_l` (placing fewer requests is never harder),
and the batch fits for `k` from some `k_min(i)` on, both ends non-decreasing in `i`. So the
leftmost minimizing `k` of row `i` never decreases with `i`: row minima are found coarse to
fine (every 64th row over its whole band, then every 8th between them, then every row), each
row searching only between the minimizers of its computed neighbours, all `(l, d)` pairs of a
target column at once in numpy. The paper's own pruning (the split point of `f[i][j]` at least
that of `f[i-1][j]` over both `k` and `l`) is not exact; this one is, up to rounding
(`tests/test_batching_dp.py` holds the brute-force oracle).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

PrefillCoefficients = Callable[[int], tuple[float, float, float]]
"""`dop -> (a, b, c)` of the prefill time `a + b*sum(len) + c*sum(len^2)`, e.g.
`CostModel.prefill_coefficients`."""

STRIDE_RATIO = 8
SMALL_CASE = 400
"""Problems with at most this many `(k, i, l, j)` terms take the plain recurrence in Python
(numpy's per-call overhead dominates there): one to three requests, as long prompts come."""


@dataclass(frozen=True)
class Split:
    """Batch `requests[r0:r1]` on `instances[i0:i1]` (indices into the sorted inputs)."""

    r0: int
    r1: int
    i0: int
    i1: int


def _strides(m: int) -> list[int]:
    out = [1]
    while out[-1] * STRIDE_RATIO < m:
        out.append(out[-1] * STRIDE_RATIO)
    return out[::-1]


def plan_batches(lengths: Sequence[int], free: Sequence[int],
                 coefficients: PrefillCoefficients) -> tuple[float, list[Split]]:
    """Best split of `lengths` (sorted ascending, positive) over instances with `free` slots
    (sorted descending). `coefficients(d)` gives the non-negative `(a, b, c)` of a prefill on
    `d` instances (or pass an object with a `prefill_coefficients` method, such as a
    `CostModel`). Returns `(cost, splits)`; cost is inf (and splits empty) when no split fits
    in memory."""
    coefficients = getattr(coefficients, "prefill_coefficients", coefficients)
    m, n = len(lengths), len(free)
    if m == 0:
        return 0.0, []
    if n == 0:
        return math.inf, []
    lens = np.asarray(lengths, dtype=np.float64)
    if np.any(lens <= 0) or np.any(np.diff(lens) < 0):
        raise ValueError("lengths must be positive and sorted ascending")
    if any(x < y for x, y in zip(free, free[1:])):
        raise ValueError("free slots must be sorted descending")
    coef = np.array([coefficients(d) for d in range(1, n + 1)], dtype=np.float64)
    if not np.all(np.isfinite(coef)) or np.any(coef < 0):
        raise ValueError("prefill coefficients must be finite and non-negative")
    if m * (m + 1) * n * (n + 1) <= 4 * SMALL_CASE:
        return _plan_small(lengths, free, coef.tolist())
    tok = np.concatenate(([0.0], np.cumsum(lens)))
    sq = np.concatenate(([0.0], np.cumsum(lens * lens)))
    inv = np.concatenate(([0.0], np.cumsum(1.0 / lens)))
    room = np.concatenate(([0], np.cumsum(np.asarray(free, dtype=np.int64))))
    tok_int = np.concatenate(([0], np.cumsum(np.asarray(lengths, dtype=np.int64))))
    f = np.full((m + 1, n + 1), math.inf)
    f[0, :] = 0.0
    last_finite = np.zeros(n + 1, dtype=np.int64)  # K_l: f[k][l] is finite exactly for k <= K_l
    choice_k = np.full((m + 1, n + 1), -1, dtype=np.int64)  # -1: skip instance j
    choice_l = np.full((m + 1, n + 1), -1, dtype=np.int64)
    rows_all = np.arange(m + 1)
    stages = []
    done = np.zeros(m + 1, dtype=bool)
    for t, stride in enumerate(_strides(m)):
        rows = rows_all[((rows_all % stride == 0) | (rows_all == m) * (t == 0)) & ~done & (rows_all > 0)]
        done[rows] = True
        coarse = stride * STRIDE_RATIO
        left = rows - rows % coarse
        right = np.minimum(left + coarse, m)  # row m is computed first
        stages.append((rows, left, right if t else np.zeros_like(rows)))
    for j in range(1, n + 1):
        d = np.arange(1, j + 1)
        l = j - d
        fits = room[j] - room[l]  # free slots of each candidate group
        # band of row i for pair p: k in [lo, hi]
        lo_all = np.searchsorted(tok_int, (tok_int[None, :] - fits[:, None]).ravel(), side="left").reshape(j, m + 1)
        hi_all = np.minimum(rows_all[None, :] - 1, last_finite[l][:, None])
        opt = np.full((j, m + 1), -1, dtype=np.int64)
        best = np.full((j, m + 1), math.inf)
        a, b, c = coef[d - 1, 0], coef[d - 1, 1], coef[d - 1, 2]
        # cost(k, i) = (a + b (S_i - S_k) + c (Q_i - Q_k)) (H_i - H_k) = (v_i - u_k) (H_i - H_k), per pair
        f_flat = f[:, l].T.ravel()  # [p * (m + 1) + k] -> f[k][l_p]
        u_flat = (b[:, None] * tok + c[:, None] * sq).ravel()
        h_flat = np.tile(inv, j)
        v_all = a[:, None] + b[:, None] * tok + c[:, None] * sq  # (pairs, rows)
        base = (np.arange(j) * (m + 1))[:, None]
        for rows, left, right in stages:
            lo = lo_all[:, rows]
            hi = hi_all[:, rows]
            if len(stages) > 1:
                lo = np.maximum(lo, opt[:, left])  # opt of row 0 (no left neighbour) is -1
                bound = opt[:, right]
                hi = np.where(bound >= 0, np.minimum(hi, bound), hi)
            counts = (hi - lo + 1).ravel()
            keep = np.flatnonzero(counts > 0)
            if not len(keep):
                continue
            counts = counts[keep]
            ends = np.cumsum(counts)
            total = int(ends[-1])
            starts = ends - counts
            flat = np.arange(total) + np.repeat((lo + base).ravel()[keep] - starts, counts)
            h_i = inv[rows][np.newaxis].repeat(j, 0).ravel()[keep]
            val = f_flat[flat] + (np.repeat(v_all[:, rows].ravel()[keep], counts) - u_flat[flat]) * \
                (np.repeat(h_i, counts) - h_flat[flat])
            low = np.minimum.reduceat(val, starts)
            first = np.minimum.reduceat(np.where(val == np.repeat(low, counts), np.arange(total), total), starts)
            pp, rr = np.divmod(keep, len(rows))
            rr = rows[rr]
            opt[pp, rr] = flat[first] - pp * (m + 1)
            best[pp, rr] = low
        pick = best.argmin(axis=0)
        value = best[pick, rows_all]
        better = value < f[:, j - 1]
        f[:, j] = np.where(better, value, f[:, j - 1])
        choice_k[:, j] = np.where(better, opt[pick, rows_all], -1)
        choice_l[:, j] = np.where(better, l[pick], -1)
        finite = np.flatnonzero(np.isfinite(f[:, j]))
        last_finite[j] = finite[-1]
    total_cost = float(f[m, n])
    if math.isinf(total_cost):
        return math.inf, []
    return total_cost, _trace(choice_k, choice_l, m, n)


def _plan_small(lengths: Sequence[int], free: Sequence[int], coef: list) -> tuple[float, list[Split]]:
    """The recurrence term by term, for tiny inputs."""
    m, n = len(lengths), len(free)
    tok, sq, inv, room = [0], [0], [0.0], [0]
    for x in lengths:
        tok.append(tok[-1] + x)
        sq.append(sq[-1] + x * x)
        inv.append(inv[-1] + 1.0 / x)
    for x in free:
        room.append(room[-1] + x)
    f = [[0.0] * (n + 1)] + [[math.inf] * (n + 1) for _ in range(m)]
    choice_k = np.full((m + 1, n + 1), -1, dtype=np.int64)
    choice_l = np.full((m + 1, n + 1), -1, dtype=np.int64)
    for j in range(1, n + 1):
        for i in range(1, m + 1):
            best, pick = f[i][j - 1], None
            for l in range(j):
                a, b, c = coef[j - l - 1]
                for k in range(i):
                    if f[k][l] == math.inf or tok[i] - tok[k] > room[j] - room[l]:
                        continue
                    cost = f[k][l] + (a + b * (tok[i] - tok[k]) + c * (sq[i] - sq[k])) * (inv[i] - inv[k])
                    if cost < best:
                        best, pick = cost, (k, l)
            f[i][j] = best
            if pick is not None:
                choice_k[i, j], choice_l[i, j] = pick
    if math.isinf(f[m][n]):
        return math.inf, []
    return f[m][n], _trace(choice_k, choice_l, m, n)


def _trace(choice_k: np.ndarray, choice_l: np.ndarray, i: int, j: int) -> list[Split]:
    splits: list[Split] = []
    while i > 0 and j > 0:
        k = int(choice_k[i, j])
        if k < 0:
            j -= 1
            continue
        l = int(choice_l[i, j])
        splits.append(Split(k, i, l, j))
        i, j = k, l
    return splits[::-1]
