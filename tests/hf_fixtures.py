"""Small random Hugging Face checkpoints and the oracle helpers around them (import as
`from hf_fixtures import ...`).

The oracle is `transformers`' own model loaded from the same directory with SDPA attention
(its eager path runs softmax in float32 even for float64 models). In float64 the oracle is
made float64 throughout: HF computes RMSNorm and RoPE cos/sin in float32 even for float64
models, so `hf_float64` swaps in the same two formulas evaluated in float64 (keeping HF's own
`inv_freq`, i.e. its RoPE-scaling code and its dynamic-RoPE update, untouched).
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers.modeling_rope_utils import dynamic_rope_update
from transformers.models.llama import modeling_llama
from transformers.models.mistral import modeling_mistral
from transformers.models.qwen2 import modeling_qwen2
from transformers.models.qwen3 import modeling_qwen3

from esp.engine.model import LlamaForCausalLM
from esp.engine.rope import dynamic_seq_lens

transformers.utils.logging.disable_progress_bar()

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0,
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


ARCHS = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, modeling_llama, "Llama"),
         "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, modeling_mistral, "Mistral"),
         "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, modeling_qwen2, "Qwen2"),
         "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, modeling_qwen3, "Qwen3")}


def make_random_checkpoint(tmp_path: str | Path, *, seed: int = 0, max_shard_size: str | int | None = None,
                           init_std: float = 0.1, name: str = "ckpt", arch: str = "llama",
                           dtype: torch.dtype = torch.float32, **config_overrides: Any) -> Path:
    """Write a seeded random `transformers` model of family `arch` (`ARCHS`) in `dtype` to
    `tmp_path / name` with `save_pretrained(safe_serialization=True)`, sharded when
    `max_shard_size` is given; return the dir.

    `config_overrides` go to the family's config class (e.g. `rope_scaling={...}`,
    `tie_word_embeddings=True`). `init_std` is larger than HF's 0.02 so that logits are far from
    uniform and greedy decoding is not a string of near-ties. Norm weights and biases are
    randomised too (HF initialises them to ones and zeros).
    """
    config_cls, model_cls, _, _ = ARCHS[arch]
    config = config_cls(**{**TINY, "initializer_range": init_std, **config_overrides})
    torch.manual_seed(seed)
    model = model_cls(config).to(dtype).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif pname.endswith(".bias"):
                p.normal_(0.0, init_std)
    out = Path(tmp_path) / name
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out, safe_serialization=True, **kwargs)
    return out


def prompt(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed))


# ----- attention callbacks for our model -----

def dense_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One sequence: q [T, H, D], k/v [S, KVH, D] with the T queries being the last T of S keys."""
    t, s = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    mask = torch.arange(s)[None, :] <= torch.arange(s - t, s)[:, None]
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask)
    return out.transpose(0, 1)


class PackedAttention:
    """Dense causal attention within each sequence of a packed batch; records the layers it saw."""

    def __init__(self, lengths: list[int]) -> None:
        self.lengths, self.layers = lengths, []

    def __call__(self, layer, q, k, v):
        self.layers.append(layer)
        outs = [dense_causal_attention(*parts) for parts in zip(*(x.split(self.lengths) for x in (q, k, v)))]
        return torch.cat(outs) if outs else torch.empty_like(q)


class CachedAttention:
    """One sequence decoded incrementally: keeps every layer's K/V and attends new queries to all of it."""

    def __init__(self) -> None:
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}

    def __call__(self, layer, q, k, v):
        self.k[layer] = torch.cat((self.k[layer], k)) if layer in self.k else k
        self.v[layer] = torch.cat((self.v[layer], v)) if layer in self.v else v
        return dense_causal_attention(q, self.k[layer], self.v[layer])


def ours_logits(model: LlamaForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """One whole sequence in one forward, as a prompt: every token at the prompt's length."""
    positions = torch.arange(len(ids))
    with torch.inference_mode():
        hidden = model(ids, positions, PackedAttention([len(ids)]), dynamic_seq_lens(positions, len(ids)))
        return model.compute_logits(hidden)


def ours_greedy(model: LlamaForCausalLM, ids: torch.Tensor, steps: int) -> list[int]:
    """Prefill `ids`, then `steps` greedy decode steps of one token at its own position over a KV cache."""
    cache, out, n = CachedAttention(), [], len(ids)
    with torch.inference_mode():
        positions = torch.arange(n)
        hidden = model(ids, positions, cache, dynamic_seq_lens(positions, n))[-1:]
        for pos in range(n, n + steps):
            out.append(int(model.compute_logits(hidden).argmax(-1)))
            position = torch.tensor([pos])
            hidden = model(torch.tensor(out[-1:]), position, cache, dynamic_seq_lens(position, n))
    return out


# ----- the transformers oracle -----

@contextmanager
def hf_float64():
    """HF's RMSNorm and RoPE formulas evaluated in the input's dtype instead of float32."""

    def norm(self, x):
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * y

    @dynamic_rope_update
    def rope(self, x, position_ids):
        freqs = position_ids[..., None].to(torch.float64) * self.inv_freq.to(torch.float64)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)

    mp = pytest.MonkeyPatch()
    for _, _, mod, prefix in ARCHS.values():
        mp.setattr(getattr(mod, f"{prefix}RMSNorm"), "forward", norm)
        mp.setattr(getattr(mod, f"{prefix}RotaryEmbedding"), "forward", rope)
    try:
        yield
    finally:
        mp.undo()


def hf_model(path: Path, dtype: torch.dtype = torch.float64):
    """A fresh oracle (HF's dynamic RoPE keeps state between calls, so each use loads its own)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").eval()
    assert next(model.parameters()).dtype == dtype
    return model


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode(), hf_float64():
        return model(ids[None]).logits[0]


def hf_greedy(path: Path, ids: torch.Tensor, steps: int) -> list[int]:
    """`generate` on one sequence, greedy, float64, EOS ignored."""
    hf = hf_model(path, torch.float64)
    hf.generation_config.eos_token_id = None
    with torch.inference_mode(), hf_float64():
        out = hf.generate(ids[None], do_sample=False, max_new_tokens=steps, pad_token_id=0)
    return out[0, len(ids):].tolist()


def esp_run_generate(ckpt: Path, ids: torch.Tensor, steps: int, instances: int) -> dict:
    """`esp-run generate` on `ckpt` (given the bundled tokenizer, whose 4096 pieces cover the
    512-token vocabulary): float64, greedy, EOS ignored, `static-sp` over `instances`; its JSON."""
    import json
    import shutil
    import subprocess
    import sys

    from esp.engine.config import bundled_model_dir

    shutil.copy(bundled_model_dir() / "tokenizer.model", ckpt / "tokenizer.model")
    cmd = [sys.executable, "-m", "esp.cli.main", "generate", "--model", str(ckpt), "--dtype", "float64",
           "--temperature", "0", "--ignore-eos", "--max-tokens", str(steps), "--instances", str(instances),
           "--threads-per-instance", "1", "--kv-tokens-per-instance", "64", "--policy", "static-sp",
           "--prompt-ids", ",".join(map(str, ids.tolist())), "--json"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)
