"""The simulator backend on tiny traces with hand-computed timelines, and its determinism."""
from __future__ import annotations

import asyncio
import json

import pytest

from esp.engine import EngineConfig, SamplingParams
from esp.engine.engine import Engine
from esp.engine.sim import SyntheticPrompt, run_virtual
from esp.engine.slo import LatencySLO, ServiceSLO
from esp.costs.cost_model import CostModel
from esp.engine.protocol import DecodeBatch, DecodeRows, DecodeSeq
from esp.engine.sim import iteration_times

# prefill 1 + 0.1*sum(len) + 0.01*sum(len^2); decode 0.5 + 0.1*batch + 0.01*kv tokens
COST = CostModel({1: (1.0, 0.1, 0.01)}, {1: (0.5, 0.1, 0.01)}, 0.0, 1e9, 1, "hand")


@pytest.fixture
def profile(tmp_path):
    path = tmp_path / "hand.json"
    path.write_text(json.dumps(COST.to_json()))
    return str(path)


def run(profile: str, arrivals: list[tuple[float, int, int]], decode_steps: int = 1, policy: str = "replicas"):
    """(arrival, prompt tokens, output tokens) -> [(ttft, e2e, token times)] on the virtual clock."""
    async def main():
        config = EngineConfig(backend="sim", profile=profile, kv_tokens_per_instance=1000, policy=policy,
                              decode_steps=decode_steps)
        async with Engine(config) as engine:
            loop = asyncio.get_running_loop()
            t0 = loop.time()

            async def one(at, n, out):
                await asyncio.sleep(at)
                times = []
                async for o in engine.generate(SyntheticPrompt(n), SamplingParams(max_tokens=out, ignore_eos=True)):
                    times += [loop.time() - t0] * len(o.new_token_ids)
                return times[0] - at, times[-1] - at, times

            return await asyncio.gather(*(one(*a) for a in arrivals))
    return run_virtual(main())


def test_one_request_by_hand(profile):
    ((ttft, e2e, times),) = run(profile, [(0.0, 10, 3)])
    # prefill 1 + 1 + 1 = 3; decode at 11 then 12 KV tokens: 0.71, 0.72
    assert ttft == pytest.approx(3.0) and times == pytest.approx([3.0, 3.71, 4.43]) and e2e == pytest.approx(4.43)


def test_two_requests_batched_then_one_arriving_mid_decode(profile):
    a, b, c = run(profile, [(0.0, 10, 2), (0.0, 20, 2), (3.5, 5, 1)])
    # a and b prefill together: 1 + 0.1*30 + 0.01*500 = 9. c arrives at 3.5 while the only
    # instance is busy; at 9 the scheduler runs prefill first: c for 1 + 0.5 + 0.25 = 1.75 -> 10.75,
    # then a and b decode: 0.5 + 0.2 + 0.01*(11+21) = 1.02 -> 11.77.
    assert a[2] == pytest.approx([9.0, 11.77]) and b[2] == pytest.approx([9.0, 11.77])
    assert c[2] == pytest.approx([10.75]) and c[0] == pytest.approx(10.75 - 3.5)


def test_multi_step_decode_delivers_the_same_end_time_in_one_round(profile):
    ((_, e2e, times),) = run(profile, [(0.0, 10, 3)], decode_steps=2)
    assert times == pytest.approx([3.0, 4.43, 4.43]) and e2e == pytest.approx(4.43)


def test_replays_are_deterministic(profile):
    arrivals = [(0.1 * i, 5 + 7 * i, 1 + i % 4) for i in range(12)]
    assert run(profile, arrivals, policy="loong") == run(profile, arrivals, policy="loong")


def test_a_new_request_ends_a_multi_step_round_after_the_iteration_in_progress(profile):
    a, b = run(profile, [(0.0, 10, 9), (4.0, 10, 1)], decode_steps=8)
    # a's round starts at 3.0 (iterations end 0.71, 1.43, ... later); b arrives at 4.0, inside the
    # second iteration, so the round stops at 4.43 with two tokens. b's prefill runs first
    # (3.0 s, to 7.43); then a's last six tokens come in one round: 0.73 + ... + 0.78 = 4.53.
    assert a[2] == pytest.approx([3.0, 4.43, 4.43] + [11.96] * 6)
    assert b[2] == pytest.approx([7.43]) and b[0] == pytest.approx(3.43)


