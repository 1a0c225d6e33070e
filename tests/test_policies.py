"""Every registered bundle, on random cluster states: no decision breaks a scheduler rule."""
from __future__ import annotations

from dataclasses import replace
from types import MappingProxyType

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from esp.engine.validation import (check_decode, check_decode_batches, check_dispatch, check_migrations,
                                   check_prefill, check_riders)
from esp.costs.cost_model import CostModel
from esp.policies import Batch, ClusterView, PolicyOptions, RequestView, available, load_policy_set

BUNDLES = sorted(r.name for r in available() if r.kind == "policies")


@st.composite
def cluster_views(draw, partial: bool = False, slo: bool = False) -> ClusterView:
    """Random cluster states; with `partial`, some waiting requests hold the KV of a first
    chunk of their prompt on one instance (only chunked prefill makes those)."""
    n = draw(st.integers(1, 4))
    capacity = [draw(st.integers(16, 400)) for _ in range(n)]
    used = [0] * n
    running = []
    for rid in range(draw(st.integers(0, 5))):
        alone = slo and draw(st.booleans())  # one holder: what consolidation may move
        holders = draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=1 if alone else n, unique=True))
        kv = {}
        for h in holders:
            take = min(draw(st.integers(1, 60)), capacity[h] - used[h])
            if take > 0:
                kv[h] = take
                used[h] += take
        if kv:
            prompt = sum(kv.values())
            tpot = draw(st.sampled_from((None, None, 0.06, 0.5))) if slo else None
            running.append(RequestView(100 + rid, float(rid), prompt, 1, draw(st.integers(2, 80)),
                                       MappingProxyType(kv), tpot_slo_s=tpot))
    waiting = []
    for rid in range(draw(st.integers(0, 6))):
        prompt, kv = draw(st.integers(1, 300)), {}
        if partial and prompt > 1 and draw(st.booleans()):
            h = draw(st.integers(0, n - 1))
            take = min(draw(st.integers(1, prompt - 1)), capacity[h] - used[h])
            if take > 0:
                kv = {h: take}
                used[h] += take
        ttft, tpot = (None, None)
        if slo:
            ttft, tpot = draw(st.sampled_from((None, 0.1, 30.0))), draw(st.sampled_from((None, 0.03)))
        waiting.append(RequestView(rid, 10.0 + rid, prompt, 0, draw(st.integers(1, 64)), MappingProxyType(kv),
                                   ttft_slo_s=ttft, tpot_slo_s=tpot))
    idle = frozenset(draw(st.lists(st.integers(0, n - 1), unique=True)))
    in_step = {r.request_id for r in running if not set(r.kv_tokens) <= idle and draw(st.booleans())}
    return ClusterView(now=100.0, capacity=tuple(capacity), free_slots=tuple(c - u for c, u in zip(capacity, used)),
                       idle=idle, waiting=tuple(waiting),
                       running=tuple(r for r in running if r.request_id not in in_step))


@pytest.mark.parametrize("name", BUNDLES)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_decisions_keep_every_rule(name, data):
    view = data.draw(cluster_views(partial=name == "chunked"))
    check_every_rule(load_policy_set(name, PolicyOptions(max_prefill_tokens=512, extra={"chunk_size": 64})), view)


#: decode steps of 10 ms + 0.2 ms per KV token: the small views' decodes miss a 50 ms TPOT target
#: at 200 tokens, so pauses, consolidation and KV spreading all have decisions to make
SLOW_DECODE = CostModel({1: (0.01, 1e-4, 1e-7), 2: (0.012, 6e-5, 5e-8)}, {1: (0.01, 1e-4, 2e-4)}, 1e-5, 1e9, 64,
                        decode_basis="busiest")


@pytest.mark.parametrize("extra", [{}, {"preempt": "always"}, {"preempt": "never", "order": "fcfs"},
                                   {"spread_kv": False, "consolidate": False, "scale_up": False},
                                   {"tpot_target_s": 0.5, "lookahead": 0, "urgent_ratio": 2},
                                   {"keep_free": 2, "keep_free_after_s": 0.001}])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_loong_variants_keep_every_rule(extra, data):
    view = replace(data.draw(cluster_views(slo=True)), cost_model=SLOW_DECODE)
    check_every_rule(load_policy_set("loong", PolicyOptions(max_prefill_tokens=512, extra=extra)), view)


def check_every_rule(p, view: ClusterView) -> None:
    dispatch = p.scheduling.dispatch(view)
    if dispatch.request_ids:
        check_dispatch(p.scheduling, view, dispatch)
        batches = p.batching.prefill_batches(view, dispatch)
        free = list(view.free_slots)
        plans = [(batch, p.scaling.keep_plan(view, batch)) for batch in batches]
        check_prefill(p, view, dispatch, plans)
        for _, plan in plans:
            for rank, n in (part for parts in plan.ranges.values() for part in parts):
                free[rank] -= n
        check_riders(p.batching, view, batches)
        after_keep = replace(view, free_slots=tuple(free))
        for batch in (b for b in batches if b.decode_ids):
            riders = Batch(batch.decode_ids, batch.group)
            check_decode(p, after_keep, riders, p.scaling.decode_plan(after_keep, riders), fixed_group=True)
    moves = p.scaling.migrations(view)
    check_migrations(p.scaling, view, moves)
    decode = p.batching.decode_batches(view, view.idle)
    check_decode_batches(p.batching, view, decode)
    for batch in decode:
        check_decode(p, view, batch, p.scaling.decode_plan(view, batch))
        view = replace(view, idle=view.idle - set(batch.group))


def test_every_bundle_is_listed():
    assert {"loong", "replicas", "chunked", "static-sp", "disagg"} <= set(BUNDLES)


@pytest.mark.parametrize("name", BUNDLES)
def test_scale_up_never_picks_an_idle_instance_without_a_free_slot(name):
    """Holders full, one idle instance full too, one with room: masters only where slots are."""
    full = RequestView(7, 0.0, 40, 1, 100, MappingProxyType({0: 41}))
    view = ClusterView(now=1.0, capacity=(41, 50, 50), free_slots=(0, 0, 9), idle=frozenset({0, 1, 2}),
                       waiting=(), running=(full,))
    p = load_policy_set(name, PolicyOptions())
    for batch in p.batching.decode_batches(view, view.idle):
        plan = p.scaling.decode_plan(view, batch)
        check_decode(p, view, batch, plan)
        assert 1 not in plan.masters.values()
