"""The `chunked` baseline: the scheduler side on hand-made worker outputs, and the mixed step
(prompt chunks over cached KV plus decode riders in one forward pass) on a real instance."""
from __future__ import annotations

import asyncio
import random

import pytest

from esp.engine import EngineConfig, SamplingParams
from esp.engine.engine import Engine
from esp.engine.protocol import MixedBatch
from esp.engine.request import Status
from esp.engine.scheduler import Scheduler
from esp.policies import Batch, Dispatch, PolicyOptions, load_policy_set
from esp.policies.chunked import ChunkedBatching, ChunkedScheduling
from scheduler_helpers import make_request, run_until_idle, sampled_by


def chunked(chunk: int, max_batch: int = 256):
    return load_policy_set("chunked", PolicyOptions(max_batch_size=max_batch, extra={"chunk_size": chunk}))


def test_a_long_prompt_runs_in_budget_sized_chunks_with_decodes_riding_along():
    s = Scheduler(chunked(16), [200])
    short, long_ = make_request(1, 6, max_tokens=8), make_request(2, 40, max_tokens=2)
    s.add(short)
    first, _ = s.schedule()
    s.complete(first[0].step_id, sampled_by(first[0]))
    s.add(long_)
    steps = run_until_idle(s)
    mixed = [st for st in steps if isinstance(st, MixedBatch)]
    # 16 tokens per step: one for the short request's decode, 15 of the prompt: 15 + 15 + 10.
    assert [[(q.start, len(q.token_ids)) for q in st.seqs] for st in mixed] == [[(0, 15)], [(15, 15)], [(30, 10)]]
    assert all(list(st.decode.request_ids) == [1] for st in mixed)
    assert [q.sample is not None for st in mixed for q in st.seqs] == [False, False, True]
    assert mixed[1].seqs[0].token_ids == long_.prompt_ids[15:30]
    assert long_.esp.prefill[-1].chunk == (30, 40)
    assert short.output_ids == [5] * 8 and long_.output_ids == [5, 5]
    assert s.free_slots() == [200] and not s.requests


def test_new_prompts_fill_the_budget_in_arrival_order_on_the_roomiest_instance():
    s = Scheduler(chunked(32), [100, 300])
    reqs = [make_request(i, n) for i, n in ((1, 20), (2, 20), (3, 50))]
    for r in reqs:
        s.add(r)
    steps, _ = s.schedule()
    by_group = {st.group: [(q.request_id, len(q.token_ids)) for q in st.seqs] for st in steps}
    # r1 -> instance 1 (300 free), r2 -> instance 1 again (279 left > 100) with the 12 tokens of
    # budget left there; r3 -> instance 0, the only one with budget.
    assert by_group == {(1,): [(1, 20), (2, 12)], (0,): [(3, 32)]}
    for st in steps:
        s.complete(st.step_id, sampled_by(st))
    steps, _ = s.schedule()
    by_group = {st.group: [(q.request_id, q.start, len(q.token_ids)) for q in st.seqs] for st in steps}
    assert by_group[(1,)][0] == (2, 12, 8)


def test_abort_during_a_chunk_frees_its_slots_when_the_step_returns():
    s = Scheduler(chunked(8), [64])
    req = make_request(1, 30)
    s.add(req)
    steps, _ = s.schedule()
    assert s.free_slots() == [56]
    assert s.abort(1) is req and req.in_step and s.free_slots() == [56]
    s.complete(steps[0].step_id, sampled_by(steps[0]))
    assert req.finish_reason == "abort" and s.free_slots() == [64] and not s.waiting and not s.requests


def test_failed_chunk_restarts_the_prompt_then_a_second_failure_ends_the_request():
    s = Scheduler(chunked(8), [64])
    req = make_request(1, 30)
    s.add(req)
    steps, _ = s.schedule()
    s.complete(steps[0].step_id, sampled_by(steps[0]))
    steps, _ = s.schedule()
    s.fail(steps[0].step_id, "boom")
    assert req.finish_reason is None and req.num_kv == 0 and list(s.waiting) == [req] and s.free_slots() == [64]
    steps, _ = s.schedule()
    assert steps[0].seqs[0].start == 0
    s.fail(steps[0].step_id, "boom")
    assert req.finish_reason == "error" and s.free_slots() == [64] and not s.waiting


