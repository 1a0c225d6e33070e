"""The control plane (DESIGN 5): queues, KV placement, policies in, validated plans out.

`schedule()` asks the policies for decisions on the idle instances, validates them,
allocates the slots they need and returns the steps to run; `complete()` applies a step's
sampled tokens. The scheduler is plain synchronous code, testable on CPU with hand-made
`StepResult`s.
"""
from __future__ import annotations

import time
from array import array
from collections import deque
from dataclasses import dataclass, replace
from types import MappingProxyType

from esp.engine.kv_pool import SlotAllocator
from esp.engine.protocol import (DecodeBatch, DecodeRows, DecodeSeq, KeepRange, MigrateKV, MixedBatch, PrefillBatch,
                                 PrefillSeq, SampleSpec, Step)
from esp.engine.request import Request, Status
from esp.engine.validation import (PolicyViolation, check_decode, check_decode_batches, check_dispatch,
                                   check_keep_plan, check_migrations, check_riders)
from esp.policies.base import Batch, ClusterView, DecodePlan, PolicySet, RequestView, ScalingPolicy
from esp.policies.cost_model import CostModel


class WaitingQueue(deque):
    """The waiting queue, with an `epoch` that changes whenever it or a member's state does,
    so the policies' view of it is rebuilt only then."""

    epoch = 0

    def touch(self) -> None:
        self.epoch += 1

    def append(self, item) -> None:
        super().append(item)
        self.touch()

    def appendleft(self, item) -> None:
        super().appendleft(item)
        self.touch()

    def remove(self, item) -> None:
        super().remove(item)
        self.touch()

    def popleft(self):
        self.touch()
        return super().popleft()


