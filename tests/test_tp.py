"""Tensor parallelism inside an instance (`--tp 2`) on real gloo processes, float64.

Oracles are independent of the engine: our decoder run whole in this process (the tp 1
single-instance computation, with dense attention) and `transformers`' `generate`. Three
engines: the bundled esp-tiny on 2 instances x tp 2 (one instance alone, ESP prefill across
both, multi-master decode, rounds of 16 and of 1 iteration, a KV migration); a Qwen2 checkpoint with one KV
head (replicated on both tp ranks), QKV biases, tied embeddings and a vocabulary that 2 does
not divide, on 2 instances x tp 2; a Qwen3 checkpoint (per-head q/k norms, o bias) on 1
instance x tp 2 under the `chunked` policy (prompt chunks over cached KV plus decode riders),
also sampled with a seed, with a request whose sampling fails and a killed tp rank.
"""
from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal

import pytest
import pytest_asyncio
import torch
from hf_fixtures import CachedAttention, hf_greedy, make_random_checkpoint, ours_greedy
from test_esp import CURRENT, ByLayout, ForcedScaling, Layout, OneAtATime, slots_all_free

from esp.cli.main import CLIError, build_parser, engine_config
from esp.engine import EngineConfig, SamplingParams
from esp.engine.config import bundled_model_dir
from esp.engine.engine import Engine
from esp.engine.errors import EngineStartError
from esp.engine.loader import load_model
from esp.engine.model_config import ModelConfig
from esp.engine.protocol import SampleSpec
from esp.engine.sampling import sample_tokens
from esp.engine.tensor_parallel import TensorParallelError, TPShard, check_tp
from esp.policies import PolicyOptions, PolicySet

in_engine_loop = pytest.mark.asyncio(loop_scope="module")
STEPS = 10


def forced_policies() -> PolicySet:
    opts = PolicyOptions()
    return PolicySet("forced", OneAtATime(opts), ByLayout(opts), ForcedScaling(opts))


def tp_config(model, instances: int, **kw) -> EngineConfig:
    return EngineConfig(model=str(model), instances=instances, tp=2, dtype="float64", kv_tokens_per_instance=512,
                        threads_per_instance=1, log_requests=False, **kw)


def checkpoint(tmp_path_factory, name: str, **kw):
    ckpt = make_random_checkpoint(tmp_path_factory.mktemp(name), name=name, **kw)
    shutil.copy(bundled_model_dir() / "tokenizer.model", ckpt / "tokenizer.model")
    return ckpt


def oracle(model_dir, ids: list[int], steps: int = STEPS) -> list[int]:
    """Greedy tokens of the whole model in this process, checked against transformers."""
    model = load_model(model_dir, torch.float64, "cpu")
    ours = ours_greedy(model, torch.tensor(ids), steps)
    assert ours == hf_greedy(model_dir, torch.tensor(ids), steps)
    return ours


