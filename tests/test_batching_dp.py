"""The batching dynamic program against brute force."""
from __future__ import annotations

import math

from hypothesis import given, settings, strategies as st

from esp.policies.batching_dp import brute_force, plan_batches
from esp.policies.cost_model import CostModel

COST = CostModel({1: (0.01, 1e-4, 2e-8), 2: (0.012, 0.55e-4, 1.1e-8), 4: (0.015, 0.3e-4, 0.6e-8)},
                 {1: (0.01, 1e-4, 1e-7)}, 2e-5, 1e10, 4096)

cases = st.tuples(st.lists(st.integers(1, 4000), min_size=1, max_size=5).map(sorted),
                  st.lists(st.integers(0, 6000), min_size=1, max_size=4).map(lambda f: sorted(f, reverse=True)))


def close(a: float, b: float) -> bool:
    return (a == b == math.inf) or math.isclose(a, b, rel_tol=1e-9)


@settings(max_examples=200, deadline=None)
@given(cases)
def test_dp_equals_brute_force(case):
    lengths, free = case
    cost, splits = plan_batches(lengths, free, COST.prefill_time_of_sums)
    assert close(cost, brute_force(lengths, free, COST.prefill_time_of_sums))
    if cost < math.inf:
        assert [s.r0 for s in splits][0] == 0 and splits[-1].r1 == len(lengths)
        assert all(a.r1 == b.r0 and a.i1 <= b.i0 for a, b in zip(splits, splits[1:]))
        assert all(sum(lengths[s.r0:s.r1]) <= sum(free[s.i0:s.i1]) for s in splits)
        recomputed = sum(COST.prefill_time(lengths[s.r0:s.r1], s.i1 - s.i0) * sum(1 / n for n in lengths[s.r0:s.r1])
                         for s in splits)
        assert close(recomputed, cost)


def test_monotone_split_points_are_not_exact_so_the_plain_dp_is_kept():
    """The paper's speed-up restricts the split point of f[i][j] to at least that of f[i-1][j].
    On the A800 preset that restriction misses the optimum (here by 3.7%, found by a random
    search over 300 cases, 16 misses, with memory never binding), so `plan_batches` searches
    every split; at 64 requests x 8 instances it takes about 10 ms."""
    from esp.policies.batching_dp import _Costs
    from esp.policies.presets import load_profile

    lengths, free = [137, 1464, 137669, 145840, 189666], [10**9] * 4
    pt = load_profile("a800-lwm7b").prefill_time_of_sums
    cost = _Costs(lengths, free, pt)
    m, n = len(lengths), len(free)
    f = [[0.0] * (n + 1)] + [[math.inf] * (n + 1) for _ in range(m)]
    opt = [[(0, 0)] * (n + 1) for _ in range(m + 1)]
    for j in range(1, n + 1):
        for i in range(1, m + 1):
            best, choice = f[i][j - 1], opt[i][j - 1]
            for k in range(opt[i - 1][j][0] if i > 1 else 0, i):
                for l in range(j):
                    c = f[k][l] + cost(k, i, l, j)
                    if c < best:
                        best, choice = c, (k, l)
            f[i][j], opt[i][j] = best, choice
    exact, _ = plan_batches(lengths, free, pt)
    assert close(exact, brute_force(lengths, free, pt))
    assert f[m][n] > exact * 1.03
