"""The `loong` bundle: elastic sequence parallelism with LoongServe's scheduler (paper section 5),
and what it takes to win beyond the paper (docs/loong.md).

1. dispatch (`LoongScheduling`): waiting requests by highest response ratio or FCFS
   (`esp.policies.dispatch_order`), memory admission on each request's future maximum KV, the
   prefill batch stopped at the cost model's tipping point, bounded out-of-order admission;
2. elastic instance allocation (`first_instances`, `allocate_instances`): idle instances that
   hold no decode KV first; a decoding one only for memory, or when none other is idle and its
   decodes tolerate the pause; then more decoding ones while the paper's Eq. 1/2 gain in the
   batch's normalized input latency beats the cost to the decodes paused there;
3. batching (`LoongBatching`): the dynamic program of `batching_dp` (paper Eq. 5) over
   length-sorted requests and free-slot-sorted instances;
4. scaling (`esp.policies.loong_scaling.LoongScaling`): keep plans, KV spread for decode
   bandwidth, multi-master decode scale-up, consolidation by migration.

Knobs: `esp.policies.loong_options.LoongOptions`.
"""
from __future__ import annotations

import math

from esp.costs.cost_model import CostModel
from esp.policies.base import Batch, ClusterView, Dispatch, PolicyOptions, PolicySet, RequestView, SchedulingPolicy
from esp.policies.batching_dp import plan_batches
from esp.policies.decode_load import DecodeLoad
from esp.policies.dispatch_order import ORDERS
from esp.policies.fcfs import FCFSBatching
from esp.policies.loong_options import LoongOptions
from esp.policies.loong_scaling import FALLBACK_COST, LoongScaling

__all__ = ["LoongBatching", "LoongScaling", "LoongScheduling", "allocate_instances", "first_instances", "loong"]


class LoongScheduling(SchedulingPolicy):
    """Steps 1 and 2: which waiting requests prefill now, on which idle instances."""

    def __init__(self, options: PolicyOptions) -> None:
        super().__init__(options)
        self.loong = LoongOptions.of(options.extra)
        self._order = ORDERS[self.loong.order]()

    def dispatch(self, view: ClusterView) -> Dispatch:
        if not view.idle or not view.waiting:
            return Dispatch()
        cost, opts = view.cost_model or FALLBACK_COST, self.loong
        load = DecodeLoad.of(view, opts.tpot_target_s)
        preempt, queue, heads = opts.preempt, self._order, opts.lookahead + 1
        if preempt == "tolerable" and not view.idle - load.holding:
            if (opts.urgent_ratio < math.inf and queue.urgency(view, cost) >= opts.urgent_ratio) or \
                    (opts.slo_urgency and queue.slo_urgency(view, cost, heads) >= opts.slo_urgency):
                preempt = "always"
            elif queue.shortest_prefill(view, cost, heads) > max(load.tolerable_pause(i, cost, opts.pause_miss_share)
                                                                 for i in view.idle):
                return Dispatch()  # the common case under load, decided without ordering the queue
        order = queue(view, cost)
        instances, decoding, pause = first_instances(view, cost, load, order[:heads], preempt,
                                                     opts.pause_miss_share)
        if not instances:
            return Dispatch()
        batch = self._select(view, cost, load, order, instances, pause)
        placed = self._place(view, cost, load, batch, instances, decoding)
        if placed is None and batch:  # its prompts are all long and wait for room: the short ones after them go
            shorts = self._select(view, cost, load, order, instances, pause,
                                  skip=lambda r: _long_prefill(cost, r.prompt_len, opts) is not None)
            placed = self._place(view, cost, load, shorts, instances, decoding)
            if placed is None and not _anything_runs(view):  # nothing would end the wait
                placed = self._place(view, cost, load, batch, instances, decoding, room=False)
        if placed is None:
            return Dispatch()
        return Dispatch(tuple(r.request_id for r in placed[0]), tuple(sorted(placed[1])))

    def _place(self, view: ClusterView, cost: CostModel, load: DecodeLoad, batch: list[RequestView],
               instances: list[int], decoding: list[int],
               room: bool = True) -> tuple[list[RequestView], list[int]] | None:
        """Step 2 for a batch: its instances (:func:`allocate_instances`), with room kept for
        arrivals (:func:`room_for_arrivals`) if `room`; None when nothing of it starts now."""
        if not batch:
            return None
        opts = self.loong
        more = allocate_instances(view, cost, load, [r.prompt_len for r in batch], instances, decoding,
                                  opts.preempt, opts.pause_miss_share)
        return room_for_arrivals(view, cost, load, batch, more, opts) if opts.keep_free and room else (batch, more)

    def _select(self, view: ClusterView, cost: CostModel, load: DecodeLoad, order, instances: list[int],
                pause: float, skip=None) -> list[RequestView]:
        """Step 1's batch: prompts in `order` (but those `skip` names) while their KV fits now and
        in the future (at most `lookahead` that do not fit are overtaken, none that has waited
        `max_overtaken_s`), up to the tipping point or the tolerated `pause`. The first prompt
        goes whatever the tipping point, if its prefill fits the `pause`; one whose prefill does
        not is overtaken (within `lookahead`) until it has waited its patience."""
        opts = self.loong
        max_s = min(pause, opts.max_prefill_s or cost.prefill_time([self.options.max_prefill_tokens], 1))
        room_now = sum(view.free_slots[i] - load.newest[i] for i in instances)
        room_future = sum(view.free_slots) - load.future
        chosen: list[RequestView] = []
        tokens = squares = skipped = 0
        for req in order:
            if skip is not None and skip(req):
                continue
            alone = not chosen and not view.running
            n = req.prompt_len
            fits = n + 1 <= room_now and (alone or req.max_kv_tokens <= room_future)
            if not fits:
                skipped += 1
                if skipped > opts.lookahead or view.now - req.arrival_s > opts.max_overtaken_s:
                    break
                continue
            if chosen:
                if len(chosen) >= self.options.max_batch_size or cost.prefill_time_of_sums(
                        tokens + n, squares + n * n, len(chosen) + 1, len(instances)) > max_s:
                    break
            elif pause < math.inf and cost.prefill_time_of_sums(n, n * n, 1, len(instances)) > pause:
                skipped += 1
                if skipped > opts.lookahead or not _overtaken_for_pause(view, cost, req, opts):
                    break
                continue
            chosen.append(req)
            tokens, squares = tokens + n, squares + n * n
            room_now -= n + 1
            room_future -= req.max_kv_tokens
        return chosen