@dataclass(frozen=True)
class InFlight:
    step: Step
    request_ids: tuple[int, ...]


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
        self._waiting_view: tuple[int, tuple[RequestView, ...]] = (-1, ())
        self.busy: set[int] = set()
        self.in_flight: dict[int, InFlight] = {}
        self.releases: dict[int, list[int]] = {}
        self.stuck: list[Request] = []
        self._views: dict[int, tuple[tuple, RequestView]] = {}
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

    def abort(self, request_id: int) -> Request | None:
        """Abort now if the request is not in a step; else when its step completes."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        if req.in_flight:
            req.abort_requested = True
            return None
        if req.status is Status.WAITING:
            self.waiting.remove(req)
        self._finish(req, "abort")
        return req

    def end(self, request_id: int, reason: str, error: str | None = None) -> Request:
        """End a request now, even in a step (its slots are freed when the step comes back)."""
        req = self.requests[request_id]
        if req.in_flight:
            req.abort_requested = True
            req.finish(reason, error)
        else:
            self._finish(req, reason, error)
        return req

    @property
    def has_work(self) -> bool:
        return bool(self.requests)

    # -- schedule -----------------------------------------------------------------------
    def view(self) -> ClusterView:
        now = self.clock()
        running = tuple(self._view(r, now) for r in self.running.values() if not r.in_flight)
        return ClusterView(
            now=now, capacity=tuple(a.num_slots for a in self.allocators),
            free_slots=tuple(a.num_free for a in self.allocators),
            idle=frozenset(range(len(self.allocators))) - self.busy,
            waiting=self._waiting_views(now), running=running, cost_model=self.cost_model)

    def _waiting_views(self, now: float) -> tuple[RequestView, ...]:
        epoch, views = self._waiting_view
        if epoch != self.waiting.epoch:
            views = tuple(self._view(r, now) for r in self.waiting if not r.in_flight)
            self._waiting_view = (self.waiting.epoch, views)
        return views

    def _view(self, r: Request, now: float) -> RequestView:
        """The request's view, rebuilt only after its status, tokens or placement changed."""
        key = (r.status, len(r.output_ids), r.placement_version)
        cached = self._views.get(r.id)
        if cached is not None and cached[0] == key:
            return cached[1]
        prompt = len(r.prompt_ids) + len(r.output_ids) if r.status is Status.WAITING else len(r.prompt_ids)
        view = RequestView(r.id, r.arrival, prompt, len(r.output_ids), r.params.max_tokens,
                           MappingProxyType({k: len(v) for k, v in r.placement.items()}))
        self._views[r.id] = (key, view)
        return view

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
                if len(self.busy) == len(self.allocators):
                    break
                view = view or self.view()
                new = self._guard(stage, view, failed)
                if new:
                    steps += new
                    view = None
            if steps or self.in_flight or not self._preempt_if_stuck():
                failed += self.stuck
                self.stuck = []
                return steps, failed

    def _guard(self, stage, view: ClusterView, failed: list[Request]) -> list[Step]:
        try:
            return stage(view)
        except PolicyViolation as err:
            self._reject(err, failed)
            return []

    def _reject(self, err: PolicyViolation, failed: list[Request]) -> None:
        """End the requests a broken rule names (those not in a step) with its message."""
        for rid in err.request_ids:
            req = self.requests.get(rid)
            if req is not None and not req.in_flight:
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
        for batch, plan in plans:
            check_keep_plan(p, view, dispatch, batch, plan, [b for b, _ in plans])
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
        return [self._prefill_step(batch, plan.ranges, rider)
                for (batch, plan), rider in zip(plans, riders)]

    def _prefill_step(self, batch: Batch, ranges, riders: DecodePlan | None) -> PrefillBatch | MixedBatch:
        """Prefill (or a chunk of it: tokens after the KV a request holds) with decode riders."""
        seqs = []
        for rid in batch.request_ids:
            req = self.requests[rid]
            first = start = req.num_kv
            end = start + sum(n for _, n in ranges[rid])
            final = end == req.num_tokens
            if final:
                self.waiting.remove(req)
                req.status = Status.RUNNING
                self.running[rid] = req
                req.sampling_on.update(batch.group)
            req.in_flight = True
            if req.scheduled_at is None:
                req.scheduled_at = self.clock()
            self.waiting.touch()
            keep = []
            for rank, n in ranges[rid]:
                slots = self.allocators[rank].allocate(n)
                req.placement.setdefault(rank, array("q")).extend(slots)
                req.placement_version += 1
                keep.append(KeepRange(rank, start, start + n, slots))
                start += n
            record = {"group": list(batch.group), "keep": {str(r): n for r, n in ranges[rid]}}
            if first or not final:
                record["chunk"] = [first, end]
            req.esp["prefill"].append(record)
            seqs.append(PrefillSeq(rid, req.all_ids[first:end], tuple(keep),
                                   self._sample_spec(req) if final else None, first))
        ids = batch.request_ids
        if riders or any(s.start or s.sample is None for s in seqs):
            rows, sampling = self._decode_rows(batch.decode_ids, riders) if riders else (DecodeRows(), {})
            step = MixedBatch(self._step_id(), batch.group, tuple(seqs), rows, sampling)
            ids += tuple(rows.request_ids)
        else:
            step = PrefillBatch(self._step_id(), batch.group, tuple(seqs))
        return self._launch(step, Batch(ids, batch.group))

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
                view = replace(view, idle=view.idle - set(plan.group),
                               free_slots=tuple(a.num_free for a in self.allocators))
        return steps

    def _decode_step(self, batch: Batch, plan: DecodePlan) -> DecodeBatch:
        steps = self._decode_steps(plan)
        rows, sampling = self._decode_rows(batch.request_ids, plan, steps)
        return self._launch(DecodeBatch(self._step_id(), tuple(plan.group), rows, steps, sampling),
                            Batch(tuple(rows.request_ids), tuple(plan.group)))

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

    def _decode_rows(self, request_ids: tuple[int, ...], plan: DecodePlan, steps: int = 1
                     ) -> tuple[DecodeRows, dict]:
        """The batch's rows, and `(params, seed)` of the requests whose master has not got them."""
        rows, sampling = DecodeRows(), {}
        group = tuple(plan.group)
        for rid in request_ids:
            if rid not in plan.masters:
                continue
            req, master = self.requests[rid], plan.masters[rid]
            slots = self.allocators[master].allocate(steps)
            position = req.num_kv
            if master not in req.placement:
                req.esp["scale_events"].append({"kind": "scale_up", "rank": master, "at_token": position})
                held = array("q")
            else:
                held = req.placement.pop(master)
            held.extend(slots)
            req.placement[master] = held
            req.placement_version += 1
            req.in_flight = True
            if master not in req.sampling_on:
                sampling[rid] = (req.params, req.seed)
                req.sampling_on.add(master)
            req.record_decode(group, master, steps)
            rows.append(DecodeSeq(rid, req.output_ids[-1], position, master, slots[0], tuple(req.placement),
                                  len(req.output_ids), tuple(slots[1:])))
        return rows, sampling

    def _free_unused(self, req: Request, step: DecodeBatch, produced: int) -> None:
        """A multi-step round that ended early (the simulator's, on a new arrival) leaves the
        slots of its unrun iterations at the end of the master's placement: free them."""
        surplus = step.steps - produced
        if surplus <= 0:
            return
        master = step.rows.masters[step.rows.request_ids.index(req.id)]
        slots = req.placement[master]
        self.allocators[master].free(slots[-surplus:])
        del slots[-surplus:]
        req.placement_version += 1

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
        req.in_flight = True
        req.esp["scale_events"].append({"kind": "migrate", "src": src, "dst": dst, "tokens": tokens})
        step = MigrateKV(self._step_id(), request_id, src, dst, src_slots, dst_slots, chunk)
        return self._launch(step, Batch((request_id,), step.group))

    def _complete_migration(self, move: MigrateKV) -> Request:
        req = self.requests[move.request_id]
        req.in_flight = False
        self.allocators[move.src].free(move.src_slots)
        kept = req.placement.pop(move.src)[: -len(move.src_slots)]
        if kept:
            req.placement[move.src] = kept
        req.placement[move.dst] = req.placement.pop(move.dst, array("q")) + move.dst_slots
        req.placement_version += 1
        if req.abort_requested:
            self._finish(req, "abort")
        return req

    def _preempt_if_stuck(self) -> bool:
        """Last resort when nothing can run: recompute the newest running request later. A lone
        request that has filled every pool ends with an error instead."""
        running = [r for r in self.running.values() if not r.in_flight]
        running += [r for r in self.waiting if r.placement and not r.in_flight]
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
        self.waiting.touch()
        victim.esp["preemptions"] += 1
        if victim.status is Status.RUNNING:
            victim.status = Status.WAITING
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
            if req is None or req.finish_reason or req.abort_requested:
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
        self.busy -= set(step.group)
        if isinstance(step, MigrateKV):
            req = self._complete_migration(step)
            return [req] if req.finish_reason else []
        failed = failed or {}
        first = dict(zip(step.rows.request_ids, step.rows.indices)) \
            if isinstance(step, DecodeBatch) and step.steps > 1 else None
        touched = []
        for rid in flight.request_ids:
            req = self.requests[rid]
            req.in_flight = False
            if req.abort_requested:
                self._finish(req, "abort")
            elif rid in failed:
                self._finish(req, "error", failed[rid])
            elif req.finish_reason:  # it ended on a token streamed earlier in the round
                self._finish(req, req.finish_reason)
            elif rid in sampled:
                tokens = sampled[rid] if isinstance(sampled[rid], list) else [sampled[rid]]
                for token in tokens:
                    req.append(token)
                    if req.finish_reason:
                        self._finish(req, req.finish_reason)
                        break
                else:
                    if first is not None:
                        self._free_unused(req, step, len(req.output_ids) - first[rid])
            elif req.status is Status.WAITING:
                self.waiting.touch()
                continue
            else:
                self._finish(req, "error", f"step {step_id} returned no token for this request")
            touched.append(req)
        return touched

    def fail(self, step_id: int, message: str, max_failures: int = 2) -> list[Request]:
        """A step failed in the backend. Its requests go back to the waiting queue to be
        recomputed from their prompt plus the tokens they already have; one that has now been
        in `max_failures` failed steps ends with the error instead. Returns the ended ones."""
        flight = self.in_flight.pop(step_id)
        self.busy -= set(flight.step.group)
        ended = []
        for rid in flight.request_ids:
            req = self.requests.get(rid)
            if req is None:
                continue
            req.in_flight = False
            req.failures += 1
            if req.abort_requested:
                self._finish(req, "abort")
            elif req.failures >= max_failures:
                self._finish(req, "error", f"{message} (the request failed {req.failures} steps; not retried)")
            else:
                self._requeue(req)
                continue
            ended.append(req)
        return ended

    def _requeue(self, req: Request) -> None:
        """Drop the request's KV and put it back at the head of the waiting queue, in arrival order."""
        self._free(req)
        req.recomputed += 1
        self.recomputed_total += 1
        if req.status is Status.RUNNING:
            req.status = Status.WAITING
            del self.running[req.id]
        else:
            self.waiting.remove(req)
        ahead = next((i for i, r in enumerate(self.waiting) if (r.arrival, r.id) > (req.arrival, req.id)),
                     len(self.waiting))
        self.waiting.insert(ahead, req)
        self.waiting.touch()

    def reset(self, kv_slots: list[int]) -> None:
        """The backend restarted with empty pools: every request is recomputed, oldest first."""
        assert not self.in_flight, "reset with steps in flight"
        self.allocators = [SlotAllocator(n) for n in kv_slots]
        self.busy.clear()
        self.releases.clear()
        for req in sorted(self.requests.values(), key=lambda r: (r.arrival, r.id)):
            held = bool(req.placement) or req.status is Status.RUNNING
            req.placement = {}
            req.sampling_on = set()
            req.placement_version += 1
            if held:
                req.recomputed += 1
                self.recomputed_total += 1
            if req.status is Status.RUNNING:
                req.status = Status.WAITING
                del self.running[req.id]
        self.waiting.clear()
        self.waiting.extend(sorted(self.requests.values(), key=lambda r: (r.arrival, r.id)))
        self.waiting.touch()

    # -- helpers ------------------------------------------------------------------------
    def _launch(self, step: Step, batch: Batch) -> Step:
        """Mark the step's instances busy and its requests in it; the releases pending for its
        members ride on it."""
        released = {r: tuple(self.releases.pop(r)) for r in step.group if r in self.releases}
        if released:
            step = replace(step, released=released)
        self.busy |= set(step.group)
        self.in_flight[step.step_id] = InFlight(step, batch.request_ids)
        return step

    def _step_id(self) -> int:
        self._next_step += 1
        return self._next_step

    @staticmethod
    def _sample_spec(req: Request) -> SampleSpec:
        return SampleSpec(req.params, req.seed, len(req.output_ids))

    def _finish(self, req: Request, reason: str, error: str | None = None) -> None:
        if req.status is Status.WAITING and req in self.waiting:
            self.waiting.remove(req)
        if not req.finish_reason:
            req.finish(reason, error)
        self._free(req)
        self.requests.pop(req.id, None)
        self.running.pop(req.id, None)
        self._views.pop(req.id, None)

    def _free(self, req: Request) -> None:
        """Free the request's slots; the instances that know it forget it with their next step."""
        for rank, slots in req.placement.items():
            self.allocators[rank].free(slots)
        for rank in req.sampling_on.union(req.placement):
            self.releases.setdefault(rank, []).append(req.id)
        req.placement = {}
        req.sampling_on = set()
        req.placement_version += 1

    def free_slots(self) -> list[int]:
        return [a.num_free for a in self.allocators]
