"""`replicas`: N independent instances, each with continuous batching, prefill first
(a vLLM-like baseline with TP=1 per instance). A request lives on one instance."""
from __future__ import annotations

from esp.policies.base import (Batch, BatchingPolicy, ClusterView, DecodePlan, Dispatch, KeepPlan,
                               PolicyOptions, PolicySet, ScalingPolicy, SchedulingPolicy)
from esp.policies.common import batches_by_holders, running_on


def assign(view: ClusterView, limit: int) -> dict[int, int]:
    """Waiting requests, in arrival order, onto the idle instance with the most room that fits
    the prompt; stops at the first request that fits nowhere (FCFS)."""
    newest = running_on(view)
    room = {i: view.free_slots[i] - newest[i] for i in view.idle}
    tokens = dict.fromkeys(room, 0)
    placed: dict[int, int] = {}
    for req in view.waiting:
        fits = [i for i in room if room[i] >= req.prompt_len + 1
                and (tokens[i] == 0 or tokens[i] + req.prompt_len <= limit)]
        if not fits:
            break
        rank = max(fits, key=lambda i: (room[i], -i))
        room[rank] -= req.prompt_len + 1
        tokens[rank] += req.prompt_len
        placed[req.request_id] = rank
    return placed


class ReplicaScheduling(SchedulingPolicy):
    def dispatch(self, view: ClusterView) -> Dispatch:
        placed = assign(view, self.options.max_prefill_tokens)
        return Dispatch(tuple(placed), tuple(sorted(set(placed.values()))))


class ReplicaBatching(BatchingPolicy):
    def prefill_batches(self, view: ClusterView, dispatch: Dispatch) -> list[Batch]:
        placed = assign(view, self.options.max_prefill_tokens)
        by_rank: dict[int, list[int]] = {}
        for rid in dispatch.request_ids:
            by_rank.setdefault(placed[rid], []).append(rid)
        return [Batch(tuple(ids), (rank,)) for rank, ids in sorted(by_rank.items())]

    def decode_batches(self, view: ClusterView, instances: frozenset[int]) -> list[Batch]:
        ready = [r for r in view.running if r.kv_tokens and set(r.kv_tokens) <= instances]
        return batches_by_holders(ready, self.options.max_batch_size)


class ReplicaScaling(ScalingPolicy):
    """No elasticity: KV stays on the prefill instance; the holder is the master, or the
    request waits when its instance is full."""

    def keep_plan(self, view: ClusterView, batch: Batch) -> KeepPlan:
        tokens = batch.prefill_tokens(view)
        return KeepPlan({rid: ((batch.group[0], tokens[rid]),) for rid in batch.request_ids})

    def decode_plan(self, view: ClusterView, batch: Batch) -> DecodePlan:
        free = {i: view.free_slots[i] for i in batch.group}
        masters = {}
        for r in view.running:
            if r.request_id in batch.request_ids:
                rank = list(r.kv_tokens)[-1]
                if free[rank] > 0:
                    masters[r.request_id] = rank
                    free[rank] -= 1
        return DecodePlan(batch.group, masters)


def replicas(options: PolicyOptions) -> PolicySet:
    return PolicySet("replicas", ReplicaScheduling(options), ReplicaBatching(options), ReplicaScaling(options))