def first_instances(view: ClusterView, cost: CostModel, load: DecodeLoad, heads: list[RequestView], preempt: str,
                    miss_share: float = 0.0) -> tuple[list[int], list[int], float]:
    """The idle instances a prefill starts on, the idle decoding instances left for step 2, and
    the longest prefill that start allows (inf unless it pauses decodes). Instances that hold no
    decode KV come first; decoding ones join while those lack room for the first of `heads` (the
    front of the dispatch order). With none of those idle, `preempt` decides: `tolerable` takes
    the decoding instance whose decodes tolerate the longest pause
    (:meth:`DecodeLoad.tolerable_pause`) if that covers the prefill of one of `heads`, `always`
    the one with the most free slots, `never` none."""
    holding = load.holding
    free_first = sorted(view.idle - holding, key=lambda i: (-view.free_slots[i], i))
    decoding = sorted(view.idle & holding, key=lambda i: (-view.free_slots[i], i))
    need = heads[0].prompt_len + 1
    if free_first or not decoding:
        while decoding and sum(view.free_slots[i] - load.newest[i] for i in free_first) < need:
            free_first.append(decoding.pop(0))
        return free_first, decoding, math.inf
    if preempt == "always":
        return [decoding.pop(0)], decoding, math.inf
    if preempt == "never":
        return [], decoding, math.inf
    tolerance = {i: load.tolerable_pause(i, cost, miss_share) for i in decoding}
    best = max(decoding, key=lambda i: (tolerance[i], view.free_slots[i], -i))
    room = view.free_slots[best] - load.newest[best]
    if any(h.prompt_len < room and cost.prefill_time([h.remaining_prompt], 1) <= tolerance[best] for h in heads):
        decoding.remove(best)
        return [best], decoding, tolerance[best]
    return [], decoding, math.inf


def keep_room(view: ClusterView, cost: CostModel, load: DecodeLoad, lengths: list[int], chosen: list[int],
              keep: int, after_s: float, solo_after_s: float = math.inf) -> tuple[list[int], bool]:
    """Leave `keep` instances that hold no decode out of a prefill predicted to take longer than
    `after_s`, for the work that arrives meanwhile (replicas never block a short prompt behind a
    long one; an ESP group of every instance does). The instances left out are the decoding ones
    first, then those with the fewest free slots, while the rest still hold the batch's KV.
    Returns the instances and whether the room is kept. A prefill on one instance cannot leave
    any out: it keeps the room unless it takes longer than `solo_after_s` while fewer than `keep`
    other idle instances hold no decode (a 150K-token prompt on the last such instance blocks
    every chat prompt that arrives in the next 20 s on a TP2 instance)."""
    free_elsewhere = sum(1 for i in view.idle - set(chosen) if i not in load.holding)
    if free_elsewhere >= keep:
        return chosen, True
    alone_keeps = view.num_instances <= keep or cost.prefill_time(lengths, 1) <= solo_after_s
    if len(chosen) < 2:
        return chosen, alone_keeps
    if cost.prefill_time(lengths, len(chosen)) <= after_s:
        return chosen, True
    need = sum(lengths) + len(lengths)
    out = sorted(chosen, key=lambda i: (i not in load.holding, view.free_slots[i], -i))
    while free_elsewhere < keep and len(out) > 1:
        rest = out[1:]
        if sum(view.free_slots[i] - load.newest[i] for i in rest) < need:
            break
        free_elsewhere += out[0] not in load.holding
        out = rest
    return out, free_elsewhere >= keep or (len(out) < 2 and alone_keeps)


