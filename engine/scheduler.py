"""The control plane (DESIGN 5): queues, KV placement, policies in, validated plans out.

`schedule()` asks the policies for decisions on the idle instances, validates them,
allocates the slots they need and returns the steps to run; `complete()` applies a step's
sampled tokens. The scheduler is plain synchronous code, testable on CPU with hand-made
`StepResult`s.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from esp.engine.esp_record import EspEvent, MigrationEvent, PrefillPlacement, ScaleUpEvent
from esp.engine.slot_allocator import SlotAllocator
from esp.engine.views import ViewCache
from esp.engine.waiting_queue import WaitingQueue
from esp.engine.protocol import (DecodeBatch, DecodeRows, KeepRange, MigrateKV, MixedBatch, PrefillBatch,
                                 PrefillSeq, SampleSpec, Step)
from esp.engine.request import Request, Status
from esp.engine.validation import (PolicyViolation, check_decode, check_decode_batches, check_dispatch,
                                   check_migrations, check_prefill, check_riders)
from esp.policies.base import Batch, ClusterView, DecodePlan, PolicySet, ScalingPolicy
from esp.costs.cost_model import CostModel


@dataclass(frozen=True)
class InFlight:
    """A step on its way, and what it will add to its requests' ESP records when it completes."""

    step: Step
    request_ids: tuple[int, ...]
    records: dict[int, list[EspEvent]] = field(default_factory=dict)


