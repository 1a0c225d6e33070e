"""The scheduler on CPU with hand-made worker outputs (no processes, no model)."""
from __future__ import annotations

from dataclasses import replace

import pytest

from esp.engine.esp_record import ScaleUpEvent
from esp.engine.protocol import DecodeBatch, PrefillBatch
from esp.engine.request import Status
from esp.engine.scheduler import Scheduler
from esp.policies import Batch, DecodePlan, KeepPlan, PolicyOptions, load_policy_set
from esp.policies.fcfs import GreedyScaling
from scheduler_helpers import EOS, make_request, run_until_idle

def loong():
    return load_policy_set("loong", PolicyOptions())


def test_single_instance_runs_to_length_and_frees_every_slot():
    s = Scheduler(loong(), [64])
    reqs = [make_request(i, 10 + i, max_tokens=3) for i in range(1, 4)]
    for r in reqs:
        s.add(r)
    steps = run_until_idle(s)
    assert isinstance(steps[0], PrefillBatch) and len(steps[0].seqs) == 3
    assert all(isinstance(st, DecodeBatch) for st in steps[1:])
    assert len(steps) == 1 + 2
    for r in reqs:
        assert r.finish_reason == "length" and r.output_ids == [5, 5, 5]
    assert s.free_slots() == [64] and not s.requests
    decode_positions = [seq.position for st in steps[1:] for seq in st.seqs if seq.request_id == 1]
    assert decode_positions == [11, 12]


def test_eos_and_stop_strings_finish():
    s = Scheduler(loong(), [64])
    a = make_request(1, 4, max_tokens=10)
    b = make_request(2, 4, max_tokens=10, stop=("ff",))
    s.add(a)
    s.add(b)
    s.schedule()
    s.complete(1, {1: EOS, 2: 5})
    assert a.finish_reason == "stop"
    steps, _ = s.schedule()
    s.complete(steps[0].step_id, {2: 5})
    assert b.finish_reason == "stop" and b.text == ""
    assert s.free_slots() == [64]


def test_keep_plan_spreads_a_long_prompt_when_one_pool_is_too_small():
    s = Scheduler(loong(), [1200] * 4)
    r = make_request(1, 3000, max_tokens=2)
    s.add(r)
    steps, _ = s.schedule()
    (prefill,) = steps
    assert prefill.group == (0, 1, 2, 3)
    keep = prefill.seqs[0].keep
    assert [k.end - k.start for k in keep] == [1200, 1200, 600]
    assert keep[0].start == 0 and all(a.end == b.start for a, b in zip(keep, keep[1:]))
    assert len({k.rank for k in keep}) == 3
    s.complete(prefill.step_id, {1: 7})
    steps, _ = s.schedule()
    (decode,) = steps
    assert set(decode.group) >= {k.rank for k in keep}
    assert decode.seqs[0].position == 3000
    s.complete(decode.step_id, {1: 7})
    assert r.finish_reason == "length" and s.free_slots() == [1200] * 4


def test_decode_scales_up_onto_an_idle_instance_when_holders_are_full():
    s = Scheduler(loong(), [8, 8])
    r = make_request(1, 8, max_tokens=3)
    s.add(r)
    steps, _ = s.schedule()
    assert steps[0].seqs[0].keep[0].end == 8
    holder = steps[0].seqs[0].keep[0].rank
    s.complete(steps[0].step_id, {1: 5})
    steps, _ = s.schedule()
    seq = steps[0].seqs[0]
    assert seq.master != holder and set(seq.holders) == {0, 1}
    assert not r.esp.scale_events  # recorded when the step completes
    s.complete(steps[0].step_id, {1: 5})
    assert r.esp.scale_events == [ScaleUpEvent(seq.master, 8)] and r.esp.masters == {seq.master: 1}  # from token 8 on
    run_until_idle(s)
    assert s.free_slots() == [8, 8]


def test_abort_in_flight_frees_slots_when_the_step_returns():
    s = Scheduler(loong(), [32])
    r = make_request(1, 5, max_tokens=8)
    s.add(r)
    steps, _ = s.schedule()
    assert s.abort(1) is r and r.finish_reason == "abort" and r.in_step
    assert s.free_slots() == [27]  # its prompt's slots stay taken while the step runs
    s.complete(steps[0].step_id, {1: 5})
    assert r.status is Status.FINISHED and s.free_slots() == [32] and not r.output_ids
    assert s.releases == {0: [1]}  # instance 0 forgets it with its next step
    s.add(make_request(2, 5))
    (step,), _ = s.schedule()
    assert step.released == {0: (1,)} and not s.releases