def make_prompt(n: int, vocab: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [1] + [rng.randrange(3, vocab) for _ in range(n - 1)]


def case(fixture, n: int, vocab: int, seed: int):
    """An engine fixture's engine and checkpoint, a prompt, and the oracle's greedy tokens for it."""
    engine, ckpt = fixture
    ids = make_prompt(n, vocab, seed)
    return engine, ckpt, ids, oracle(ckpt, ids)


async def final(engine, ids, params):
    return [o async for o in engine.generate(ids, params)][-1]


GREEDY = SamplingParams(max_tokens=STEPS, temperature=0, ignore_eos=True)


async def forced(engine, ids, layout: Layout, decode_steps: int):
    CURRENT[0] = layout
    engine.scheduler.decode_steps = decode_steps  # the round length, for this request only
    try:
        return await final(engine, ids, GREEDY)
    finally:
        engine.scheduler.decode_steps = engine.config.decode_steps


# ----- without processes -----

def test_shards_partition_heads_mlp_and_vocabulary():
    tiny = ModelConfig.from_dir(bundled_model_dir())  # 8 heads, 2 KV heads
    for size in (1, 2, 4, 8):
        shards = [TPShard.of(tiny, size, r) for r in range(size)]
        assert [s.head_start for s in shards] == list(range(0, 8, 8 // size))
        assert sum(s.inter_end - s.inter_start for s in shards) == tiny.intermediate_size
        assert shards[-1].vocab_end == tiny.vocab_size and all(s.vocab_rows == -(-4096 // size) for s in shards)
        group = 8 // 2
        for s in shards:  # each rank's query heads read the KV heads it holds
            kv = {h // group for h in range(s.head_start, s.head_start + s.heads)}
            assert kv == set(range(s.kv_head_start, s.kv_head_start + s.kv_heads))
        assert {s.kv_heads for s in shards} == {max(1, 2 // size)}
    for size, why in ((3, "8 attention heads"), (16, "8 attention heads")):
        with pytest.raises(TensorParallelError, match=why):
            check_tp(tiny, size)


def test_loader_gives_each_rank_its_slice(tmp_path):
    ckpt = make_random_checkpoint(tmp_path, arch="qwen2", num_key_value_heads=1, vocab_size=509,
                                  tie_word_embeddings=True)
    cfg = ModelConfig.from_dir(ckpt)
    full = dict(load_model(ckpt, torch.float64, "cpu").named_parameters())
    parts = [dict(load_model(ckpt, torch.float64, "cpu", TPShard.of(cfg, 2, r)).named_parameters()) for r in (0, 1)]
    assert set(parts[0]) == set(full)
    layer = "model.layers.1."
    for name, dim in (("self_attn.q_proj.weight", 0), ("self_attn.q_proj.bias", 0), ("self_attn.o_proj.weight", 1),
                      ("mlp.gate_proj.weight", 0), ("mlp.down_proj.weight", 1)):
        assert torch.equal(torch.cat([p[layer + name] for p in parts], dim), full[layer + name])
    for name in ("self_attn.k_proj.weight", "self_attn.v_proj.bias", "input_layernorm.weight"):  # replicated
        assert all(torch.equal(p[layer + name], full[layer + name]) for p in parts)
    emb = [p["model.embed_tokens.weight"] for p in parts]  # 255 rows each, the last one padded
    assert torch.equal(torch.cat(emb)[:509], full["model.embed_tokens.weight"]) and not emb[1][254:].any()


def test_tp_is_validated_before_any_process_starts():
    with pytest.raises(ValueError, match="tp must be at least 1"):
        EngineConfig(tp=0)
    with pytest.raises(CLIError):
        build_parser().parse_args(["generate", "--prompt", "x", "--tp", "0"])
    args = build_parser().parse_args(["generate", "--prompt", "x", "--tp", "2", "--instances", "3"])
    config = engine_config(args)
    assert config.tp == 2 and config.instance_device(2, 1) == "cpu"
    assert EngineConfig(device="cuda", instances=3, tp=2).instance_device(2, 1) == "cuda:5"

    async def start():
        async with Engine(EngineConfig(tp=3, threads_per_instance=1)):
            pass

    with pytest.raises(EngineStartError, match="--tp 3 must divide the model's 8 attention heads"):
        asyncio.run(start())


# ----- esp-tiny, 2 instances x tp 2 -----

@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def tiny():
    async with Engine(tp_config(bundled_model_dir(), 2), policies=forced_policies()) as eng:
        yield eng


LAYOUTS = [Layout(1, "one", "last"), Layout(2, "all", "rotate"), Layout(2, "one", "last")]


@pytest.mark.slow
@in_engine_loop
async def test_tiny_tp2_tokens_equal_tp1_on_every_layout(tiny):
    ids = make_prompt(97, 4096, 1)
    want = oracle(bundled_model_dir(), ids)
    assert len(tiny.backend.links) == 4 and tiny.backend.kv_slots == [512, 512]
    for layout in LAYOUTS:
        for steps in (16, 1):
            out = await forced(tiny, ids, layout, steps)
            assert out.token_ids == want, (layout, steps)
            assert out.esp["prefill_group"] == list(range(layout.dop))
            if layout.masters == "rotate" and steps == 1:
                assert len(out.esp["masters"]) > 1, out.esp
            assert slots_all_free(tiny)
    out = await forced(tiny, ids, Layout(1, "one", "last", migrate=True), 1)  # each tp rank moves its heads
    assert out.token_ids == want and any(e["kind"] == "migrate" for e in out.esp["scale_events"])
    assert slots_all_free(tiny)


# ----- Qwen2: one KV head (replicated), biases, tied embeddings, vocabulary 509 -----

@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def qwen2(tmp_path_factory):
    ckpt = checkpoint(tmp_path_factory, "qwen2", arch="qwen2", num_key_value_heads=1, vocab_size=509,
                      tie_word_embeddings=True)
    async with Engine(tp_config(ckpt, 2), policies=forced_policies()) as eng:
        yield eng, ckpt


@pytest.mark.slow
@in_engine_loop
async def test_qwen2_replicated_kv_head_tp2_equals_tp1_and_transformers(qwen2):
    engine, ckpt, ids, want = case(qwen2, 61, 509, 2)
    for layout, steps in ((Layout(2, "all", "rotate"), 16), (Layout(2, "all", "rotate"), 1),
                          (Layout(1, "one", "last"), 16)):
        out = await forced(engine, ids, layout, steps)
        assert out.token_ids == want, (layout, steps)
        assert slots_all_free(engine)


# ----- Qwen3: per-head q/k norms and an o bias, 1 instance x tp 2, chunked prefill -----

@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def qwen3(tmp_path_factory):
    ckpt = checkpoint(tmp_path_factory, "qwen3", arch="qwen3", attention_bias=True)
    config = tp_config(ckpt, 1, policy="chunked", policy_options={"chunk_size": 16})  # prompts in chunks
    async with Engine(config) as eng:
        yield eng, ckpt


def ours_sampled(model_dir, ids: list[int], params: SamplingParams, steps: int) -> list[int]:
    """Seeded sampling by the whole model in this process, token `i` drawn with (seed, i)."""
    model = load_model(model_dir, torch.float64, "cpu")
    cache, out, n = CachedAttention(), [], len(ids)
    with torch.inference_mode():
        hidden = model(torch.tensor(ids), torch.arange(n), cache)[-1:]
        for i in range(steps):
            out.append(sample_tokens(model.compute_logits(hidden), [SampleSpec(params, params.seed, i)])[0])
            hidden = model(torch.tensor(out[-1:]), torch.tensor([n + i]), cache)
    return out


@pytest.mark.slow
@in_engine_loop
async def test_qwen3_tp2_greedy_and_seeded_sampling_equal_tp1(qwen3):
    engine, ckpt, ids, want = case(qwen3, 45, 512, 3)
    assert (await final(engine, ids, GREEDY)).token_ids == want
    params = SamplingParams(max_tokens=STEPS, temperature=0.9, top_p=0.95, seed=11, ignore_eos=True)
    out = await final(engine, ids, params)
    assert out.token_ids == ours_sampled(ckpt, ids, params, STEPS)
    assert slots_all_free(engine)


@pytest.mark.slow
@in_engine_loop
async def test_qwen3_tp2_sampling_failure_ends_alone_and_a_killed_tp_rank_restarts_all(qwen3):
    engine, ckpt, ids, want = case(qwen3, 30, 512, 4)
    poisoned = SamplingParams(max_tokens=6, ignore_eos=True)
    object.__setattr__(poisoned, "temperature", 5e-324)
    bad, good = await asyncio.gather(final(engine, ids[:9], poisoned), final(engine, ids, GREEDY))
    assert bad.finish_reason == "error" and "sampling failed" in bad.error
    assert good.token_ids == want
    old = [link.process for link in engine.backend.links]
    os.kill(old[1].pid, signal.SIGKILL)  # tp rank 1 of instance 0
    for _ in range(600):
        if engine.stats().restarts == 1 and engine.health().ok:
            break
        await asyncio.sleep(0.05)
    assert engine.health().ok and not any(p.is_alive() for p in old)
    assert (await final(engine, ids, GREEDY)).token_ids == want
    assert slots_all_free(engine)


def test_the_simulator_takes_tp_from_its_profile():
    """Under the simulator an instance is what the profile times: `--tp` must agree with it."""
    from esp.engine.errors import EngineStartError

    async def start(tp: int, profile: str) -> int:
        config = EngineConfig(backend="sim", profile=profile, instances=4, tp=tp, log_requests=False)
        async with Engine(config) as engine:
            return engine.cost_model.tp
    assert asyncio.run(start(2, "a800-lwm7b-tp2")) == 2
    assert asyncio.run(start(1, "a800-lwm7b-tp4")) == 4  # --tp left at its default: the profile's
    with pytest.raises(EngineStartError, match="a800-lwm7b-tp2"):
        asyncio.run(start(2, "a800-lwm7b"))