def room_for_arrivals(view: ClusterView, cost: CostModel, load: DecodeLoad, batch: list[RequestView],
                      instances: list[int], opts: LoongOptions) -> tuple[list[RequestView], list[int]] | None:
    """The batch and its instances after :func:`keep_room`. When the room cannot be kept (the
    batch's KV needs every idle instance), its long prompts (a prefill alone longer than
    `keep_free_after_s`) wait and the others go on, unless one of them has waited
    `keep_free_patience` times its prefill alone (or, with a TTFT target, the `slo_urgency` share
    of the target less that prefill, if sooner); None: the whole batch waits. Two 400K-token
    prompts on two instance pairs otherwise hold every instance for half a minute."""
    while True:
        lengths = [r.prompt_len for r in batch]
        kept, room_kept = keep_room(view, cost, load, lengths, instances, opts.keep_free, opts.keep_free_after_s,
                                    opts.keep_free_solo_after_s)
        if room_kept:
            return batch, kept
        alone = [_long_prefill(cost, n, opts) for n in lengths]
        long_ = [(r, t) for r, t in zip(batch, alone) if t is not None]
        if not long_ or any(view.now - r.arrival_s >= _patience(r, t, opts) for r, t in long_):
            return batch, kept
        if len(long_) == len(batch):
            return None
        batch = [r for r, t in zip(batch, alone) if t is None]


def _anything_runs(view: ClusterView) -> bool:
    """Whether a step is in flight or a decode will run: then the scheduler runs again, and long
    prompts may wait for room. On an idle cluster without decodes nothing would end the wait (the
    scheduler would fail the prompt as one it cannot place)."""
    return bool(view.running) or len(view.idle) < view.num_instances


def _long_prefill(cost: CostModel, prompt_len: int, opts: LoongOptions) -> float | None:
    """A prompt's prefill alone on one instance when longer than `keep_free_after_s`, else None."""
    t = cost.prefill_time([prompt_len], 1)
    return t if t > opts.keep_free_after_s else None


def _overtaken_for_pause(view: ClusterView, cost: CostModel, req: RequestView, opts: LoongOptions) -> bool:
    """Whether shorter prompts may go before `req`, whose prefill alone is longer than the pause
    the decodes of the instance it would take tolerate: until it has waited its patience
    (:func:`_patience`). Then it stops the queue, and the instances drain of decodes for it."""
    alone = cost.prefill_time([req.remaining_prompt], 1)
    return view.now - req.arrival_s < _patience(req, alone, opts)


def _patience(req: RequestView, alone: float, opts: LoongOptions) -> float:
    """How long a long prompt whose prefill alone takes `alone` waits for room."""
    limit = opts.keep_free_patience * alone
    if req.ttft_slo_s and opts.slo_urgency:
        limit = min(limit, max(0.0, opts.slo_urgency * req.ttft_slo_s - alone))
    return limit


def allocate_instances(view: ClusterView, cost: CostModel, load: DecodeLoad, lengths: list[int],
                       instances: list[int], decoding: list[int], preempt: str = "tolerable",
                       miss_share: float = 0.0) -> list[int]:
    """Step 2 (paper Eq. 1/2): add decoding instances while the gain beats the cost. Gain: the
    drop in the batch's prefill time times the sum of 1/len over its requests (normalized input
    latency). Cost: the decodes on the instance pause for the whole prefill, adding that time
    over each one's remaining output tokens (normalized output latency). With `tolerable`, the
    pause must also be one its decodes tolerate; with `never`, none is added."""
    chosen = list(instances)
    if preempt == "never":
        return chosen
    inverse_len = sum(1 / n for n in lengths)
    for cand in decoding:
        now, more = cost.prefill_time(lengths, len(chosen)), cost.prefill_time(lengths, len(chosen) + 1)
        paused = load.paused_weight(cand)
        if (now - more) * inverse_len <= more * paused:
            break
        if preempt == "tolerable" and more > load.tolerable_pause(cand, cost, miss_share):
            break
        chosen.append(cand)
    return chosen


class LoongBatching(FCFSBatching):
    """Prefill batches from the dynamic program (paper Eq. 5); decode as FCFS batching."""

    def prefill_batches(self, view: ClusterView, dispatch: Dispatch) -> list[Batch]:
        if not dispatch.request_ids:
            return []
        cost = view.cost_model or FALLBACK_COST
        wanted, length = set(dispatch.request_ids), {}
        for r in view.waiting:  # stop once all are found
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
