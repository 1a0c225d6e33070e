"""First-come-first-served components: the simple elastic policy.

Prefill each dispatched batch on all idle instances, keep each request's KV on as few
instances as possible (most-used instance with room first), and give each decoding
request a master with a free slot, adding an idle instance when the group is full.
"""
from __future__ import annotations

from esp.policies.base import (Batch, BatchingPolicy, ClusterView, DecodePlan, Dispatch, KeepPlan,
                               ScalingPolicy, SchedulingPolicy)
from esp.policies.common import pick_master, spare_instances


def decode_reserve(view: ClusterView) -> int:
    """Slots held back on idle instances so that every running request can take its next step."""
    return len(view.running)


class FCFSScheduling(SchedulingPolicy):
    """Admit waiting requests in arrival order while their prompts fit in the idle instances'
    free slots and the batch stays under `max_prefill_tokens` (at least one request)."""

    def dispatch(self, view: ClusterView) -> Dispatch:
        instances = tuple(sorted(view.idle))
        room = sum(view.free_slots[i] for i in instances) - decode_reserve(view)
        chosen, tokens = [], 0
        for req in view.waiting:
            need = req.prompt_len + 1
            if need > room or (chosen and tokens + req.prompt_len > self.options.max_prefill_tokens):
                break
            if len(chosen) >= self.options.max_batch_size:
                break
            chosen.append(req.request_id)
            room -= need
            tokens += req.prompt_len
        return Dispatch(tuple(chosen), instances if chosen else ())


class FCFSBatching(BatchingPolicy):
    """One prefill batch of everything dispatched; one decode batch of every running request
    whose KV holders are all among the given instances."""

    def prefill_batches(self, view: ClusterView, dispatch: Dispatch) -> list[Batch]:
        if not dispatch.request_ids:
            return []
        return [Batch(dispatch.request_ids, dispatch.instances)]

    def decode_batches(self, view: ClusterView, instances: frozenset[int]) -> list[Batch]:
        ready = [r for r in view.running if r.kv_tokens.keys() <= instances]
        ready = ready[: self.options.max_batch_size]
        if not ready:
            return []
        group = sorted({rank for r in ready for rank in r.kv_tokens})
        return [Batch(tuple(r.request_id for r in ready), tuple(group))]


class GreedyScaling(ScalingPolicy):
    """Keep plans packed into the most-used instances with room; masters on holders with free
    slots (the holder of the newest tokens first), scaling up onto idle instances when full."""

    def keep_plan(self, view: ClusterView, batch: Batch) -> KeepPlan:
        free = {i: view.free_slots[i] for i in batch.group}
        by_id = view.waiting_by_id
        ranges = {}
        for rid in batch.request_ids:
            left, parts = by_id[rid].prompt_len, []
            for rank in sorted(free, key=lambda i: (-(view.capacity[i] - free[i]), i)):
                take = min(left, free[rank])
                if take:
                    parts.append((rank, take))
                    free[rank] -= take
                    left -= take
            ranges[rid] = tuple(parts)
        return KeepPlan(ranges)

    def decode_plan(self, view: ClusterView, batch: Batch) -> DecodePlan:
        free = {i: view.free_slots[i] for i in range(view.num_instances)}
        by_id = view.running_by_id
        group = set(batch.group)
        spare = spare_instances(view, group, free)
        masters = {}
        for rid in batch.request_ids:
            master = pick_master(by_id[rid], group, free, spare)
            if master is not None:
                masters[rid] = master
        return DecodePlan(tuple(sorted(group)), masters)