def test_abort_while_waiting():
    s = Scheduler(loong(), [32])
    s.add(make_request(1, 5))
    req = s.abort(1)
    assert req.finish_reason == "abort" and not s.waiting and not s.requests


def test_preempts_newest_when_no_slot_is_left():
    s = Scheduler(load_policy_set("loong", PolicyOptions(), scheduling="fcfs"), [12])
    old, new = make_request(1, 5, max_tokens=6), make_request(2, 5, max_tokens=6)
    s.add(old)
    s.add(new)
    run_until_idle(s)
    assert old.finish_reason == new.finish_reason == "length"
    assert new.esp.preemptions >= 1 and old.esp.preemptions == 0
    assert s.free_slots() == [12]


def test_loong_admits_on_future_kv_so_it_need_not_preempt():
    s = Scheduler(loong(), [12])
    old, new = make_request(1, 5, max_tokens=6), make_request(2, 5, max_tokens=6)
    s.add(old)
    s.add(new)
    steps = run_until_idle(s)
    assert old.finish_reason == new.finish_reason == "length"
    assert new.esp.preemptions == old.esp.preemptions == 0
    assert [seq.request_id for seq in steps[0].seqs] == [1]
    assert s.free_slots() == [12]


def test_failed_step_recomputes_once_then_ends_with_the_error_and_frees_slots():
    s = Scheduler(loong(), [32])
    r = make_request(1, 5)
    s.add(r)
    steps, _ = s.schedule()
    assert s.fail(steps[0].step_id, "worker 0 exited") == []
    assert r.finish_reason is None and r.recomputed == 1 and list(s.waiting) == [r] and s.free_slots() == [32]
    steps, _ = s.schedule()
    assert [seq.request_id for seq in steps[0].seqs] == [1] and steps[0].seqs[0].start == 0
    assert s.fail(steps[0].step_id, "worker 0 exited") == [r]
    assert r.finish_reason == "error" and "exited" in r.error and s.free_slots() == [32] and not s.requests


def test_failed_decode_recomputes_from_prompt_plus_streamed_tokens():
    s = Scheduler(loong(), [32])
    r = make_request(1, 5, max_tokens=6)
    s.add(r)
    steps, _ = s.schedule()
    s.complete(steps[0].step_id, {1: 40})
    steps, _ = s.schedule()
    s.complete(steps[0].step_id, {1: 41})
    steps, _ = s.schedule()
    s.fail(steps[0].step_id, "worker 0 exited")
    steps, _ = s.schedule()
    prefill = steps[0].seqs[0]
    assert prefill.token_ids == r.prompt_ids + [40, 41] and prefill.sample.index == 2
    s.complete(steps[0].step_id, {1: 42})
    assert r.output_ids == [40, 41, 42] and r.num_kv == 7


def test_request_that_failed_alone_in_a_step_ends_and_the_others_continue():
    s = Scheduler(loong(), [32])
    a, b = make_request(1, 5), make_request(2, 5)
    s.add(a)
    s.add(b)
    steps, _ = s.schedule()
    s.complete(steps[0].step_id, {2: 9}, failed={1: "sampling failed: no valid distribution"})
    assert a.finish_reason == "error" and "sampling" in a.error and b.output_ids == [9]
    run_until_idle(s)
    assert b.finish_reason == "length" and s.free_slots() == [32]


def test_reset_after_a_restart_recomputes_every_request_in_arrival_order():
    s = Scheduler(loong(), [32, 32])
    reqs = [make_request(i, 5) for i in (1, 2, 3)]
    for r in reqs:
        s.add(r)
    steps, _ = s.schedule()
    for step in steps:
        s.complete(step.step_id, {seq.request_id: 7 for seq in step.seqs})
    s.reset([16, 16])
    assert list(s.waiting) == reqs and not s.running and s.free_slots() == [16, 16]
    assert all(r.recomputed == 1 and not r.placement for r in reqs)
    run_until_idle(s)
    assert all(r.finish_reason == "length" for r in reqs) and s.free_slots() == [16, 16]


def test_prompt_larger_than_every_pool_together_is_refused():
    s = Scheduler(loong(), [10, 10])
    with pytest.raises(ValueError, match="does not fit"):
        s.add(make_request(1, 25))


