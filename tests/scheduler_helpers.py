"""Helpers for testing the scheduler on CPU with hand-made worker outputs: requests with a
character detokenizer, the tokens instances would return for a step, and a driver loop."""
from __future__ import annotations

from esp.engine.protocol import DecodeBatch, MixedBatch
from esp.engine.request import Request
from esp.engine.sampling_params import SamplingParams
from esp.engine.scheduler import Scheduler

EOS = 2


class CharDetokenizer:
    """Token t renders as chr(ord('a') + t % 26): enough to exercise stop strings."""

    def step(self, ids):
        return "".join(chr(ord("a") + t % 26) for t in ids)

    def flush(self):
        return ""


def make_request(rid: int, prompt_len: int, max_tokens: int = 4, **kw) -> Request:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, **kw)
    return Request(rid, f"r{rid}", list(range(3, 3 + prompt_len)), params, seed=rid,
                   eos_ids=frozenset({EOS}), detokenizer=CharDetokenizer())


def sampled_by(step, token=5) -> dict[int, int]:
    """What the instances return: a token for each finished prompt and each decode seq."""
    if isinstance(step, DecodeBatch):
        return {seq.request_id: token for seq in step.seqs}
    riders = list(step.decode.request_ids) if isinstance(step, MixedBatch) else []
    return {seq.request_id: token for seq in step.seqs if seq.sample} | dict.fromkeys(riders, token)


def run_until_idle(s: Scheduler, token=5, limit=1000):
    """Drive schedule -> complete with every request sampling `token`; returns the steps."""
    seen = []
    for _ in range(limit):
        steps, failed = s.schedule()
        assert not failed
        if not steps:
            assert not s.in_flight
            return seen
        for step in steps:
            seen.append(step)
            s.complete(step.step_id, sampled_by(step, token))
    raise AssertionError("scheduler did not go idle")
