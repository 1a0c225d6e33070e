"""Real long-context model families end to end: a random-weight checkpoint written by
transformers' own `save_pretrained` with a `tokenizer.json` built by `tokenizers` (shaped like
Llama-3's, Qwen2.5's and Qwen3's, special tokens and chat template included). The oracle is
transformers: its tokenizer encodes the text and chat prompts, its `generate` (float64, greedy)
gives the tokens the engine must give on 1, 2 and 4 instances (`static-sp`: every prefill and
decode runs on all of them); the openai client's chat completion through `serve` applies the
template as transformers does."""
from __future__ import annotations

import asyncio

import pytest
import torch
import transformers

from esp.engine import EngineConfig, SamplingParams
from esp.engine.engine import Engine
from esp.engine.server import ServerOptions
from hf_fixtures import hf_greedy, make_random_checkpoint
from hf_tokenizer_fixtures import checkpoint_ids, generation_config, write_tokenizer
from server_helpers import serving

pytestmark = pytest.mark.slow
FAMILIES = {"llama3": ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0,
                                                   "original_max_position_embeddings": 64}}),
            "qwen2": ("qwen2", {}), "qwen3": ("qwen3", {"head_dim": 24})}
TEXT = "The café serves 🍰 and 漢字: def f(x): return x ** 2"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime above 10 🙂"}]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def checkpoint(request, tmp_path_factory):
    name = request.param
    arch, overrides = FAMILIES[name]
    ckpt = make_random_checkpoint(tmp_path_factory.mktemp(name), seed=3, arch=arch, dtype=torch.float64,
                                  **checkpoint_ids(name), **overrides)
    write_tokenizer(ckpt, name, generation=generation_config(name))
    return name, ckpt


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def config(ckpt, instances: int) -> EngineConfig:
    return EngineConfig(model=str(ckpt), instances=instances, dtype="float64", threads_per_instance=1,
                        kv_tokens_per_instance=256, policy="static-sp", log_requests=False)


@pytest.mark.parametrize("instances", [1, 2, 4])
def test_text_prompt_tokens_equal_transformers(checkpoint, instances):
    name, ckpt = checkpoint
    ids = transformers.AutoTokenizer.from_pretrained(ckpt)(TEXT)["input_ids"]
    expected = hf_greedy(ckpt, torch.tensor(ids), 10)

    async def run():
        async with Engine(config(ckpt, instances)) as engine:
            assert (await engine.encode(TEXT)).ids == ids
            outs = [o async for o in engine.generate(TEXT, greedy(10))]
        return outs
    outs = asyncio.run(run())
    assert outs[-1].token_ids == expected
    assert "".join(o.new_text for o in outs) == outs[-1].text
    assert outs[-1].esp["prefill_group"] == list(range(instances))


def test_openai_chat_completion_applies_the_template(checkpoint):
    openai = pytest.importorskip("openai")
    name, ckpt = checkpoint
    hf_tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    ids = hf_tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    expected = hf_greedy(ckpt, torch.tensor(ids), 8)

    async def run():
        async with Engine(config(ckpt, 2)) as engine, serving(engine, ServerOptions(port=0)) as url:
            async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as client:
                reply = await client.chat.completions.create(
                    model=str(ckpt), messages=MESSAGES, max_tokens=8, temperature=0,
                    extra_body={"ignore_eos": True})
            return reply, engine.tokenizer.decode(expected)
    reply, text = asyncio.run(run())
    assert reply.usage.prompt_tokens == len(ids) and reply.usage.completion_tokens == 8
    assert reply.choices[0].message.content == text