class DropsTokens(GreedyScaling):
    def keep_plan(self, view, batch: Batch) -> KeepPlan:
        plan = super().keep_plan(view, batch)
        return KeepPlan({rid: ((parts[0][0], parts[0][1] - 1),) for rid, parts in plan.ranges.items()})


class MasterOutsideGroup(GreedyScaling):
    def decode_plan(self, view, batch: Batch) -> DecodePlan:
        return DecodePlan(batch.group, {rid: 99 for rid in batch.request_ids})


@pytest.mark.parametrize("scaling, rule", [(DropsTokens, "covers 4 of the 5 prompt tokens"),
                                           (MasterOutsideGroup, "outside the group")])
def test_policy_violation_is_a_clear_error_and_state_stays_intact(scaling, rule):
    bundle = loong()
    s = Scheduler(bundle, [32])
    s.add(r := make_request(1, 5))
    if scaling is MasterOutsideGroup:  # the bad decision comes at the first decode step
        steps, _ = s.schedule()
        s.complete(steps[0].step_id, {1: 5})
    s.policies = replace(bundle, scaling=scaling(PolicyOptions()))
    steps, failed = s.schedule()
    assert steps == [] and failed == [r]
    assert r.finish_reason == "error" and scaling.__name__ in r.error and rule in r.error
    assert s.free_slots() == [32] and not s.busy and not s.requests


def test_migration_moves_the_last_tokens_and_frees_the_source_slots():
    s = Scheduler(loong(), [100, 100])
    r = make_request(1, 30, max_tokens=5)
    s.add(r)
    steps, _ = s.schedule()
    s.complete(steps[0].step_id, {1: 5})
    (src,) = r.placement
    dst = 1 - src
    before = list(r.placement[src])
    move = s.migrate(1, src, dst, 12)
    assert list(move.src_slots) == before[-12:] and len(move.dst_slots) == 12
    assert s.schedule() == ([], [])  # the request is in flight, both instances busy
    assert s.complete(move.step_id, {}) == []
    assert {k: list(v) for k, v in r.placement.items()} == {src: before[:-12], dst: list(move.dst_slots)}
    assert list(r.placement)[-1] == dst
    assert s.free_slots() == [100 - 18 if i == src else 100 - 12 for i in range(2)]
    run_until_idle(s)
    assert s.free_slots() == [100, 100]


def test_a_request_no_policy_decision_can_place_ends_with_an_error():
    s = Scheduler(load_policy_set("replicas", PolicyOptions()), [10, 10])
    big, small = make_request(1, 15), make_request(2, 3, max_tokens=2)
    s.add(big)
    s.add(small)
    steps, failed = s.schedule()
    assert failed == [big] and "replicas cannot place a request of 15 tokens" in big.error
    assert [seq.request_id for seq in steps[0].seqs] == [2]
    s.complete(steps[0].step_id, {2: 5})
    run_until_idle(s)
    assert small.finish_reason == "length" and s.free_slots() == [10, 10]


def test_two_decode_batches_on_disjoint_instances_in_one_schedule():
    s = Scheduler(load_policy_set("replicas", PolicyOptions()), [32, 32])
    a, b = make_request(1, 5, max_tokens=3), make_request(2, 5, max_tokens=3)
    s.add(a)
    s.add(b)
    steps, failed = s.schedule()
    assert not failed and sorted(st.group for st in steps) == [(0,), (1,)]
    for st in steps:
        s.complete(st.step_id, {seq.request_id: 5 for seq in st.seqs})
    steps, failed = s.schedule()
    assert not failed and sorted(st.group for st in steps) == [(0,), (1,)]
    assert all(isinstance(st, DecodeBatch) for st in steps)
    for st in steps:
        s.complete(st.step_id, {seq.request_id: 5 for seq in st.seqs})
    run_until_idle(s)
    assert a.finish_reason == b.finish_reason == "length" and s.free_slots() == [32, 32]


def prefilled(pools: list[int], prompt_len: int, max_tokens: int, decode_steps: int = 4):
    """A loong scheduler whose one request has finished its prefill (first token 5)."""
    s = Scheduler(loong(), pools, decode_steps=decode_steps)
    req = make_request(1, prompt_len, max_tokens=max_tokens)
    s.add(req)
    steps, _ = s.schedule()
    s.complete(steps[0].step_id, {1: 5})
    return s, req


