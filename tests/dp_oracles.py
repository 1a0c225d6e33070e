"""Oracles for the batching dynamic program (paper Eq. 5), shared by its tests: plain Python
that follows the definitions, with no prefix sums and no pruning."""
from __future__ import annotations

import math
from functools import lru_cache


def batch_cost(lengths, coefficients) -> float:
    """One batch's term of Eq. 5, from the lengths themselves (no prefix sums)."""
    a, b, c = coefficients
    return (a + b * sum(lengths) + c * sum(x * x for x in lengths)) * sum(1.0 / x for x in lengths)


def brute_force(lengths, free, coefficients) -> float:
    """Every way to cut the sorted requests into contiguous batches and give each batch a
    distinct contiguous run of the sorted instances, in order, with its prompts in their free
    slots (the DP's search space), by exhaustive recursion."""
    m, n = len(lengths), len(free)

    @lru_cache(maxsize=None)
    def go(k: int, l: int) -> float:
        if k == m:
            return 0.0
        best = math.inf
        for i in range(k + 1, m + 1):
            for l0 in range(l, n):
                for j in range(l0 + 1, n + 1):
                    if sum(lengths[k:i]) <= sum(free[l0:j]):
                        best = min(best, batch_cost(lengths[k:i], coefficients(j - l0)) + go(i, j))
        return best

    return go(0, 0)


def plain_dp(lengths, free, coefficients) -> float:
    """The recurrence as written, `f[i][j] = min(f[i][j-1], min_{k<i,l<j} f[k][l] + C)`, every term."""
    m, n = len(lengths), len(free)
    f = [[0.0] * (n + 1)] + [[math.inf] * (n + 1) for _ in range(m)]
    for j in range(1, n + 1):
        for i in range(1, m + 1):
            best = f[i][j - 1]
            for k in range(i):
                for l in range(j):
                    if f[k][l] < math.inf and sum(lengths[k:i]) <= sum(free[l:j]):
                        best = min(best, f[k][l] + batch_cost(lengths[k:i], coefficients(j - l)))
            f[i][j] = best
    return f[m][n]
