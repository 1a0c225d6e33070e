"""LoongServe's batching step (paper Eq. 5): split length-sorted requests and free-slot-sorted
instances into contiguous prefill batches, minimizing the sum over requests of predicted
prefill time divided by input length. Instances may be left unused.

`f[i][j]` is the best cost of the first `i` requests on the first `j` instances:
`f[i][j] = min(f[i][j-1], min_{k<i, l<j} f[k][l] + C(k, i, l, j))`, where batch
`requests[k:i]` runs on `instances[l:j]` if its prompts fit in their free slots.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import accumulate
from typing import Callable, Sequence

PrefillTime = Callable[[int, int, int, int], float]
"""`(sum of lengths, sum of squared lengths, count, dop) -> seconds`, e.g. `CostModel.prefill_time_of_sums`."""


@dataclass(frozen=True)
class Split:
    """Batch `requests[r0:r1]` on `instances[i0:i1]` (indices into the sorted inputs)."""

    r0: int
    r1: int
    i0: int
    i1: int


class _Costs:
    def __init__(self, lengths: Sequence[int], free: Sequence[int], prefill_time: PrefillTime) -> None:
        self.lengths, self.prefill_time = lengths, prefill_time
        self.tokens = [0, *accumulate(lengths)]
        self.squares = [0, *accumulate(n * n for n in lengths)]
        self.inv = [0.0, *accumulate(1.0 / n for n in lengths)]
        self.room = [0, *accumulate(free)]

    def __call__(self, k: int, i: int, l: int, j: int) -> float:
        if self.tokens[i] - self.tokens[k] > self.room[j] - self.room[l]:
            return math.inf
        t = self.prefill_time(self.tokens[i] - self.tokens[k], self.squares[i] - self.squares[k], i - k, j - l)
        return t * (self.inv[i] - self.inv[k])


def plan_batches(lengths: Sequence[int], free: Sequence[int],
                 prefill_time: PrefillTime) -> tuple[float, list[Split]]:
    """Best split of `lengths` (sorted ascending) over instances with `free` slots (sorted
    descending). Returns `(cost, splits)`; cost is inf when no split fits in memory.
    O(m^2 n^2) evaluations of the cost."""
    m, n = len(lengths), len(free)
    cost = _Costs(lengths, free, prefill_time)
    f = [[math.inf] * (n + 1) for _ in range(m + 1)]
    arg: list[list[tuple | None]] = [[None] * (n + 1) for _ in range(m + 1)]
    for j in range(n + 1):
        f[0][j] = 0.0
    for j in range(1, n + 1):
        for i in range(1, m + 1):
            best, choice = f[i][j - 1], ("skip",)
            for k in range(i):
                for l in range(j):
                    if f[k][l] == math.inf:
                        continue
                    c = f[k][l] + cost(k, i, l, j)
                    if c < best:
                        best, choice = c, (k, l)
            f[i][j], arg[i][j] = best, choice
    return f[m][n], _trace(arg, m, n)


def _trace(arg, i: int, j: int) -> list[Split]:
    splits: list[Split] = []
    while i > 0 and j > 0 and arg[i][j] is not None:
        choice = arg[i][j]
        if choice[0] == "skip":
            j -= 1
            continue
        k, l = choice
        splits.append(Split(k, i, l, j))
        i, j = k, l
    return splits[::-1] if i == 0 else []


def brute_force(lengths: Sequence[int], free: Sequence[int], prefill_time: PrefillTime) -> float:
    """Every way to cut the sorted requests into contiguous batches and give each batch a
    distinct contiguous run of the sorted instances, in order (the DP's search space)."""
    cost = _Costs(lengths, free, prefill_time)
    m, n = len(lengths), len(free)

    def go(k: int, l: int) -> float:
        if k == m:
            return 0.0
        best = math.inf
        for i in range(k + 1, m + 1):
            for l0 in range(l, n):
                for j in range(l0 + 1, n + 1):
                    c = cost(k, i, l0, j)
                    if c < math.inf:
                        best = min(best, c + go(i, j))
        return best

    return go(0, 0)
