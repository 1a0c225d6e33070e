"""Elastic sequence parallelism across real gloo processes (DESIGN 10, rung 3).

Whatever the prefill group, keep plan and master choice, greedy tokens in float64 equal the
single-instance run of the same prompt.
"""
from __future__ import annotations

import json
import random
import subprocess
import sys
from dataclasses import dataclass

import pytest
import pytest_asyncio

from esp.engine import EngineConfig, SamplingParams
from esp.engine.engine import Engine
from esp.policies import (Batch, BatchingPolicy, ClusterView, DecodePlan, Dispatch, KeepPlan, Migration, PolicyOptions,
                          PolicySet, ScalingPolicy, SchedulingPolicy)

pytestmark = pytest.mark.slow
in_engine_loop = pytest.mark.asyncio(loop_scope="module")


@dataclass(frozen=True)
class Layout:
    """Where a test request runs: prefill DoP, how its KV is kept, how masters rotate."""

    dop: int
    keep: str      # "one" | "two" | "all"
    masters: str   # "last" (holder of the newest token) | "rotate" (a different group member each step)
    migrate: bool = False  # after the second token, move 40 tokens of the first holder elsewhere


CURRENT: list[Layout] = [None]  # requests run one at a time; this is the layout of the running one


class OneAtATime(SchedulingPolicy):
    def dispatch(self, view: ClusterView) -> Dispatch:
        if not view.waiting or len(view.idle) < view.num_instances or view.running:
            return Dispatch()
        return Dispatch((view.waiting[0].request_id,), tuple(sorted(view.idle)))


class ByLayout(BatchingPolicy):
    def prefill_batches(self, view, dispatch):
        rid = dispatch.request_ids[0]
        return [Batch((rid,), dispatch.instances[: CURRENT[0].dop])]

    def decode_batches(self, view, instances):
        ready = [r for r in view.running if set(r.kv_tokens) <= instances]
        return [Batch((r.request_id,), tuple(sorted(r.kv_tokens))) for r in ready[:1]]


class ForcedScaling(ScalingPolicy):
    def keep_plan(self, view, batch):
        (rid,) = batch.request_ids
        n = next(r.prompt_len for r in view.waiting if r.request_id == rid)
        g, kind = batch.group, CURRENT[0].keep
        ranks = {"one": g[-1:], "two": g[:2], "all": g}[kind]
        sizes = [n // len(ranks) + (i < n % len(ranks)) for i in range(len(ranks))]
        return KeepPlan({rid: tuple((r, s) for r, s in zip(ranks, sizes) if s)})

    def decode_plan(self, view, batch):
        (rid,) = batch.request_ids
        req = next(r for r in view.running if r.request_id == rid)
        layout = CURRENT[0]
        holders = list(req.kv_tokens)
        if layout.masters == "rotate":
            group = tuple(sorted(set(holders) | set(range(layout.dop))))
            master = group[req.output_len % len(group)]
        else:
            group, master = tuple(sorted(holders)), holders[-1]
        return DecodePlan(group, {rid: master})

    def migrations(self, view):
        if not CURRENT[0].migrate:
            return []
        for req in view.running:
            spare = [r for r in reversed(range(view.num_instances)) if r not in req.kv_tokens]
            if req.output_len == 2 and spare and set(req.kv_tokens) <= view.idle:
                src = next(iter(req.kv_tokens))
                return [Migration(req.request_id, src, spare[0], min(40, req.kv_tokens[src]))]
        return []


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def engine():
    opts = PolicyOptions()
    bundle = PolicySet("forced", OneAtATime(opts), ByLayout(opts), ForcedScaling(opts))
    # one decode iteration per round, so the rotating master changes every token
    config = EngineConfig(instances=4, dtype="float64", kv_tokens_per_instance=4096, threads_per_instance=1,
                          decode_steps=1)
    async with Engine(config, policies=bundle) as eng:
        yield eng


@pytest.fixture
def prompt():
    rng = random.Random(7)
    return [1] + [rng.randrange(3, 2000) for _ in range(150)]


async def generate(engine, prompt, layout: Layout, max_tokens=10):
    CURRENT[0] = layout
    outs = [o async for o in engine.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0,
                                                                     ignore_eos=True))]
    return outs[-1]


def slots_all_free(engine) -> bool:
    s = engine.scheduler
    return s.free_slots() == [a.num_slots for a in s.allocators] and not s.requests


@pytest.mark.parametrize("layout", [Layout(d, k, m) for d in (1, 2, 3, 4) for k in ("one", "two", "all")
                                    for m in ("last", "rotate") if not (d == 1 and k != "one")])
@in_engine_loop
async def test_greedy_tokens_equal_single_instance(engine, prompt, layout):
    reference = await generate(engine, prompt, Layout(1, "one", "last"))
    out = await generate(engine, prompt, layout)
    assert reference.finish_reason == out.finish_reason == "length" and len(reference.token_ids) == 10
    assert out.token_ids == reference.token_ids
    assert out.esp["prefill_group"] == list(range(layout.dop))
    holders = {int(r) for r in out.esp["keep_plan"]}
    assert len(holders) == {"one": 1, "two": min(2, layout.dop), "all": layout.dop}[layout.keep]
    if layout.masters == "rotate" and layout.dop > 1:
        assert len(out.esp["masters"]) > 1, out.esp
    assert slots_all_free(engine)


@pytest.mark.parametrize("layout", [Layout(1, "one", "last", migrate=True), Layout(3, "all", "rotate", migrate=True)])
@in_engine_loop
async def test_migration_keeps_greedy_tokens(engine, prompt, layout):
    reference = await generate(engine, prompt, Layout(1, "one", "last"))
    out = await generate(engine, prompt, layout)
    assert reference.finish_reason == out.finish_reason == "length"
    assert out.token_ids == reference.token_ids
    assert any(e["kind"] == "migrate" for e in out.esp["scale_events"])
    assert slots_all_free(engine)


def esp_run(*args: str) -> dict:
    res = subprocess.run([sys.executable, "-m", "esp.cli.main", "generate", *args, "--json"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_cli_four_instances_equal_one_on_a_3000_token_prompt():
    rng = random.Random(3)
    ids = ",".join(str(t) for t in [1] + [rng.randrange(3, 2000) for _ in range(2999)])
    common = ["--dtype", "float64", "--temperature", "0", "--prompt-ids", ids, "--max-tokens", "6",
              "--ignore-eos", "--threads-per-instance", "1"]
    one = esp_run("--instances", "1", "--kv-tokens-per-instance", "8192", *common)
    four = esp_run("--instances", "4", "--kv-tokens-per-instance", "8192", *common)
    small = esp_run("--instances", "4", "--kv-tokens-per-instance", "1200", *common)
    assert four["token_ids"] == one["token_ids"] and small["token_ids"] == one["token_ids"]
    assert len(four["esp"]["prefill_group"]) >= 2
    assert len(small["esp"]["keep_plan"]) >= 3
    assert sum(small["esp"]["keep_plan"].values()) == 3000