class Scheduler:
    def __init__(self, policies: PolicySet, kv_slots: list[int], clock=time.monotonic,
                 cost_model: CostModel | None = None, decode_steps: int = 1) -> None:
        """`decode_steps` > 1: decode batches run up to that many iterations per round trip."""
        self.policies = policies
        self.decode_steps = decode_steps
        self.cost_model = cost_model
        self.allocators = [SlotAllocator(n) for n in kv_slots]
        self.clock = clock
        self.requests: dict[int, Request] = {}
        self.waiting = WaitingQueue()
        self.running: dict[int, Request] = {}
        self.in_flight: dict[int, InFlight] = {}
        self.releases: dict[int, list[int]] = {}
        self.stuck: list[Request] = []
        self.views = ViewCache()
        self._next_step = 0
        self.recomputed_total = 0

    # -- intake -------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        total = sum(a.num_slots for a in self.allocators)
        if len(req.prompt_ids) + 1 > total:
            raise ValueError(f"prompt of {len(req.prompt_ids)} tokens does not fit in the KV pools "
                             f"of all instances ({total} slots)")
        self.requests[req.id] = req
        self.waiting.append(req)
        self.views.build(req)  # on arrival, off the decision's path

    def abort(self, request_id: int) -> Request | None:
        """Abort a request now (in a step, its slots are freed when the step comes back)."""
        if request_id not in self.requests:
            return None
        return self.end(request_id, "abort")

    def end(self, request_id: int, reason: str, error: str | None = None) -> Request:
        """End a request now, even in a step (its slots are freed when the step comes back)."""
        req = self.requests[request_id]
        if req.in_step:
            req.finish(reason, error)
        else:
            self._finish(req, reason, error)
        return req

    @property
    def busy(self) -> set[int]:
        """Instances in a step."""
        return {rank for f in self.in_flight.values() for rank in f.step.group}

    @property
    def has_work(self) -> bool:
        return bool(self.requests)

    # -- schedule -----------------------------------------------------------------------
    def view(self, busy: set[int] | None = None) -> ClusterView:
        """The policies' picture now; `busy`: the instances in a step, if the caller has them."""
        return self.views.cluster(self.clock(), self.allocators, self.busy if busy is None else busy, self.waiting,
                                  self.running.values(), self.cost_model)

    def schedule(self) -> tuple[list[Step], list[Request]]:
        """Steps to run now, and requests that failed because a policy broke a rule."""
        steps: list[Step] = []
        failed: list[Request] = []
        migrates = type(self.policies.scaling).migrations is not ScalingPolicy.migrations
        while True:
            stages = [self._schedule_prefill] if self.waiting else []
            stages += [self._schedule_migrations] if migrates else []
            stages.append(self._schedule_decode)
            view = None
            for stage in stages:
                if view is None:
                    busy = self.busy
                    if len(busy) == len(self.allocators):
                        break  # no instance idle: the view (the whole queue's) is not built
                    view = self.view(busy)
                if not view.idle:
                    break
                new = self._guard(stage, view, failed)
                if new is None or new:  # steps launched or requests rejected: the view is stale
                    steps += new or []
                    view = None
            if steps or self.in_flight or not self._preempt_if_stuck():
                failed += self.stuck
                self.stuck = []
                return steps, failed

    def _guard(self, stage, view: ClusterView, failed: list[Request]) -> list[Step] | None:
        """The stage's steps; None when it broke a rule (the requests it names end)."""
        try:
            return stage(view)
        except PolicyViolation as err:
            self._reject(err, failed)
            return None

    def _reject(self, err: PolicyViolation, failed: list[Request]) -> None:
        """End the requests a broken rule names (those not in a step) with its message."""
        for rid in err.request_ids:
            req = self.requests.get(rid)
            if req is not None and not req.in_step:
                self._finish(req, "error", str(err))
                failed.append(req)

    def _schedule_prefill(self, view: ClusterView) -> list[Step]:
        p = self.policies
        dispatch = p.scheduling.dispatch(view)
        if not dispatch.request_ids:
            return []
        check_dispatch(p.scheduling, view, dispatch)
        batches = p.batching.prefill_batches(view, dispatch)
        plans = [(b, p.scaling.keep_plan(view, b)) for b in batches]
        check_prefill(p, view, dispatch, plans)
        check_riders(p.batching, view, batches)
        free = list(view.free_slots)
        for _, plan in plans:
            for parts in plan.ranges.values():
                for rank, n in parts:
                    free[rank] -= n
        after_keep = replace(view, free_slots=tuple(free))
        riders = []
        for batch in batches:
            rider = Batch(batch.decode_ids, batch.group)
            plan = p.scaling.decode_plan(after_keep, rider) if batch.decode_ids else None
            if plan is not None:
                check_decode(p, after_keep, rider, plan, fixed_group=True)
            riders.append(plan)
        prefilled: list[Request] = []
        steps = [self._prefill_step(batch, plan.ranges, rider, prefilled)
                 for (batch, plan), rider in zip(plans, riders)]
        self.waiting.remove_all(prefilled)
        return steps

    def _prefill_step(self, batch: Batch, ranges, riders: DecodePlan | None,
                      prefilled: list[Request]) -> PrefillBatch | MixedBatch:
        """Prefill (or a chunk of it: tokens after the KV a request holds) with decode riders;
        the requests whose prompt it completes are added to `prefilled`."""
        seqs, records, now = [], {}, self.clock()
        for rid in batch.request_ids:
            req = self.requests[rid]
            first = start = req.num_kv
            end = start + sum(n for _, n in ranges[rid])
            final = end == req.num_tokens
            req.enter_step()
            if final:
                prefilled.append(req)
                self.running[rid] = req
                req.sampling_on.update(batch.group)
            if req.scheduled_at is None:
                req.scheduled_at = now
            keep = []
            for rank, n in ranges[rid]:
                slots = self.allocators[rank].allocate(n)
                req.add_slots(rank, slots)
                keep.append(KeepRange(rank, start, start + n, slots))
                start += n
            records[rid] = [PrefillPlacement(batch.group, tuple(ranges[rid]),
                                             (first, end) if first or not final else None)]
            seqs.append(PrefillSeq(rid, req.token_slice(first, end), tuple(keep),
                                   self._sample_spec(req) if final else None, first))
        ids = batch.request_ids
        if riders or any(s.start or s.sample is None for s in seqs):
            rows, sampling = self._decode_rows(batch.decode_ids, riders, records=records) \
                if riders else (DecodeRows(), {})
            step = MixedBatch(self._step_id(), batch.group, tuple(seqs), rows, sampling)
            ids += tuple(rows.request_ids)
        else:
            step = PrefillBatch(self._step_id(), batch.group, tuple(seqs))
        return self._launch(step, Batch(ids, batch.group), records)

    def _schedule_decode(self, view: ClusterView) -> list[Step]:
        """Decode batches on disjoint groups; each batch's plan sees the instances that the
        batches planned before it took as busy, so scale-up never takes one twice."""
        if not view.running:
            return []
        p = self.policies
        batches = p.batching.decode_batches(view, view.idle)
        check_decode_batches(p.batching, view, batches)
        steps = []
        for batch in batches:
            if not set(batch.group) <= view.idle:
                continue  # an earlier batch scaled up onto it: this one runs next round
            plan = p.scaling.decode_plan(view, batch)
            try:
                check_decode(p, view, batch, plan)
            except PolicyViolation as err:  # the batches launched before it still run
                self._reject(err, self.stuck)
                continue
            if plan.masters:
                steps.append(self._decode_step(batch, plan))
                view = ClusterView(view.now, view.capacity, tuple([a.num_free for a in self.allocators]),
                                   view.idle - set(plan.group), view.waiting, view.running, view.cost_model)
        return steps

    def _decode_step(self, batch: Batch, plan: DecodePlan) -> DecodeBatch:
        steps = self._decode_steps(plan)
        records: dict[int, list[EspEvent]] = {}
        rows, sampling = self._decode_rows(batch.request_ids, plan, steps, records)
        return self._launch(DecodeBatch(self._step_id(), tuple(plan.group), rows, steps, sampling),
                            Batch(tuple(rows.request_ids), tuple(plan.group)), records)

    def _decode_steps(self, plan: DecodePlan) -> int:
        """Iterations for a multi-step batch: at most `decode_steps`, no more than any request
        may still generate, and within every master's free slots."""
        per_master: dict[int, int] = {}
        for master in plan.masters.values():
            per_master[master] = per_master.get(master, 0) + 1
        left = min((self.requests[rid].params.max_tokens - len(self.requests[rid].output_ids)
                    for rid in plan.masters), default=1)
        room = min((self.allocators[m].num_free // n for m, n in per_master.items()), default=1)
        return max(1, min(self.decode_steps, left, room))

    def _decode_rows(self, request_ids: tuple[int, ...], plan: DecodePlan, steps: int = 1,
                     records: dict[int, list[EspEvent]] | None = None) -> tuple[DecodeRows, dict]:
        """The batch's rows, and `(params, seed)` of the requests whose master has not got them;
        a master that holds none of a request's KV yet is a scale-up, noted in `records`."""
        rows, sampling = DecodeRows(), {}
        for rid in request_ids:
            if rid not in plan.masters:
                continue
            req, master = self.requests[rid], plan.masters[rid]
            slots = self.allocators[master].allocate(steps)
            position = req.num_kv
            if master not in req.placement and records is not None:
                records.setdefault(rid, []).append(ScaleUpEvent(master, position))
            req.add_slots(master, slots)
            req.enter_step()
            if master not in req.sampling_on:
                sampling[rid] = (req.params, req.seed)
                req.sampling_on.add(master)
            rows.add(rid, req.output_ids[-1], position, master, slots[0], sum(1 << r for r in req.placement),
                     len(req.output_ids), slots[1:])
        return rows, sampling

    def _free_unused(self, req: Request, step: DecodeBatch, master: int, produced: int) -> None:
        """A multi-step round that ended early (the simulator's, on a new arrival) leaves the
        slots of its unrun iterations at the end of the master's placement: free them."""
        surplus = step.steps - produced
        if surplus > 0:
            self.allocators[master].free(req.drop_last(master, surplus))

    def _schedule_migrations(self, view: ClusterView) -> list[Step]:
        if not view.running:
            return []
        moves = self.policies.scaling.migrations(view)
        check_migrations(self.policies.scaling, view, moves)
        return [self.migrate(m.request_id, m.src, m.dst, m.tokens) for m in moves]

    def migrate(self, request_id: int, src: int, dst: int, tokens: int, chunk: int = 4096) -> MigrateKV:
        """Start moving the last `tokens` KV tokens `src` holds of a request onto `dst`."""
        req = self.requests[request_id]
        src_slots = req.placement[src][-tokens:]
        dst_slots = self.allocators[dst].allocate(tokens)
        req.enter_step()
        step = MigrateKV(self._step_id(), request_id, src, dst, src_slots, dst_slots, chunk)
        return self._launch(step, Batch((request_id,), step.group), {request_id: [MigrationEvent(src, dst, tokens)]})

    def _complete_migration(self, move: MigrateKV, records: dict[int, list[EspEvent]]) -> Request:
        req = self.requests[move.request_id]
        self.allocators[move.src].free(req.drop_last(move.src, len(move.src_slots)))
        req.add_slots(move.dst, move.dst_slots)
        req.leave_step(sampled=False)
        req.esp.record(records.get(req.id, ()))
        if req.finish_reason:
            self._finish(req, req.finish_reason)
        return req

    def _preempt_if_stuck(self) -> bool:
        """Last resort when nothing can run: recompute the newest running request later. A lone
        request that has filled every pool ends with an error instead."""
        running = [r for r in self.running.values() if r.status is Status.RUNNING]
        running += [r for r in self.waiting if r.placement and r.status is Status.WAITING]
        if not running:
            if self.waiting:
                head = self.waiting.popleft()
                self._finish(head, "error", f"policy {self.policies.name} cannot place a request of "
                                            f"{head.num_tokens} tokens on an idle cluster with "
                                            f"{self.free_slots()} free slots")
                self.stuck.append(head)
                return True
            return False
        victim = max(running, key=lambda r: (r.arrival, r.id))
        if len(running) == 1 and not self.waiting:
            self._finish(victim, "error", f"KV cache full: the request holds {victim.num_kv} tokens and "
                                          f"no instance has a free slot")
            self.stuck.append(victim)
            return False
        self._free(victim)
        victim.esp.preemptions += 1
        if victim.status is Status.RUNNING:
            victim.requeue()
            del self.running[victim.id]
            self.waiting.appendleft(victim)
        return True

    # -- update -------------------------------------------------------------------------
    def apply_tokens(self, step_id: int, sampled: dict[int, int]) -> list[Request]:
        """Tokens streamed from an iteration of a round still in flight (`DecodeTokens`).
        Returns the requests that got one; a request that ends here stays in the step until
        it completes, and later tokens of it are dropped."""
        if step_id not in self.in_flight:
            return []
        touched = []
        for rid, token in sampled.items():
            req = self.requests.get(rid)
            if req is None or req.finish_reason:
                continue
            req.append(token)
            touched.append(req)
        return touched

    def complete(self, step_id: int, sampled: dict[int, int | list[int]],
                 failed: dict[int, str] | None = None) -> list[Request]:
        """Apply a finished step. Returns the requests that got a token or ended. `failed`
        requests failed alone inside the step (sampling): they end with that error."""
        flight = self.in_flight.pop(step_id)
        step = flight.step
        if isinstance(step, MigrateKV):
            req = self._complete_migration(step, flight.records)
            return [req] if req.finish_reason else []
        failed = failed or {}
        rows = step.rows if isinstance(step, DecodeBatch) else step.decode if isinstance(step, MixedBatch) else None
        first = {rid: (index, master) for rid, index, master in zip(rows.request_ids, rows.indices, rows.masters)} \
            if rows is not None else {}
        prompts = () if isinstance(step, DecodeBatch) else step.seqs
        expected = set(first) | {q.request_id for q in prompts if q.sample is not None}
        touched = []
        for rid in flight.request_ids:
            req = self.requests[rid]
            if rid in failed and not req.finish_reason:
                req.finish("error", failed[rid])
            got = sampled.get(rid)
            if got is not None:
                req.extend(got if isinstance(got, list) else [got])
            row = first.get(rid)
            if row is not None:
                produced = len(req.output_ids) - row[0]
                if isinstance(step, DecodeBatch) and not req.finish_reason:
                    self._free_unused(req, step, row[1], produced)
                req.esp.decode_groups[tuple(step.group)] += produced
                req.esp.masters[row[1]] += produced
            req.esp.record(flight.records.get(rid, ()))
            samples = rid in expected
            req.leave_step(samples)
            if req.finish_reason:
                self._finish(req, req.finish_reason, req.error)
            elif got is None and samples:
                self._finish(req, "error", f"step {step_id} returned no token for this request")
            elif got is None:
                continue  # a chunk that does not end its prompt
            touched.append(req)
        return touched

    def fail(self, step_id: int, message: str, max_failures: int = 2) -> list[Request]:
        """A step failed in the backend. Its requests go back to the waiting queue to be
        recomputed from their prompt plus the tokens they already have; one that has now been
        in `max_failures` failed steps ends with the error instead. Returns the ended ones."""
        flight = self.in_flight.pop(step_id)
        ended = []
        for rid in flight.request_ids:
            req = self.requests.get(rid)
            if req is None:
                continue
            req.leave_step(sampled=False)
            req.failures += 1
            if req.finish_reason:
                self._finish(req, req.finish_reason, req.error)
            elif req.failures >= max_failures:
                self._finish(req, "error", f"{message} (the request failed {req.failures} steps; not retried)")
            else:
                self._requeue(req)
                continue
            ended.append(req)
        return ended

    def _requeue(self, req: Request) -> None:
        """Drop the request's KV and put it back in the waiting queue, in arrival order."""
        self._free(req)
        req.recomputed += 1
        self.recomputed_total += 1
        if self.running.pop(req.id, None) is None:
            self.waiting.remove(req)
        req.requeue()
        ahead = next((i for i, r in enumerate(self.waiting) if (r.arrival, r.id) > (req.arrival, req.id)),
                     len(self.waiting))
        self.waiting.insert(ahead, req)

    def reset(self, kv_slots: list[int]) -> None:
        """The backend restarted with empty pools: every request is recomputed, oldest first."""
        assert not self.in_flight, "reset with steps in flight"
        self.allocators = [SlotAllocator(n) for n in kv_slots]
        self.releases.clear()
        for req in self.requests.values():
            if req.take_placement() or req.id in self.running:
                req.recomputed += 1
                self.recomputed_total += 1
            req.requeue()
        self.running.clear()
        self.waiting.clear()
        self.waiting.extend(sorted(self.requests.values(), key=lambda r: (r.arrival, r.id)))

    # -- helpers ------------------------------------------------------------------------
    def _launch(self, step: Step, batch: Batch, records: dict[int, list[EspEvent]] | None = None) -> Step:
        """Put the step in flight (its instances are busy until it completes); the releases
        pending for its members ride on it."""
        released = {r: tuple(self.releases.pop(r)) for r in step.group if r in self.releases}
        if released:
            step = replace(step, released=released)
        self.in_flight[step.step_id] = InFlight(step, batch.request_ids, records or {})
        return step

    def _step_id(self) -> int:
        self._next_step += 1
        return self._next_step

    @staticmethod
    def _sample_spec(req: Request) -> SampleSpec:
        return SampleSpec(req.params, req.seed, len(req.output_ids))

    def _finish(self, req: Request, reason: str, error: str | None = None) -> None:
        """End a request that is in no step: free everything it holds and forget it."""
        if self.running.pop(req.id, None) is None and req in self.waiting:
            self.waiting.remove(req)
        if not req.finish_reason:
            req.finish(reason, error)
        req.status = Status.FINISHED
        self._free(req)
        self.requests.pop(req.id, None)
        self.views.forget(req.id)

    def _free(self, req: Request) -> None:
        """Free the request's slots; the instances that know it forget it with their next step."""
        ranks = req.sampling_on.union(req.placement)
        for rank, slots in req.take_placement().items():
            self.allocators[rank].free(slots)
        for rank in ranks:
            self.releases.setdefault(rank, []).append(req.id)

    def free_slots(self) -> list[int]:
        return [a.num_free for a in self.allocators]
