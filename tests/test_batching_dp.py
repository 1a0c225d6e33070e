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