def test_decode_iterations_wait_for_the_busiest_master_and_holder():
    """On the "busiest" basis a decode step costs d0 + d1 * (requests on the busiest master)
    + d2 * (KV tokens on the busiest holder); a row's KV is split evenly over its holders and
    each iteration adds a token on its master."""
    busiest = CostModel({1: (1.0, 0.1, 0.01)}, {3: (0.5, 0.1, 0.01)}, 0.0, 1e9, 1, "hand", {}, "busiest")
    rows = DecodeRows.of([
        DecodeSeq(1, 0, 999, 0, 0, (0, 1)),  # 1000 KV tokens over ranks 0 and 1: 500 each
        DecodeSeq(2, 0, 99, 2, 0, (2,)),  # 100 on rank 2
        DecodeSeq(3, 0, 9, 0, 0, (0,)),  # 10 on rank 0: rank 0 holds 510 and masters 2 requests
    ])
    step = DecodeBatch(0, (0, 1, 2), rows, steps=2)
    assert iteration_times(step, busiest) == pytest.approx([0.5 + 0.1 * 2 + 0.01 * 510, 0.5 + 0.1 * 2 + 0.01 * 512])
    # the same step on a "total" profile: the whole batch and all its KV
    assert iteration_times(step, COST_3) == pytest.approx([0.5 + 0.1 * 3 + 0.01 * 1110, 0.5 + 0.1 * 3 + 0.01 * 1113])


COST_3 = CostModel({1: (1.0, 0.1, 0.01)}, {3: (0.5, 0.1, 0.01)}, 0.0, 1e9, 1, "hand")


def test_charge_scheduler_delays_each_step_by_the_wall_time_of_its_schedule(profile, monkeypatch):
    """The virtual clock charges what `schedule()` costs in wall time: a scheduler made to spend
    50 ms per call delays the first token by at least that, and only with the flag."""
    import time
    from esp.engine.scheduler import Scheduler

    plain = Scheduler.schedule

    def slow(self):
        end = time.perf_counter() + 0.05
        while time.perf_counter() < end:
            pass
        return plain(self)
    monkeypatch.setattr(Scheduler, "schedule", slow)

    async def ttft(charge: bool) -> float:
        config = EngineConfig(backend="sim", profile=profile, kv_tokens_per_instance=1000, charge_scheduler=charge)
        async with Engine(config) as engine:
            t0 = asyncio.get_running_loop().time()
            async for out in engine.generate(SyntheticPrompt(10), SamplingParams(max_tokens=1, ignore_eos=True)):
                pass
            return asyncio.get_running_loop().time() - t0
    assert run_virtual(ttft(False)) == pytest.approx(3.0)
    assert run_virtual(ttft(True)) >= 3.05
    with pytest.raises(ValueError, match="sim backend"):
        EngineConfig(charge_scheduler=True)


def test_the_garbage_collector_is_paused_while_steps_are_planned_and_sent(profile, monkeypatch):
    """`schedule()` and the sending of the steps it launched run with the cyclic GC paused (a
    collection there would keep the instances idle); it collects again once they are sent."""
    import gc
    from esp.engine.scheduler import Scheduler
    from esp.engine.sim import SimBackend

    seen: dict[str, list[bool]] = {"schedule": [], "send": [], "between": []}
    plain_schedule, plain_run = Scheduler.schedule, SimBackend.run

    def schedule(self):
        seen["schedule"].append(gc.isenabled())
        return plain_schedule(self)

    async def run_step(self, step):
        seen["send"].append(gc.isenabled())
        return await plain_run(self, step)
    monkeypatch.setattr(Scheduler, "schedule", schedule)
    monkeypatch.setattr(SimBackend, "run", run_step)

    async def main():
        async with Engine(EngineConfig(backend="sim", profile=profile, kv_tokens_per_instance=1000)) as engine:
            async for _ in engine.generate(SyntheticPrompt(10), SamplingParams(max_tokens=3, ignore_eos=True)):
                seen["between"].append(gc.isenabled())
    assert gc.isenabled()
    run_virtual(main())
    assert gc.isenabled()
    assert seen["schedule"] and not any(seen["schedule"]) and seen["send"] and not any(seen["send"])
    assert seen["between"] and all(seen["between"])


