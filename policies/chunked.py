"""`chunked`: replicas with chunked prefill mixed into decode batches (Sarathi-Serve /
SplitFuse style). Each step of an instance has a token budget, `chunk_size`
(`--chunk-size`, default 2048): its decode tokens first, then prompt chunks filling the rest
— the prefill it has started, then new requests in arrival order. A long prompt therefore
never stalls the decodes on its instance for more than one budget-sized step.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from esp.policies.base import (Batch, BatchingPolicy, ClusterView, Dispatch, PolicyOptions, PolicySet,
                               SchedulingPolicy)
from esp.policies.common import batches_by_holders
from esp.policies.replicas import ReplicaScaling

DEFAULT_CHUNK = 2048


def chunk_size(options: PolicyOptions) -> int:
    return int(options.extra.get("chunk_size") or DEFAULT_CHUNK)


@dataclass
class _Instance:
    """Token `budget` left in the step, `free` slots left now, `room`: free slots not reserved
    for the rest of the prompts already started there."""

    budget: int
    free: int
    riders: list[int]
    room: int = 0
    chunks: dict[int, int] = field(default_factory=dict)

    def take(self, request_id: int, tokens: int) -> None:
        n = min(tokens, self.budget, self.free)
        if n > 0:
            self.chunks[request_id] = n
            self.budget -= n
            self.free -= n


def plan_chunks(view: ClusterView, chunk: int, max_batch: int) -> dict[int, _Instance]:
    """What each idle instance runs in its next step. Memory admission reserves a new
    request's whole prompt plus one slot on its instance."""
    plan: dict[int, _Instance] = {}
    for i in sorted(view.idle):
        riders = [r.request_id for r in view.running if set(r.kv_tokens) == {i}][:max_batch]
        free = view.free_slots[i] - len(riders)
        plan[i] = _Instance(max(0, chunk - len(riders)), free, riders, free)
    started = [r for r in view.waiting if r.kv_tokens]
    for r in started:
        if len(r.kv_tokens) == 1 and next(iter(r.kv_tokens)) in plan:
            plan[next(iter(r.kv_tokens))].room -= r.remaining_prompt + 1
    for r in started:
        if len(r.kv_tokens) == 1 and next(iter(r.kv_tokens)) in plan:
            plan[next(iter(r.kv_tokens))].take(r.request_id, r.remaining_prompt)
    for r in view.waiting:
        if r.kv_tokens:
            continue
        fits = [i for i, inst in plan.items() if inst.budget > 0 and inst.room >= r.prompt_len + 1]
        if not fits:
            break
        inst = plan[max(fits, key=lambda i: (plan[i].room, -i))]
        inst.take(r.request_id, r.prompt_len)
        inst.room -= r.prompt_len + 1
    return {i: inst for i, inst in plan.items() if inst.chunks}


class ChunkedScheduling(SchedulingPolicy):
    def dispatch(self, view: ClusterView) -> Dispatch:
        plan = plan_chunks(view, chunk_size(self.options), self.options.max_batch_size)
        return Dispatch(tuple(rid for inst in plan.values() for rid in inst.chunks), tuple(plan))


class ChunkedBatching(BatchingPolicy):
    """One mixed batch per instance with prefill work; plain decode batches elsewhere."""

    def prefill_batches(self, view: ClusterView, dispatch: Dispatch) -> list[Batch]:
        plan = plan_chunks(view, chunk_size(self.options), self.options.max_batch_size)
        chosen = set(dispatch.request_ids)
        batches = []
        for i, inst in plan.items():
            chunks = {rid: n for rid, n in inst.chunks.items() if rid in chosen}
            if chunks:
                batches.append(Batch(tuple(chunks), (i,), chunks, tuple(inst.riders)))
        return batches

    def decode_batches(self, view: ClusterView, instances: frozenset[int]) -> list[Batch]:
        ready = [r for r in view.running if r.kv_tokens and set(r.kv_tokens) <= instances]
        return batches_by_holders(ready, self.options.max_batch_size)


def chunked(options: PolicyOptions) -> PolicySet:
    return PolicySet("chunked", ChunkedScheduling(options), ChunkedBatching(options), ReplicaScaling(options))
