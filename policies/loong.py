"""The `loong` bundle: elastic sequence parallelism with LoongServe's scheduler (paper section 5).

1. dispatch (`LoongScheduling`): FCFS with memory admission on each request's future
   maximum KV, stopping the prefill batch at the cost model's tipping point, with bounded
   out-of-order admission;
2. elastic instance allocation (`allocate_instances`): idle instances that hold no decode
   KV first; then idle decode instances, most free slots first, while the predicted gain in
   the batch's normalized input latency beats the predicted cost to the decodes paused there;
3. batching (`LoongBatching`): the dynamic program of `batching_dp` over length-sorted
   requests and free-slot-sorted instances;
4. scaling (`LoongScaling`): keep plans on the fewest instances with room, multi-master
   decode that scales up onto idle instances on memory pressure (holders full) and on
   compute pressure (more than `max_batch_per_master` requests on one master).
"""
from __future__ import annotations

import math
from collections import Counter

from esp.costs.cost_model import CostModel
from esp.policies.base import Batch, ClusterView, DecodePlan, Dispatch, PolicyOptions, PolicySet, SchedulingPolicy
from esp.policies.batching_dp import plan_batches
from esp.policies.common import first_with_room, spare_instances
from esp.policies.fcfs import FCFSBatching, GreedyScaling

FALLBACK_COST = CostModel({1: (1e-3, 1e-4, 1e-8)}, {1: (1e-3, 1e-5, 1e-8)}, 1e-5, 1e9, 1)


class LoongScheduling(SchedulingPolicy):
    """Options (`PolicyOptions.extra`): `max_prefill_s` (the tipping point; default the predicted
    time of `max_prefill_tokens` on one instance), `lookahead` (how many requests that do not
    fit a later one may overtake, default 4) and `max_overtaken_s` (a request waiting longer
    than this is never overtaken, default 10)."""

    def dispatch(self, view: ClusterView) -> Dispatch:
        if not view.idle or not view.waiting:
            return Dispatch()
        cost = view.cost_model or FALLBACK_COST
        extra = self.options.extra
        holding: set[int] = set()
        newest: Counter = Counter()  # running requests whose next token lands on each rank
        future = 0  # KV the running requests may still add
        for r in view.running:  # one pass (this runs at every scheduling round): r.max_kv_tokens - r.context_len
            kv = r.kv_tokens
            if kv:
                holding.update(kv)
                newest[next(reversed(kv))] += 1
            future += r.prompt_len + r.max_tokens - r.output_len - sum(kv.values())
        free_first = sorted(view.idle - holding, key=lambda i: (-view.free_slots[i], i))
        decoding = sorted(view.idle & holding, key=lambda i: (-view.free_slots[i], i))
        instances = free_first
        head = view.waiting[0].prompt_len + 1
        while decoding and (not instances or sum(view.free_slots[i] - newest[i] for i in instances) < head):
            instances.append(decoding.pop(0))
        instances = tuple(instances)
        max_s = extra.get("max_prefill_s") or cost.prefill_time([self.options.max_prefill_tokens], 1)
        lookahead = int(extra.get("lookahead", 4))
        max_overtaken = float(extra.get("max_overtaken_s", 10.0))
        room_now = sum(view.free_slots[i] - newest[i] for i in instances)
        room_future = sum(view.free_slots) - future
        chosen: list[int] = []
        lengths: list[int] = []
        tokens = squares = skipped = 0
        for req in view.waiting:
            alone = not chosen and not view.running
            n = req.prompt_len
            fits = n + 1 <= room_now and (alone or req.max_kv_tokens <= room_future)
            if not fits:
                skipped += 1
                if skipped > lookahead or view.now - req.arrival_s > max_overtaken:
                    break
                continue
            if chosen and (len(chosen) >= self.options.max_batch_size or cost.prefill_time_of_sums(
                    tokens + n, squares + n * n, len(chosen) + 1, len(instances)) > max_s):
                break
            chosen.append(req.request_id)
            lengths.append(n)
            tokens, squares = tokens + n, squares + n * n
            room_now -= n + 1
            room_future -= req.max_kv_tokens
        if not chosen:
            return Dispatch()
        return Dispatch(tuple(chosen), tuple(sorted(allocate_instances(view, cost, lengths, instances, decoding))))


def allocate_instances(view: ClusterView, cost: CostModel, lengths: list[int], instances: tuple[int, ...],
                       decoding: list[int]) -> list[int]:
    """Step 2: add decode instances while the gain beats the cost. Gain: the drop in the batch's
    prefill time times the sum of 1/len over its requests (normalized input latency). Cost:
    the decodes on the instance pause for the whole prefill, adding that time over each
    one's remaining output tokens (normalized output latency)."""
    chosen = list(instances)
    inverse_len = sum(1 / n for n in lengths)
    for cand in decoding:
        now, more = cost.prefill_time(lengths, len(chosen)), cost.prefill_time(lengths, len(chosen) + 1)
        paused = sum(1 / max(1, r.max_tokens - r.output_len) for r in view.running if cand in r.kv_tokens)
        if (now - more) * inverse_len <= more * paused:
            break
        chosen.append(cand)
    return chosen


class LoongScaling(GreedyScaling):
    """Greedy scaling plus scale-up on compute pressure: a master takes at most
    `max_batch_per_master` requests (option; default 128, about where a 7B model's decode turns
    compute-bound on an A800); beyond it, masters go to other group members or idle instances."""

    def decode_plan(self, view: ClusterView, batch: Batch) -> DecodePlan:
        plan = super().decode_plan(view, batch)
        limit = int(self.options.extra.get("max_batch_per_master", 128))
        load: dict[int, int] = {}
        for master in plan.masters.values():
            load[master] = load.get(master, 0) + 1
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
            load[target] = load.get(target, 0) + 1
            free[target] -= 1
            free[master] += 1
        return DecodePlan(tuple(sorted(group)), masters)


class LoongBatching(FCFSBatching):
    """Prefill batches from the dynamic program (paper Eq. 5); decode as FCFS batching."""

    def prefill_batches(self, view: ClusterView, dispatch: Dispatch) -> list[Batch]:
        if not dispatch.request_ids:
            return []
        cost = view.cost_model or FALLBACK_COST
        wanted, length = set(dispatch.request_ids), {}
        for r in view.waiting:  # dispatch takes from the front of the queue: stop once all are found
            if r.request_id in wanted:
                length[r.request_id] = r.prompt_len
                if len(length) == len(wanted):
                    break
        reqs = sorted(dispatch.request_ids, key=lambda rid: (length[rid], rid))
        insts = sorted(dispatch.instances, key=lambda i: (-view.free_slots[i], i))
        total, splits = plan_batches([length[r] for r in reqs], [view.free_slots[i] for i in insts],
                                     cost.prefill_coefficients)
        if math.isinf(total):
            return super().prefill_batches(view, dispatch)
        return [Batch(tuple(reqs[s.r0:s.r1]), tuple(sorted(insts[s.i0:s.i1]))) for s in splits]


def loong(options: PolicyOptions) -> PolicySet:
    return PolicySet("loong", LoongScheduling(options), LoongBatching(options), LoongScaling(options))
