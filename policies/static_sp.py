"""`static-sp`: every batch on all N instances with a fixed SP degree, no elasticity.
Prefill is striped over all instances and each request's KV is split evenly over all of
them; decode runs on all instances with masters spread by free slots."""
from __future__ import annotations

from esp.policies.base import (Batch, BatchingPolicy, ClusterView, DecodePlan, Dispatch, KeepPlan,
                               PolicyOptions, PolicySet, ScalingPolicy, SchedulingPolicy)
from esp.policies.common import pick_master
from esp.policies.fcfs import FCFSScheduling


def everyone(view: ClusterView) -> tuple[int, ...] | None:
    return tuple(range(view.num_instances)) if len(view.idle) == view.num_instances else None


class StaticSPScheduling(SchedulingPolicy):
    """FCFS admission, only when the whole cluster is idle (one group, one step at a time)."""

    def dispatch(self, view: ClusterView) -> Dispatch:
        if everyone(view) is None:
            return Dispatch()
        return FCFSScheduling(self.options).dispatch(view)


class StaticSPBatching(BatchingPolicy):
    def prefill_batches(self, view: ClusterView, dispatch: Dispatch) -> list[Batch]:
        return [Batch(dispatch.request_ids, dispatch.instances)] if dispatch.request_ids else []

    def decode_batches(self, view: ClusterView, instances: frozenset[int]) -> list[Batch]:
        group = everyone(view)
        if group is None or not view.running:
            return []
        return [Batch(tuple(r.request_id for r in view.running[: self.options.max_batch_size]), group)]


class StaticSPScaling(ScalingPolicy):
    def keep_plan(self, view: ClusterView, batch: Batch) -> KeepPlan:
        free = {i: view.free_slots[i] for i in batch.group}
        lengths = {r.request_id: r.prompt_len for r in view.waiting}
        ranges = {}
        for rid in batch.request_ids:
            share, left = dict.fromkeys(batch.group, 0), lengths[rid]
            while left:
                open_ranks = [i for i in batch.group if free[i] > share[i]]
                if not open_ranks:
                    break
                each = max(1, left // len(open_ranks))
                for i in open_ranks:
                    take = min(each, free[i] - share[i], left)
                    share[i] += take
                    left -= take
            for i in batch.group:
                free[i] -= share[i]
            ranges[rid] = tuple((i, n) for i, n in share.items() if n)
        return KeepPlan(ranges)

    def decode_plan(self, view: ClusterView, batch: Batch) -> DecodePlan:
        free = {i: view.free_slots[i] for i in batch.group}
        group, masters = set(batch.group), {}
        for r in view.running:
            if r.request_id in batch.request_ids:
                master = pick_master(r, group, free, [])
                if master is not None:
                    masters[r.request_id] = master
        return DecodePlan(batch.group, masters)


def static_sp(options: PolicyOptions) -> PolicySet:
    return PolicySet("static-sp", StaticSPScheduling(options), StaticSPBatching(options), StaticSPScaling(options))