def test_a_chunk_on_an_instance_that_does_not_hold_the_prefix_is_a_policy_violation():
    class Everywhere(ChunkedScheduling):
        def dispatch(self, view):
            return Dispatch(super().dispatch(view).request_ids, tuple(sorted(view.idle)))

    class Wanders(ChunkedBatching):
        def prefill_batches(self, view, dispatch):
            return [Batch(b.request_ids, (1 - b.group[0],), b.chunk_tokens, ()) for b in
                    super().prefill_batches(view, dispatch)]

    p = chunked(8)
    s = Scheduler(p, [64, 64])
    s.add(make_request(1, 30))
    steps, _ = s.schedule()
    s.complete(steps[0].step_id, sampled_by(steps[0]))
    s.policies = type(p)(p.name, Everywhere(p.scheduling.options), Wanders(p.batching.options), p.scaling)
    steps, failed = s.schedule()
    assert not steps and "continues its prompt" in failed[0].error
    assert s.free_slots() == [64, 64] and not s.requests


PARAMS = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


async def collect(engine, prompt, log, name):
    async for out in engine.generate(prompt, PARAMS):
        log.extend((name, t) for t in out.new_token_ids)
    return out


@pytest.mark.slow
def test_mixed_steps_give_solo_tokens_and_decode_keeps_going_during_a_chunked_prefill():
    rng = random.Random(5)
    short = [1] + [rng.randrange(3, 4000) for _ in range(20)]
    long_ = [1] + [rng.randrange(3, 4000) for _ in range(899)]

    async def run(policy, options, together):
        config = EngineConfig(dtype="float64", kv_tokens_per_instance=2048, threads_per_instance=2,
                              policy=policy, policy_options=options)
        async with Engine(config) as engine:
            log = []
            if not together:
                return [(await collect(engine, p, log, n)).token_ids for n, p in (("s", short), ("l", long_))], log
            task = asyncio.create_task(collect(engine, short, log, "s"))
            while not log:
                await asyncio.sleep(0.005)
            outs = await asyncio.gather(task, collect(engine, long_, log, "l"))
            s = engine.scheduler
            assert s.free_slots() == [a.num_slots for a in s.allocators]
            return [o.token_ids for o in outs], log, outs[1].esp["scale_events"], outs

    solo, _ = asyncio.run(run("replicas", {}, together=False))
    tokens, log, _, outs = asyncio.run(run("chunked", {"chunk_size": 128}, together=True))
    assert tokens == solo
    first_long = next(i for i, (n, _) in enumerate(log) if n == "l")
    # 900 prompt tokens in 127-token chunks take 8 steps; the short request decodes in each.
    assert sum(1 for n, _ in log[:first_long] if n == "s") >= 6


def test_a_chunk_that_ends_one_token_before_the_prompt_leaves_the_request_waiting():
    """Chunks of 2 over a 5-token prompt: the second ends at 4, one token short, so the request
    still waits for its last chunk (it holds 4 = its length - 1 KV tokens, like a request whose
    prompt is done): it is not decoded before its prompt is."""
    s = Scheduler(chunked(2), [64])
    req = make_request(1, 5, max_tokens=3)
    s.add(req)
    steps = []
    for _ in range(2):
        (step,), _ = s.schedule()
        steps.append(step)
        s.complete(step.step_id, sampled_by(step))
    assert req.num_kv == 4 and req.status is Status.WAITING and not req.output_ids
    steps += run_until_idle(s)
    assert [[(q.start, len(q.token_ids)) for q in st.seqs] for st in steps[:3]] == [[(0, 2)], [(2, 2)], [(4, 1)]]
    assert req.finish_reason == "length" and req.output_ids == [5, 5, 5] and s.free_slots() == [64]
