"""The `loong` bundle's scaling step (paper section 5, step 4, and beyond it): where a prefill's KV
stays, which instances a decode batch runs on, and which decodes move."""
from __future__ import annotations

import math
from collections import Counter

from esp.costs.cost_model import CostModel
from esp.policies.base import Batch, ClusterView, DecodePlan, KeepPlan, Migration, PolicyOptions
from esp.policies.common import first_with_room, spare_instances
from esp.policies.decode_load import DecodeLoad
from esp.policies.fcfs import GreedyScaling
from esp.policies.loong_options import LoongOptions

FALLBACK_COST = CostModel({1: (1e-3, 1e-4, 1e-8)}, {1: (1e-3, 1e-5, 1e-8)}, 1e-5, 1e9, 1)


class LoongScaling(GreedyScaling):
    """- keep plans packed on the fewest instances with room, except that a request whose decode
      would read too much KV on one instance spreads over enough of its group (`spread_kv`,
      :func:`spread`): decode scale-up for KV bandwidth, decided at scale-down, at no cost;
    - multi-master decode that scales up onto idle instances when the holders are full, and on
      compute pressure (more than `max_batch_per_master` requests on one master); with
      `scale_up: false` (Fig. 13's ablation) it never adds an instance, so a request whose
      holders are full waits and is recomputed when nothing can run;
    - migrations: :func:`consolidate`."""

    def __init__(self, options: PolicyOptions) -> None:
        super().__init__(options)
        self.loong = LoongOptions.of(options.extra)

    def keep_plan(self, view: ClusterView, batch: Batch) -> KeepPlan:
        plan = super().keep_plan(view, batch)
        if not self.loong.spread_kv or len(batch.group) < 2:
            return plan
        return spread(view, batch, plan, view.cost_model or FALLBACK_COST, self.loong.tpot_target_s)

    def decode_plan(self, view: ClusterView, batch: Batch) -> DecodePlan:
        if not self.loong.scale_up:
            return holders_only(view, batch)
        plan = super().decode_plan(view, batch)
        limit = self.loong.max_batch_per_master
        if len(plan.masters) <= limit:  # no master can have more
            return plan
        load = Counter(plan.masters.values())
        if all(n <= limit for n in load.values()):
            return plan
        free = {i: view.free_slots[i] - load.get(i, 0) for i in range(view.num_instances)}
        group = set(plan.group)
        spare = spare_instances(view, group, free)
        masters = dict(plan.masters)
        for rid, master in plan.masters.items():
            if load[master] <= limit:
                continue
            light = [i for i in sorted(group, key=lambda i: load.get(i, 0)) if load.get(i, 0) < limit]
            target = first_with_room(light, free, group, spare)
            if target is None:
                break
            masters[rid] = target
            load[master] -= 1
            load[target] += 1
            free[target] -= 1
            free[master] += 1
        return DecodePlan(tuple(sorted(group)), masters)

    def migrations(self, view: ClusterView) -> list[Migration]:
        if not self.loong.consolidate or not view.running or len(view.idle) < 2:
            return []
        return consolidate(view, view.cost_model or FALLBACK_COST, self.loong.tpot_target_s)


def holders_only(view: ClusterView, batch: Batch) -> DecodePlan:
    """Decode without scale-up: each request's master is one of its own KV holders with a free
    slot (the newest first); a request whose holders are all full gets none and waits."""
    free = {i: view.free_slots[i] for i in batch.group}
    wanted = set(batch.request_ids)
    masters = {}
    for r in view.running:
        if r.request_id in wanted:
            master = next((i for i in reversed(r.kv_tokens) if free.get(i, 0) > 0), None)
            if master is not None:
                masters[r.request_id] = master
                free[master] -= 1
    return DecodePlan(tuple(sorted(batch.group)), masters)


def spread(view: ClusterView, batch: Batch, plan: KeepPlan, cost: CostModel, default_target: float) -> KeepPlan:
    """Re-plan the requests of `plan` whose predicted decode step (alone, on the busiest holder)
    misses their TPOT target: an even split over the fewest group members that meets it (or
    all of them), most free slots first, when those have room."""
    waiting = view.waiting_by_id
    free = {i: view.free_slots[i] for i in batch.group}
    for parts in plan.ranges.values():
        for rank, n in parts:
            free[rank] -= n
    ranges = dict(plan.ranges)
    for rid, parts in plan.ranges.items():
        n = sum(t for _, t in parts)
        target = waiting[rid].tpot_slo_s or default_target
        if cost.decode_time(1, n) <= target or len(parts) >= len(batch.group):
            continue
        for rank, t in parts:
            free[rank] += t
        k = len(parts)
        while k < len(batch.group) and cost.decode_time(1, n, k, master_batch=1, holder_kv=math.ceil(n / k)) > target:
            k += 1
        ranks = sorted(sorted(batch.group, key=lambda i: (-free[i], i))[:k])
        share = [n // k + (j < n % k) for j in range(k)]  # the first ranks take the remainder
        if all(free[r] >= s for r, s in zip(ranks, share)):
            parts = tuple((r, s) for r, s in zip(ranks, share) if s)
        for rank, t in parts:
            free[rank] -= t
        ranges[rid] = parts
    return KeepPlan(ranges)


def consolidate(view: ClusterView, cost: CostModel, default_target: float) -> list[Migration]:
    """Empty the idle instance whose decodes hold the least KV into idle instances that already
    decode, so that a prefill can take it without pausing a decode (consolidation). It moves
    only requests whose whole KV is on that instance, only when all of them fit elsewhere (free
    slots for their KV and all they may still generate) with each destination's predicted
    decode step within the TPOT targets of the requests there, and only from a lighter instance
    to a heavier one (no ping-pong). One request per round: a migration occupies both
    instances, and the next round moves the next."""
    load = DecodeLoad.of(view, default_target)
    ranks = {i: load.rank(i) for i in load.holding & view.idle}
    homes = sorted(ranks, key=lambda i: (ranks[i].kv, i))
    for src in homes:
        if ranks[src].pinned or len(ranks[src].alone) != ranks[src].count:
            continue
        room = {i: view.free_slots[i] - ranks[i].reserve for i in homes}
        target = {i: ranks[i].target for i in homes}
        requests, tokens = Counter(), Counter()
        plan = []
        for r in sorted(ranks[src].alone, key=lambda r: -r.context_len):
            need = r.context_len + max(0, r.max_tokens - r.output_len)
            dst = next((i for i in reversed(homes) if (ranks[i].kv, i) > (ranks[src].kv, src) and room[i] >= need
                        and load.step_time(i, cost, requests[i] + 1, tokens[i] + r.context_len)
                        <= min(target[i], r.tpot_slo_s or default_target)), None)
            if dst is None:
                break
            plan.append(Migration(r.request_id, src, dst, r.context_len))
            room[dst] -= need
            requests[dst] += 1
            tokens[dst] += r.context_len
            target[dst] = min(target[dst], r.tpot_slo_s or default_target)
        if len(plan) == ranks[src].count:
            return plan[:1]
    return []
