"""Llama, Mistral, Qwen2 and Qwen3 checkpoints and every RoPE type against `transformers` itself.

Each case is a tiny random model built by the family's own config class and saved with
`save_pretrained` in float64; ours (`load_model`) must give HF's float64 logits to 1e-10 and
HF `generate`'s greedy tokens. Small `max_position_embeddings` / `original_max_position_embeddings`
make yarn's ramp and dynamic NTK's rescaling act inside a 40-token prompt.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from hf_fixtures import (TINY, PackedAttention, esp_run_generate, hf_greedy, hf_logits, hf_model,
                         make_random_checkpoint, ours_greedy, ours_logits, prompt)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from esp.engine.loader import load_model
from esp.engine.model import LlamaForCausalLM
from esp.engine.model_config import ConfigError, ModelConfig, RopeScaling
from esp.engine.rope import dynamic_inv_freq, dynamic_seq_lens, rope_attention_factor, rope_inv_freq

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16, "rope_theta": 500000.0}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0}
DYNAMIC = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
SHORT = {"max_position_embeddings": 24}  # dynamic NTK rescales past position 24

# (family, config overrides); qwen3's head_dim (24) is not hidden / heads (16)
CASES = {
    "llama-llama3": ("llama", {"rope_parameters": LLAMA3}),
    "llama-bias": ("llama", {"attention_bias": True}),
    "mistral": ("mistral", {"sliding_window": None}),
    "qwen2": ("qwen2", {"tie_word_embeddings": True}),
    "qwen3": ("qwen3", {"head_dim": 24}),
    "qwen3-bias": ("qwen3", {"attention_bias": True}),
    "qwen3-linear": ("qwen3", {"head_dim": 24, "rope_parameters": {"rope_type": "linear", "factor": 4.0,
                                                                   "rope_theta": 10000.0}}),
    "qwen3-llama3": ("qwen3", {"head_dim": 24, "rope_parameters": LLAMA3}),
    "qwen3-yarn": ("qwen3", {"head_dim": 24, "rope_parameters": YARN}),
    "qwen2-yarn-mscale": ("qwen2", {"rope_parameters": {**YARN, "beta_fast": 8, "beta_slow": 2, "mscale": 0.707,
                                                        "mscale_all_dim": 1.0, "truncate": False}}),
    "qwen3-dynamic": ("qwen3", {"head_dim": 24, "rope_parameters": DYNAMIC, **SHORT}),
    "llama-dynamic": ("llama", {"rope_parameters": {**DYNAMIC, "factor": 4.0}, **SHORT}),
    "mistral-yarn": ("mistral", {"sliding_window": None, "rope_parameters": YARN}),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory) -> tuple[str, Path]:
    arch, overrides = CASES[request.param]
    path = make_random_checkpoint(tmp_path_factory.mktemp(request.param), seed=len(request.param), arch=arch,
                                  dtype=torch.float64, **overrides)
    return request.param, path


def test_logits_match_hf(case):
    name, path = case
    ids = prompt(40, seed=1)
    model = load_model(path, torch.float64, "cpu")
    assert model.config.model_type == CASES[name][0]
    ours, ref = ours_logits(model, ids), hf_logits(hf_model(path), ids)
    assert ours.shape == (40, 512) and ref.abs().max() > 1.0
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=0)


def test_greedy_decoding_matches_hf_generate(case):
    """Prefill then one token per step at its own position. With dynamic RoPE a 30-token prompt
    starts past `max_position_embeddings` (24) and a 16-token one crosses it while decoding."""
    name, path = case
    model = load_model(path, torch.float64, "cpu")
    for n in (16, 30) if "dynamic" in name else (30,):
        ids = prompt(n, seed=2)
        ref = hf_greedy(path, ids, 12)
        assert ours_greedy(model, ids, 12) == ref
        assert len(ref) == 12


ARCH_CONFIG = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
               "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}


def attention_params(arch: str, **overrides) -> dict[str, tuple[int, ...]]:
    config = ModelConfig.from_dict(ARCH_CONFIG[arch](**{**TINY, **overrides}).to_dict())
    prefix = "model.layers.0.self_attn."
    return {n[len(prefix):]: tuple(p.shape) for n, p in LlamaForCausalLM(config).named_parameters()
            if n.startswith(prefix)}


def test_each_family_has_its_checkpoint_tensors():
    """Qwen2: biased q/k/v, unbiased o; Qwen3: per-head q/k norms of head_dim; Mistral: no bias."""
    projections = {f"{p}_proj.weight" for p in "qkvo"}
    assert set(attention_params("qwen2")) == projections | {"q_proj.bias", "k_proj.bias", "v_proj.bias"}
    qwen3 = attention_params("qwen3", head_dim=24)
    assert qwen3 == {"q_proj.weight": (96, 64), "k_proj.weight": (48, 64), "v_proj.weight": (48, 64),
                     "o_proj.weight": (64, 96), "q_norm.weight": (24,), "k_norm.weight": (24,)}
    assert set(attention_params("qwen3", attention_bias=True)) == set(qwen3) | {f"{p}_proj.bias" for p in "qkvo"}
    assert set(attention_params("mistral", sliding_window=None, attention_bias=True)) == projections
    assert set(attention_params("llama", attention_bias=True)) == projections | {f"{p}_proj.bias" for p in "qkvo"}


# ----- dynamic NTK: per request, by its own length -----

@pytest.fixture(scope="module")
def dynamic_ckpt(tmp_path_factory) -> Path:
    arch, overrides = CASES["qwen3-dynamic"]
    return make_random_checkpoint(tmp_path_factory.mktemp("dyn"), seed=5, arch=arch, dtype=torch.float64,
                                  **overrides)


def test_dynamic_packed_batch_equals_each_request_alone(dynamic_ckpt):
    """Requests of 40, 12 and 30 tokens in one forward, each rotated by its own length (HF's batched
    forward would rescale all three by the longest)."""
    model = load_model(dynamic_ckpt, torch.float64, "cpu")
    seqs = [prompt(n, seed=n) for n in (40, 12, 30)]
    positions = torch.cat([torch.arange(len(s)) for s in seqs])
    seq_lens = torch.cat([dynamic_seq_lens(torch.arange(len(s)), len(s)) for s in seqs])
    with torch.inference_mode():
        packed = model.compute_logits(model(torch.cat(seqs), positions, PackedAttention([40, 12, 30]), seq_lens))
    for part, ids in zip(packed.split([40, 12, 30]), seqs):
        torch.testing.assert_close(part, ours_logits(model, ids), atol=1e-12, rtol=0)
        torch.testing.assert_close(part, hf_logits(hf_model(dynamic_ckpt), ids), atol=1e-10, rtol=0)


def test_dynamic_rule_and_default_seq_lens(dynamic_ckpt):
    """`seq_lens` None is `positions + 1`: right for decode tokens, not for a prompt past the context."""
    model = load_model(dynamic_ckpt, torch.float64, "cpu")
    assert dynamic_seq_lens(torch.arange(28, 32), 30).tolist() == [30, 30, 31, 32]
    positions = torch.arange(40)
    default, _ = model.rope(positions, torch.float64)
    explicit, _ = model.rope(positions, torch.float64, positions + 1)
    as_prompt, _ = model.rope(positions, torch.float64, dynamic_seq_lens(positions, 40))
    assert torch.equal(default, explicit)
    assert torch.equal(as_prompt[-1], default[-1])  # the last prompt token is at the prompt's length
    assert not torch.allclose(as_prompt[24:39], default[24:39])
    short, _ = model.rope(torch.arange(24), torch.float64, torch.full((24,), 24))
    assert torch.equal(short, default[:24])  # up to max_position_embeddings nothing is rescaled


@pytest.mark.parametrize("head_dim, theta, factor, max_pos", [(16, 1e4, 2.0, 32), (128, 1e6, 8.0, 4096)])
def test_dynamic_inv_freq_is_hfs_bit_for_bit(head_dim, theta, factor, max_pos):
    hf = transformers.LlamaConfig(hidden_size=2 * head_dim, num_attention_heads=2, num_key_value_heads=2,
                                  head_dim=head_dim, max_position_embeddings=max_pos,
                                  rope_parameters={"rope_type": "dynamic", "factor": factor, "rope_theta": theta})
    lens = torch.arange(max_pos + 1, max_pos + 200)
    ours = dynamic_inv_freq(ModelConfig.from_dict(hf.to_dict()), lens)
    ref = torch.stack([ROPE_INIT_FUNCTIONS["dynamic"](hf, None, seq_len=s)[0] for s in lens])
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("params", [
    YARN, {**YARN, "beta_fast": 16, "beta_slow": 2}, {**YARN, "truncate": False}, {**YARN, "attention_factor": 0.5},
    {**YARN, "mscale": 0.707, "mscale_all_dim": 1.0}, {**YARN, "factor": 40.0, "rope_theta": 1e6},
    {**YARN, "factor": None, "original_max_position_embeddings": 8},
])
@pytest.mark.parametrize("head_dim", [16, 128])
def test_yarn_inv_freq_and_attention_factor_are_hfs(params, head_dim):
    hf = transformers.Qwen3Config(hidden_size=64, num_attention_heads=2, num_key_value_heads=2, head_dim=head_dim,
                                  max_position_embeddings=64, rope_parameters=dict(params))
    ref, factor = ROPE_INIT_FUNCTIONS["yarn"](hf)
    config = ModelConfig.from_dict(hf.to_dict())
    assert torch.equal(rope_inv_freq(config), ref)
    assert rope_attention_factor(config) == factor


def test_top_level_original_max_position_embeddings_wins_as_in_hf():
    """HF's `standardize_rope_params` puts a top-level `original_max_position_embeddings` over the RoPE dict's."""
    d = transformers.Qwen2Config(**{**TINY, "rope_parameters": YARN}).to_dict()
    d["original_max_position_embeddings"] = 32
    config = ModelConfig.from_dict(d)
    assert config.rope_scaling.original_max_position_embeddings == 32
    hf = transformers.Qwen2Config.from_dict(d)
    ref, _ = ROPE_INIT_FUNCTIONS["yarn"](hf)
    assert hf.rope_parameters["original_max_position_embeddings"] == 32
    assert torch.equal(rope_inv_freq(config), ref)


# ----- what transformers writes by default is accepted; what we do not run is refused -----

@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_transformers_default_configs_are_accepted(arch):
    d = ARCH_CONFIG[arch]().to_dict()
    config = ModelConfig.from_dict(d)
    assert config.model_type == arch and config.rope_scaling is None
    if arch != "llama":
        assert d["layer_types"] == ["full_attention"] * d["num_hidden_layers"] and d["sliding_window"] is None


def test_mistral_default_sliding_window_is_refused_but_a_long_one_is_not():
    """MistralConfig() slides a 4096-token window over 131072 positions, on every layer."""
    d = transformers.MistralConfig().to_dict()
    with pytest.raises(ConfigError, match="'sliding_window'"):
        ModelConfig.from_dict(d)
    assert ModelConfig.from_dict({**d, "sliding_window": d["max_position_embeddings"]}).model_type == "mistral"


QWEN25_STYLE = {  # a transformers 4.x Qwen2.5 config.json: the window is there but disabled
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 512, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_scaling": None,
    "sliding_window": 131072, "use_sliding_window": False, "max_window_layers": 28, "hidden_act": "silu",
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "bos_token_id": 151643, "eos_token_id": 151645,
}


@pytest.mark.parametrize("changes", [
    {},
    {"sliding_window": 4096},  # smaller than the context, but use_sliding_window is false
    {"use_sliding_window": True, "sliding_window": 4096},  # max_window_layers 28 >= 2 layers: none slides
    {"use_sliding_window": True, "sliding_window": 4096, "max_window_layers": 0,
     "layer_types": ["full_attention", "full_attention"]},
    {"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}},
    {"num_experts": 0},
])
def test_qwen_configs_that_run_full_attention_are_accepted(changes):
    d = {**QWEN25_STYLE, **changes}
    config = ModelConfig.from_dict(d)
    assert config.qkv_bias and not config.o_bias and not config.qk_norm
    hf = transformers.Qwen2Config.from_dict(d)
    assert all(t == "full_attention" for t in hf.layer_types) or hf.sliding_window is None


@pytest.mark.parametrize("changes, field", [
    ({"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1, "layer_types": None},
     "use_sliding_window"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
    ({"layer_types": ["full_attention", "chunked_attention"]}, "layer_types"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e4},
                          "sliding_attention": {"rope_type": "default", "rope_theta": 1e6}}}, "rope_parameters"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 12,
                          "long_factor": [2.0] * 12, "original_max_position_embeddings": 64}}, "rope_parameters"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "rope_parameters"),
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4}}, "rope_parameters.factor"),
    ({"rope_parameters": {**YARN, "truncate": "yes"}}, "rope_parameters.truncate"),
    ({"rope_parameters": {**YARN, "beta_fast": "32"}}, "rope_parameters.beta_fast"),
    ({"num_experts": 8, "num_experts_per_tok": 2}, "num_experts"),
    ({"num_local_experts": 8}, "num_local_experts"),
    ({"moe_intermediate_size": 32}, "moe_intermediate_size"),
    ({"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"]}, "model_type"),
    ({"model_type": "mixtral", "architectures": ["MixtralForCausalLM"]}, "model_type"),
    ({"architectures": ["Qwen2ForCausalLM"]}, "architectures"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"attention_bias": "yes"}, "attention_bias"),
])
def test_unsupported_qwen3_fields_name_file_and_field(tmp_path, changes, field):
    path = make_random_checkpoint(tmp_path, arch="qwen3", head_dim=24)
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError) as info:
        load_model(path, torch.float32, "cpu")
    msg = str(info.value)
    assert msg.startswith(f"{path / 'config.json'}: field {field!r}: ") and "\n" not in msg


@pytest.mark.parametrize("arch, changes, field", [
    ("mistral", {"sliding_window": 64}, "sliding_window"),
    ("mistral", {"layer_types": ["sliding_attention", "full_attention"]}, "layer_types"),
    ("llama", {"sliding_window": 64}, "sliding_window"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 64, "max_window_layers": 0}, "use_sliding_window"),
    ("qwen2", {"num_experts": 4}, "num_experts"),
])
def test_unsupported_fields_of_other_families(arch, changes, field):
    d = {**ARCH_CONFIG[arch](**TINY).to_dict(), "layer_types": None, **changes}
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_dict(d, source="/m/config.json")
    assert str(info.value).startswith(f"/m/config.json: field {field!r}: ")


def test_rope_scaling_reads_the_same_from_both_layouts():
    v5 = transformers.Qwen3Config(**{**TINY, "rope_parameters": {**YARN, "beta_fast": 8}}).to_dict()
    v4 = {k: v for k, v in v5.items() if k != "rope_parameters"}
    v4["rope_theta"] = YARN["rope_theta"]
    v4["rope_scaling"] = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 8}
    assert ModelConfig.from_dict(v4) == ModelConfig.from_dict(v5)
    assert ModelConfig.from_dict(v5).rope_scaling == RopeScaling("yarn", 4.0, original_max_position_embeddings=16,
                                                                 beta_fast=8.0)
    dyn = {**v4, "rope_scaling": {"type": "dynamic", "factor": 2.0}}
    assert ModelConfig.from_dict(dyn).rope_scaling == RopeScaling("dynamic", 2.0)


# ----- end to end: the real engine, 1 and 2 instances -----

@pytest.mark.parametrize("name", ["qwen3", "qwen2"])
@pytest.mark.parametrize("instances", [1, 2])
def test_esp_run_generate_float64_greedy_equals_hf(tmp_path, name, instances):
    arch, overrides = CASES[name]
    ckpt = make_random_checkpoint(tmp_path, seed=7, arch=arch, dtype=torch.float64, **overrides)
    ids = prompt(40, seed=8)
    out = esp_run_generate(ckpt, ids, 12, instances)
    assert out["token_ids"] == hf_greedy(ckpt, ids, 12)
    assert len(out["esp"]["prefill_group"]) == instances