def test_multi_step_decode_is_bounded_by_tokens_left_and_free_slots():
    s, req = prefilled([20], prompt_len=10, max_tokens=7)
    rounds = []
    while s.requests:
        (step,), _ = s.schedule()
        rounds.append(step.steps)
        assert [len(seq.next_slots) for seq in step.seqs] == [step.steps - 1]
        s.complete(step.step_id, {1: [5] * step.steps})
    # 6 tokens left after the prefill's first: 4 then 2; the pool (20) never binds.
    assert rounds == [4, 2] and req.output_ids == [5] * 7 and s.free_slots() == [20]
    tight, _ = prefilled([13], prompt_len=10, max_tokens=7)
    (step,), _ = tight.schedule()
    assert step.steps == 3  # 13 slots - 10 prompt = 3 free


def test_multi_step_tokens_after_eos_are_dropped_and_slots_freed():
    s, req = prefilled([40], prompt_len=10, max_tokens=9)
    (step,), _ = s.schedule()
    s.complete(step.step_id, {1: [6, EOS, 7, 8]})
    assert req.output_ids == [5, 6, EOS] and req.finish_reason == "stop"
    assert s.free_slots() == [40] and not s.requests


def test_a_broken_decode_plan_fails_its_batch_without_losing_the_batches_launched_before_it():
    from esp.policies.replicas import ReplicaScaling

    class BreaksOnOne(ReplicaScaling):
        def decode_plan(self, view, batch):
            plan = super().decode_plan(view, batch)
            return DecodePlan(plan.group, {rid: 0 for rid in plan.masters}) if batch.group == (1,) else plan

    p = load_policy_set("replicas", PolicyOptions())
    s = Scheduler(p, [32, 32])
    a, b = make_request(1, 5, max_tokens=3), make_request(2, 5, max_tokens=3)
    s.add(a)
    s.add(b)
    steps, _ = s.schedule()
    for st in steps:
        s.complete(st.step_id, {seq.request_id: 5 for seq in st.seqs})
    s.policies = replace(p, scaling=BreaksOnOne(p.scaling.options))
    steps, failed = s.schedule()
    assert [st.group for st in steps] == [(0,)] and set(s.in_flight) == {steps[0].step_id}
    assert [r.id for r in failed] == [2] and "outside the group" in b.error
    s.complete(steps[0].step_id, {1: 5})
    run_until_idle(s)
    assert a.finish_reason == "length" and s.free_slots() == [32, 32]


def test_the_esp_record_counts_the_iterations_a_round_ran_not_those_planned():
    """A round planned for 4 iterations that ran 2 (it ended early): `usage.esp` says 2, and the
    slots of the 2 unrun iterations are free again."""
    s, req = prefilled([20], prompt_len=10, max_tokens=20)
    (step,), _ = s.schedule()
    assert step.steps == 4 and req.status is Status.DECODING and req.in_step
    s.complete(step.step_id, {1: [5, 5]})
    assert req.esp.decode_groups == {(0,): 2} and req.esp.masters == {0: 2}
    assert req.status is Status.RUNNING and req.num_kv == 12 and s.free_slots() == [8]


def test_a_request_a_stage_rejects_is_not_planned_by_the_next_stage():
    """A migration to an instance that does not exist breaks a rule: the request ends with the
    error, and the decode stage of the same `schedule()` does not plan it (its view is rebuilt)."""
    from esp.policies import Migration, PolicySet

    class BadMigration(GreedyScaling):
        def migrations(self, view):
            return [Migration(r.request_id, next(iter(r.kv_tokens)), 99, 1) for r in view.running][:1]

    p = loong()
    s = Scheduler(PolicySet("bad", p.scheduling, p.batching, BadMigration(PolicyOptions())), [32, 32])
    bad, good = make_request(1, 5, max_tokens=4), make_request(2, 5, max_tokens=4)
    s.add(bad)
    (step,), _ = s.schedule()
    s.complete(step.step_id, {1: 5})
    steps, failed = s.schedule()
    assert failed == [bad] and bad.finish_reason == "error" and "99" in bad.error
    assert not steps and not s.requests and s.free_slots() == [32, 32]
    s.add(good)
    (step,), failed = s.schedule()
    assert not failed and step.seqs[0].request_id == 2


def test_token_slices_equal_slices_of_the_prompt_followed_by_the_output():
    req = make_request(1, 6, max_tokens=8)
    req.extend([40, 41, 42])
    joined = req.prompt_ids + req.output_ids
    for start in range(len(joined)):
        for end in range(start + 1, len(joined) + 1):
            assert req.token_slice(start, end) == joined[start:end], (start, end)
