"""Small random Hugging Face Llama checkpoints for tests (import as `from hf_fixtures import ...`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers

transformers.utils.logging.disable_progress_bar()

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0,
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


ARCHS = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
         "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}


def make_random_checkpoint(tmp_path: str | Path, *, seed: int = 0, max_shard_size: str | int | None = None,
                           init_std: float = 0.1, name: str = "ckpt", arch: str = "llama",
                           **config_overrides: Any) -> Path:
    """Write a seeded random `transformers.LlamaForCausalLM` (float32) to `tmp_path / name` with
    `save_pretrained(safe_serialization=True)`, sharded when `max_shard_size` is given; return the dir.

    `config_overrides` go to `transformers.LlamaConfig` (e.g. `rope_scaling={...}`,
    `tie_word_embeddings=True`); `arch="mistral"` writes a `MistralForCausalLM` instead (pass
    `sliding_window=None`). `init_std` is larger than HF's 0.02 so that logits are far from
    uniform and greedy decoding is not a string of near-ties. Norm weights are randomised too.
    """
    config_cls, model_cls = ARCHS[arch]
    config = config_cls(**{**TINY, "initializer_range": init_std, **config_overrides})
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    out = Path(tmp_path) / name
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out, safe_serialization=True, **kwargs)
    return out
