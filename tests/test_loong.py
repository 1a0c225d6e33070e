"""LoongServe's dispatch and batching steps on hand-made cluster views."""
from __future__ import annotations

from types import MappingProxyType

from dp_oracles import brute_force

from esp.costs.cost_model import CostModel
from esp.policies import ClusterView, PolicyOptions, RequestView
from esp.policies.loong import LoongBatching, LoongScheduling

COST = CostModel({1: (0.01, 1e-4, 2e-8), 2: (0.012, 0.5e-4, 1e-8), 4: (0.015, 0.25e-4, 0.5e-8)},
                 {1: (0.01, 1e-5, 1e-8)}, 2e-5, 1e10, 4096)


def view(waiting, free=(10_000,) * 4, running=(), now=1.0, idle=None):
    return ClusterView(now, (10_000,) * len(free), tuple(free), frozenset(range(len(free))) if idle is None else idle,
                       tuple(waiting), tuple(running), COST)


def req(rid, n, max_tokens=16, arrival=0.0):
    return RequestView(rid, arrival, n, 0, max_tokens)


def test_tipping_point_stops_the_prefill_batch():
    waiting = [req(i, 3000) for i in range(5)]
    opts = PolicyOptions(extra={"max_prefill_s": COST.prefill_time([3000, 3000], 4) * 1.01})
    assert LoongScheduling(opts).dispatch(view(waiting)).request_ids == (0, 1)


def test_admission_counts_the_future_kv_of_running_requests():
    running = [RequestView(9, 0.0, 100, 10, 5000, MappingProxyType({0: 110}))]
    waiting = [req(1, 200, max_tokens=16)]
    tight = view(waiting, free=(5000, 0, 0, 0), running=running)
    assert LoongScheduling(PolicyOptions()).dispatch(tight).request_ids == ()
    roomy = view(waiting, free=(9000, 0, 0, 0), running=running)
    assert LoongScheduling(PolicyOptions()).dispatch(roomy).request_ids == (1,)


def test_bounded_out_of_order_admission():
    waiting = [req(1, 9000, arrival=0.5), req(2, 50, arrival=0.6), req(3, 60, arrival=0.7)]
    small_room = (4000, 0, 0, 0)
    assert LoongScheduling(PolicyOptions()).dispatch(view(waiting, free=small_room)).request_ids == (2, 3)
    overdue = view(waiting, free=small_room, now=60.0)
    assert LoongScheduling(PolicyOptions()).dispatch(overdue).request_ids == ()


def test_batching_uses_the_dynamic_program():
    lengths = {1: 120, 2: 8000, 3: 90, 4: 3000}
    v = view([req(r, n) for r, n in lengths.items()])
    batches = LoongBatching(PolicyOptions()).prefill_batches(v, LoongScheduling(PolicyOptions()).dispatch(v))
    assert sorted(r for b in batches for r in b.request_ids) == [1, 2, 3, 4]
    used = [i for b in batches for i in b.group]
    assert len(used) == len(set(used))
    got = sum(COST.prefill_time([lengths[r] for r in b.request_ids], len(b.group))
              * sum(1 / lengths[r] for r in b.request_ids) for b in batches)
    best = brute_force(sorted(lengths.values()), [10_000] * 4, COST.prefill_coefficients)
    assert abs(got - best) < 1e-12
    assert len(batches) > 1


def test_compute_pressure_spreads_masters_and_never_overfills_an_instance():
    from esp.engine.validation import check_decode
    from esp.policies import Batch, load_policy_set

    running = tuple(RequestView(100 + i, 0.0, 50, 1, 40, MappingProxyType({0: 51})) for i in range(6))
    v = ClusterView(now=1.0, capacity=(1000,) * 3, free_slots=(500, 0, 400), idle=frozenset({0, 1, 2}),
                    waiting=(), running=running)
    p = load_policy_set("loong", PolicyOptions(extra={"max_batch_per_master": 2}))
    batch = Batch(tuple(r.request_id for r in running), (0,))
    plan = p.scaling.decode_plan(v, batch)
    check_decode(p, v, batch, plan)
    load = {}
    for m in plan.masters.values():
        load[m] = load.get(m, 0) + 1
    # Six requests on master 0 with a limit of two: two move to idle instance 2 (instance 1 has
    # no free slot, so it is never a master); no third instance is left, so 0 keeps four.
    assert load == {0: 4, 2: 2} and plan.group == (0, 2)
