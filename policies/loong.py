"""The `loong` bundle: elastic sequence parallelism with LoongServe's scheduler (paper section 5).

1. dispatch (`LoongScheduling`): FCFS with memory admission on each request's future
   maximum KV, stopping the prefill batch at the cost model's tipping point, with bounded
   out-of-order admission;
2. elastic instance allocation: the idle instances;
3. batching (`LoongBatching`): the dynamic program of `batching_dp` over length-sorted
   requests and free-slot-sorted instances;
4. scaling (`GreedyScaling`): keep plans on the fewest instances with room, multi-master
   decode that scales up onto idle instances when the holders are full.
"""
from __future__ import annotations

import math

from esp.policies.base import Batch, ClusterView, Dispatch, PolicyOptions, PolicySet, SchedulingPolicy
from esp.policies.batching_dp import plan_batches
from esp.policies.common import running_on
from esp.policies.cost_model import CostModel
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
        instances = tuple(sorted(view.idle))
        max_s = extra.get("max_prefill_s") or cost.prefill_time([self.options.max_prefill_tokens], 1)
        lookahead = int(extra.get("lookahead", 4))
        max_overtaken = float(extra.get("max_overtaken_s", 10.0))
        room_now = sum(view.free_slots[i] - running_on(view, i) for i in instances)
        room_future = sum(view.free_slots) - sum(r.max_kv_tokens - r.context_len for r in view.running)
        chosen: list[int] = []
        lengths: list[int] = []
        skipped = 0
        for req in view.waiting:
            alone = not chosen and not view.running
            fits = req.prompt_len + 1 <= room_now and (alone or req.max_kv_tokens <= room_future)
            if not fits:
                skipped += 1
                if skipped > lookahead or view.now - req.arrival_s > max_overtaken:
                    break
                continue
            if chosen and (len(chosen) >= self.options.max_batch_size
                           or cost.prefill_time(lengths + [req.prompt_len], len(instances)) > max_s):
                break
            chosen.append(req.request_id)
            lengths.append(req.prompt_len)
            room_now -= req.prompt_len + 1
            room_future -= req.max_kv_tokens
        return Dispatch(tuple(chosen), instances if chosen else ())


class LoongBatching(FCFSBatching):
    """Prefill batches from the dynamic program (paper Eq. 5); decode as FCFS batching."""

    def prefill_batches(self, view: ClusterView, dispatch: Dispatch) -> list[Batch]:
        if not dispatch.request_ids:
            return []
        cost = view.cost_model or FALLBACK_COST
        length = {r.request_id: r.prompt_len for r in view.waiting}
        reqs = sorted(dispatch.request_ids, key=lambda rid: (length[rid], rid))
        insts = sorted(dispatch.instances, key=lambda i: (-view.free_slots[i], i))
        total, splits = plan_batches([length[r] for r in reqs], [view.free_slots[i] for i in insts],
                                     cost.prefill_time_of_sums)
        if math.isinf(total):
            return super().prefill_batches(view, dispatch)
        return [Batch(tuple(reqs[s.r0:s.r1]), tuple(sorted(insts[s.i0:s.i1]))) for s in splits]


def loong(options: PolicyOptions) -> PolicySet:
    return PolicySet("loong", LoongScheduling(options), LoongBatching(options), GreedyScaling(options))
