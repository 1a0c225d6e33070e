"""Our Llama (esp.engine.model + loader) against Hugging Face `transformers` on small random checkpoints.

The oracle and the attention callbacks live in `hf_fixtures` (see its docstring for how the
float64 oracle is made float64 throughout); `test_architectures.py` covers the other families
and RoPE types.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from hf_fixtures import (CachedAttention, PackedAttention, esp_run_generate, hf_greedy, hf_logits, hf_model,
                         make_random_checkpoint, ours_greedy, ours_logits, prompt)
from safetensors.torch import load_file, save_file
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama import modeling_llama

from esp.engine.loader import CheckpointError, load_model, resolve_dtype
from esp.engine.model import rope_inv_freq
from esp.engine.model_config import ModelConfig, RopeScaling

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
CONFIGS = {
    "gqa": {"num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 8},
    "mha": {"num_key_value_heads": 4},
    "tied": {"tie_word_embeddings": True},
    "theta500k": {"rope_theta": 500000.0},
    "linear": {"rope_scaling": {"rope_type": "linear", "factor": 4.0}},
    "llama3": {"rope_theta": 500000.0, "rope_scaling": LLAMA3},
    "sharded": {"max_shard_size": "40KB"},
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def ckpt(request, tmp_path_factory) -> Path:
    overrides = dict(CONFIGS[request.param])
    return make_random_checkpoint(tmp_path_factory.mktemp(request.param), seed=len(request.param), **overrides)


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-4), (torch.float64, 1e-10)])
def test_logits_match_hf(ckpt, dtype, atol):
    ids = prompt(48)
    ours, ref = ours_logits(load_model(ckpt, dtype, "cpu"), ids), hf_logits(hf_model(ckpt, dtype), ids)
    assert ours.dtype == dtype and ours.shape == (48, 512)
    assert ref.abs().max() > 1.0
    torch.testing.assert_close(ours, ref.to(dtype), atol=atol, rtol=0)


def test_greedy_decoding_matches_hf_generate(ckpt):
    steps, ids = 20, prompt(12, seed=1)
    ref = hf_greedy(ckpt, ids, steps)
    out = ours_greedy(load_model(ckpt, torch.float64, "cpu"), ids, steps)
    assert len(ref) == steps
    assert out == ref
    assert len(set(out)) > 1


def test_packed_batch_equals_each_sequence_alone(tmp_path):
    model = load_model(make_random_checkpoint(tmp_path, **CONFIGS["gqa"]), torch.float64, "cpu")
    a, b = prompt(7, seed=2), prompt(13, seed=3)
    attn = PackedAttention([7, 13])
    with torch.inference_mode():
        packed = model.compute_logits(model(torch.cat((a, b)), torch.cat((torch.arange(7), torch.arange(13))), attn))
    assert attn.layers == [0, 1]
    torch.testing.assert_close(packed[:7], ours_logits(model, a), atol=1e-12, rtol=0)
    torch.testing.assert_close(packed[7:], ours_logits(model, b), atol=1e-12, rtol=0)
    torch.testing.assert_close(packed[7:], hf_logits(hf_model(tmp_path / "ckpt", torch.float64), b),
                               atol=1e-10, rtol=0)


def test_empty_batch_flows_through_every_layer_in_order(tmp_path):
    model = load_model(make_random_checkpoint(tmp_path, num_hidden_layers=3), torch.float32, "cpu")
    shapes = []

    def attention(layer, q, k, v):
        shapes.append((layer, tuple(q.shape), tuple(k.shape), tuple(v.shape)))
        return torch.empty_like(q)

    with torch.inference_mode():
        hidden = model(torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64), attention)
        logits = model.compute_logits(hidden)
    assert shapes == [(i, (0, 4, 16), (0, 2, 16), (0, 2, 16)) for i in range(3)]
    assert hidden.shape == (0, 64) and logits.shape == (0, 512) and logits.dtype == torch.float32


def test_positions_are_global(tmp_path):
    """The tail of a sequence run alone at its true positions, over the cached head, equals the full run."""
    model = load_model(make_random_checkpoint(tmp_path, **CONFIGS["llama3"]), torch.float64, "cpu")
    ids, cache = prompt(40, seed=4), CachedAttention()
    with torch.inference_mode():
        model(ids[:25], torch.arange(25), cache)
        tail = model.compute_logits(model(ids[25:], torch.arange(25, 40), cache))
        shifted = model.compute_logits(model(ids[25:], torch.arange(15), PackedAttention([15])))
    full = ours_logits(model, ids)
    torch.testing.assert_close(tail, full[25:], atol=1e-12, rtol=0)
    assert not torch.allclose(shifted, full[25:], atol=1e-3)


def test_bfloat16_is_close_to_float32(tmp_path):
    path = make_random_checkpoint(tmp_path)
    ids = prompt(16, seed=5)
    bf16 = load_model(path, torch.bfloat16, "cpu")
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    ours, ref = ours_logits(bf16, ids), ours_logits(load_model(path, torch.float32, "cpu"), ids)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, atol=0.15, rtol=0.05)


def test_mistral_without_sliding_window_matches_hf(tmp_path):
    path = make_random_checkpoint(tmp_path, arch="mistral", sliding_window=None)
    ids = prompt(24, seed=6)
    ref = hf_logits(hf_model(path, torch.float64), ids)
    torch.testing.assert_close(ours_logits(load_model(path, torch.float64, "cpu"), ids), ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 2.5}, LLAMA3,
                                     {**LLAMA3, "factor": 32.0, "high_freq_factor": 2.0, "rope_theta": 1e6}])
def test_inv_freq_is_hfs(scaling):
    hf_config = transformers.LlamaConfig(hidden_size=256, num_attention_heads=2, rope_scaling=scaling,
                                         max_position_embeddings=4096)
    ours = rope_inv_freq(ModelConfig.from_dict(hf_config.to_dict()))
    init = (ROPE_INIT_FUNCTIONS[scaling["rope_type"]] if scaling
            else modeling_llama.LlamaRotaryEmbedding.compute_default_rope_parameters)
    ref, scale = init(hf_config)
    assert scale == 1.0 and ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, atol=0, rtol=0)


TRANSFORMERS_4_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu",
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 32, "rope_type": "llama3"},
    "tie_word_embeddings": True, "bos_token_id": 128000, "eos_token_id": [128001, 128009],
    "torch_dtype": "bfloat16", "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1,
}


def test_transformers_4_and_5_config_layouts_read_the_same():
    v4 = ModelConfig.from_dict(TRANSFORMERS_4_CONFIG)
    assert v4.rope_theta == 500000.0 and v4.head_dim == 16 and v4.eos_token_ids == (128001, 128009)
    assert v4.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 32) and v4.torch_dtype == "bfloat16"
    v5 = transformers.LlamaConfig(**{k: v for k, v in TRANSFORMERS_4_CONFIG.items()
                                     if k not in ("torch_dtype", "model_type")}, dtype="bfloat16")
    d5 = v5.to_dict()
    assert "rope_parameters" in d5 and d5["rope_parameters"]["rope_theta"] == 500000.0
    assert ModelConfig.from_dict(d5) == v4
    legacy = {**TRANSFORMERS_4_CONFIG, "rope_scaling": {"type": "linear", "factor": 2.0}}
    assert ModelConfig.from_dict(legacy).rope_scaling == RopeScaling("linear", 2.0)
    assert hash(v4) == hash(ModelConfig.from_dict(TRANSFORMERS_4_CONFIG))


def test_transformers_4_style_directory_matches_hf(tmp_path):
    path = make_random_checkpoint(tmp_path, **CONFIGS["llama3"])
    config = json.loads((path / "config.json").read_text())
    params = config.pop("rope_parameters")
    config["rope_theta"] = params.pop("rope_theta")
    config["rope_scaling"] = params
    config["torch_dtype"] = config.pop("dtype")
    (path / "config.json").write_text(json.dumps(config))
    ids = prompt(40, seed=7)
    ours = ours_logits(load_model(path, torch.float64, "cpu"), ids)
    torch.testing.assert_close(ours, hf_logits(hf_model(path, torch.float64), ids), atol=1e-10, rtol=0)


def test_resolve_dtype():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("float64", torch.device("cpu")) == torch.float64
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="int8"):
        resolve_dtype("int8", "cpu")


# ----- errors: each names the file and the tensor or field -----

def edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def edit_tensors(file: Path, edit) -> None:
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


@pytest.fixture
def tiny(tmp_path) -> Path:
    return make_random_checkpoint(tmp_path)


def load_error(path: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_model(path, torch.float32, "cpu")
    return str(info.value)


def test_missing_tensor(tiny):
    edit_tensors(tiny / "model.safetensors", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    msg = load_error(tiny)
    assert str(tiny / "model.safetensors") in msg and "'model.layers.1.mlp.up_proj.weight'" in msg


def test_missing_lm_head_when_untied(tiny):
    edit_tensors(tiny / "model.safetensors", lambda t: t.pop("lm_head.weight"))
    assert "'lm_head.weight'" in load_error(tiny)


def test_shape_mismatch(tiny):
    edit_tensors(tiny / "model.safetensors",
                 lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(16, 64)}))
    msg = load_error(tiny)
    assert str(tiny / "model.safetensors") in msg and "'model.layers.0.self_attn.k_proj.weight'" in msg
    assert "[16, 64]" in msg and "expected [32, 64]" in msg


def test_unexpected_tensor(tiny):
    edit_tensors(tiny / "model.safetensors",
                 lambda t: t.update({"model.layers.2.mlp.up_proj.weight": torch.zeros(128, 64)}))
    msg = load_error(tiny)
    assert str(tiny / "model.safetensors") in msg and "unexpected tensor 'model.layers.2.mlp.up_proj.weight'" in msg


def test_rotary_inv_freq_is_ignored_and_tied_lm_head_tolerated(tmp_path):
    path = make_random_checkpoint(tmp_path, tie_word_embeddings=True)
    edit_tensors(path / "model.safetensors", lambda t: t.update({
        "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8),
        "lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    model = load_model(path, torch.float32, "cpu")
    assert model.lm_head is None


def test_sharded_errors_name_the_shard(tmp_path):
    path = make_random_checkpoint(tmp_path, max_shard_size="40KB")
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.self_attn.o_proj.weight"
    shard = path / weight_map[name]
    edit_tensors(shard, lambda t: t.pop(name))
    msg = load_error(path)
    assert str(shard) in msg and repr(name) in msg
    shard.unlink()
    msg = load_error(path)
    assert "model.safetensors.index.json" in msg and shard.name in msg


@pytest.mark.parametrize("changes, field", [
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "model_type"),
    ({"architectures": ["LlamaForSequenceClassification"]}, "architectures"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "factor": 4.0}}, "rope_parameters"),
    ({"rope_parameters": None, "rope_scaling": {"type": "longrope", "factor": 2.0}}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}}, "rope_parameters.low_freq_factor"),
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": 64}, "sliding_window"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"num_attention_heads": 3}, "num_attention_heads"),
    ({"vocab_size": "512"}, "vocab_size"),
])
def test_unsupported_config_names_file_and_field(tiny, changes, field):
    edit_config(tiny, **changes)
    msg = load_error(tiny)
    assert str(tiny / "config.json") in msg and repr(field) in msg


def test_rope_type_error_names_the_type(tiny):
    edit_config(tiny, rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "factor": 4.0})
    assert "'longrope'" in load_error(tiny)


def test_missing_or_broken_files(tiny):
    (tiny / "model.safetensors").write_bytes(b"not a safetensors file")
    assert str(tiny / "model.safetensors") in load_error(tiny)
    (tiny / "model.safetensors").unlink()
    assert "no model.safetensors" in load_error(tiny)
    (tiny / "config.json").write_text("{")
    assert str(tiny / "config.json") in load_error(tiny)
    (tiny / "config.json").unlink()
    assert str(tiny / "config.json") in load_error(tiny)


@pytest.mark.parametrize("name", ["gqa", "tied", "theta500k"])
@pytest.mark.parametrize("instances", [1, 2])
def test_esp_run_generate_float64_greedy_equals_hf(tmp_path, name, instances):
    """End to end through `esp-run generate` (worker processes, KV pool, kernels, sampling)."""
    ckpt = make_random_checkpoint(tmp_path, seed=3, **CONFIGS[name])
    ids = prompt(40, seed=5)
    out = esp_run_generate(ckpt, ids, 12, instances)
    assert out["token_ids"] == hf_greedy(ckpt, ids, 12)
    assert len(out["esp"]["prefill_group"]) == instances == len(out["esp"]["keep_plan"])
