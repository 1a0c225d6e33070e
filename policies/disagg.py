"""`disagg`: P prefill instances and D decode instances (DistServe style). Prefill runs on
the prefill instances; after it, each request's KV is moved whole to one decode instance,
where it decodes. Options (`--prefill-instances`, `--decode-instances`): P defaults to half
the instances, D to the rest."""
from __future__ import annotations

from esp.policies.base import (Batch, BatchingPolicy, ClusterView, DecodePlan, Dispatch, KeepPlan, Migration,
                               PolicyOptions, PolicySet, ScalingPolicy, SchedulingPolicy)
from esp.policies.common import batches_by_holders, pick_master, spare_instances
from esp.policies.fcfs import FCFSScheduling, GreedyScaling


def split(view: ClusterView, options: PolicyOptions) -> tuple[frozenset[int], frozenset[int]]:
    """Prefill instances first, decode instances after them. With one instance it does both."""
    n = view.num_instances
    p = int(options.extra.get("prefill_instances") or max(1, n // 2))
    p = min(max(p, 1), max(n - 1, 1))
    d = int(options.extra.get("decode_instances") or n - p)
    return frozenset(range(p)), frozenset(range(p, min(n, p + d))) or frozenset(range(p))


class DisaggScheduling(SchedulingPolicy):
    """FCFS onto the idle prefill instances, admitting only what the decode instances can
    take afterwards."""

    def dispatch(self, view: ClusterView) -> Dispatch:
        prefill, decode = split(view, self.options)
        decode_room = sum(view.free_slots[i] for i in decode) - len(view.running)
        waiting = []
        for r in view.waiting:
            decode_room -= r.prompt_len + 1
            if decode_room < 0:
                break
            waiting.append(r)
        narrowed = ClusterView(view.now, view.capacity, view.free_slots, view.idle & prefill,
                               tuple(waiting), view.running, view.cost_model)
        return FCFSScheduling(self.options).dispatch(narrowed)


class DisaggBatching(BatchingPolicy):
    def prefill_batches(self, view: ClusterView, dispatch: Dispatch) -> list[Batch]:
        return [Batch(dispatch.request_ids, dispatch.instances)] if dispatch.request_ids else []

    def decode_batches(self, view: ClusterView, instances: frozenset[int]) -> list[Batch]:
        prefill, decode = split(view, self.options)
        if decode == prefill:
            ready = [r for r in view.running if set(r.kv_tokens) <= instances]
        else:
            ready = [r for r in view.running if set(r.kv_tokens) <= instances & decode]
        return batches_by_holders(ready, self.options.max_batch_size)


class DisaggScaling(ScalingPolicy):
    def keep_plan(self, view: ClusterView, batch: Batch) -> KeepPlan:
        return GreedyScaling(self.options).keep_plan(view, batch)

    def decode_plan(self, view: ClusterView, batch: Batch) -> DecodePlan:
        _, decode = split(view, self.options)
        free = {i: view.free_slots[i] for i in range(view.num_instances)}
        group = set(batch.group)
        spare = [i for i in spare_instances(view, group, free) if i in decode]
        masters = {}
        for r in view.running:
            if r.request_id in batch.request_ids:
                master = pick_master(r, group, free, spare)
                if master is not None:
                    masters[r.request_id] = master
        return DecodePlan(tuple(sorted(group)), masters)

    def migrations(self, view: ClusterView) -> list[Migration]:
        """Move each request's KV off the prefill instances, one holder at a time, onto the
        idle decode instance that already holds part of it or has the most free slots."""
        prefill, decode = split(view, self.options)
        if decode == prefill:
            return []
        free = {i: view.free_slots[i] for i in decode}
        busy: set[int] = set()
        moves = []
        for r in view.running:
            src = next((i for i in r.kv_tokens if i in prefill), None)
            if src is None or src not in view.idle or src in busy:
                continue
            tokens = r.kv_tokens[src]
            options = [i for i in decode if i in view.idle and i not in busy and free[i] >= tokens]
            if not options:
                continue
            dst = max(options, key=lambda i: (i in r.kv_tokens, free[i]))
            moves.append(Migration(r.request_id, src, dst, tokens))
            free[dst] -= tokens
            busy |= {src, dst}
        return moves


def disagg(options: PolicyOptions) -> PolicySet:
    return PolicySet("disagg", DisaggScheduling(options), DisaggBatching(options), DisaggScaling(options))