def three_prompts(profile: str, own=None, service=None) -> list[tuple[float, dict | None]]:
    """(end, `usage.esp.slo`) of three one-token requests under loong on one instance: 10 tokens at
    0 s (its prefill ends at 3 s), then 5 and 20 tokens at 1 s, the last with the target `own`,
    on an engine serving `service`. A 2 s tipping point keeps each prefill alone."""
    async def main():
        config = EngineConfig(backend="sim", profile=profile, kv_tokens_per_instance=1000, policy="loong",
                              policy_options={"max_prefill_s": 2.0}, slo=service)
        async with Engine(config) as engine:
            loop = asyncio.get_running_loop()

            async def one(at, n, target=None):
                await asyncio.sleep(at)
                async for out in engine.generate(SyntheticPrompt(n), SamplingParams(max_tokens=1, ignore_eos=True),
                                                 slo=target):
                    pass
                return loop.time(), out.esp.get("slo")
            return await asyncio.gather(one(0.0, 10), one(1.0, 5), one(1.0, 20, own))
    return run_virtual(main())


def test_a_ttft_target_moves_a_request_ahead_in_loong_dispatch(profile):
    """By response ratio at 3 s the 5-token request leads ((2 + 1.75) / 1.75 against (2 + 7) / 7)
    unless the 20-token one's 1 s TTFT target is its budget ((2 + 7) / 1)."""
    (a, _), (b, _), (c, report) = three_prompts(profile)
    assert (a, b, c) == pytest.approx((3.0, 4.75, 11.75)) and report is None
    (a, _), (b, _), (c, report) = three_prompts(profile, LatencySLO(ttft_s=1.0))
    assert (a, b, c) == pytest.approx((3.0, 11.75, 10.0))
    assert report == {"ttft_ms": 1000.0, "tpot_ms": None, "ttft_met": False, "tpot_met": None}


def test_the_services_slo_is_every_requests_unless_it_brings_its_own(profile):
    """A service TTFT target of 1 s for everyone puts the 20-token request ahead as its own target
    did ((2 + 7) / 1 against (2 + 1.75) / 1); twice the prefill alone (14 s and 3.5 s) keeps the
    short one first ((2 + 1.75) / 3.5 against (2 + 7) / 14). A request's own target replaces the
    service's field by field."""
    runs = three_prompts(profile, service=ServiceSLO(ttft_floor_s=1.0))
    assert [t for t, _ in runs] == pytest.approx([3.0, 11.75, 10.0])
    assert [r["ttft_ms"] for _, r in runs] == [1000.0] * 3 and {r["tpot_ms"] for _, r in runs} == {None}
    runs = three_prompts(profile, LatencySLO(tpot_s=0.25), ServiceSLO(ttft_scale=2.0, tpot_s=0.5))
    assert [t for t, _ in runs] == pytest.approx([3.0, 4.75, 11.75])
    assert [r["ttft_ms"] for _, r in runs] == pytest.approx([6e3, 3.5e3, 14e3])
    assert [r["tpot_ms"] for _, r in runs] == pytest.approx([500, 500, 250])


def test_the_simulator_runs_the_engines_rounds_and_checks_their_length():
    assert EngineConfig(backend="sim").decode_steps == EngineConfig().decode_steps == 16
    for steps in (0, None, 2.5):
        with pytest.raises(ValueError, match="decode-steps must be a positive integer"):
            EngineConfig(backend="sim", decode_steps=steps)
