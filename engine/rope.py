"""RoPE frequencies exactly as `transformers.modeling_rope_utils` computes them.

Every formula is HF's, evaluated in the same float32 torch ops in the same order (so the
frequencies are bit-identical on the same device): `default`, `linear`, `llama3` and `yarn`
are fixed per model; `dynamic` (NTK) depends on the length of the sequence being run.

Dynamic NTK, per token. HF's `dynamic_rope_update` recomputes `inv_freq` for each forward call
from `seq_len = max(position_ids) + 1` when that exceeds `max_position_embeddings` (and the
cached length), and its KV cache keeps keys rotated with the frequencies of the call that made
them. So `generate` on one sequence with a prompt of `L` tokens rotates every prompt token with
the frequencies for length `L` (one prefill call) and the generated token at position `p` with
those for `p + 1` (one decode call each). The engine's rule is that, per request: the token at
position `p` of a request whose prompt has `L` tokens uses the frequencies for length
`max(L, p + 1)`; lengths up to `max_position_embeddings` use the unscaled frequencies. A batch
therefore gives each request what it gets alone (HF's batched `generate` would instead scale
every row by the batch's longest sequence, and a reused HF model keeps the longest length it
has seen until a call shorter than `max_position_embeddings` resets it: the rule is what a
freshly loaded model does for the request alone).

The worker does not pass prompt lengths yet (`seq_lens` None is `position + 1`), and a
request's context is capped at `max_position_embeddings`, so in the engine today no token is
past it and dynamic RoPE runs unscaled, which is what the rule gives there.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from esp.engine.model_config import ModelConfig


def _exponents(dim: int, device: torch.device | None = None) -> Tensor:
    return torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float32) / dim


def rope_inv_freq(config: ModelConfig) -> Tensor:
    """`[head_dim // 2]` float32 inverse frequencies on the CPU: `compute_default_rope_parameters`,
    `_compute_linear_scaling_rope_parameters`, `_compute_llama3_parameters`,
    `_compute_yarn_parameters`; for `dynamic`, the unscaled frequencies it starts from (used up
    to `max_position_embeddings`; see `dynamic_inv_freq` beyond)."""
    dim, base, scaling = config.head_dim, config.rope_theta, config.rope_scaling
    inv_freq = 1.0 / (base ** _exponents(dim))
    if scaling is None or scaling.rope_type == "dynamic":
        return inv_freq
    factor = scaling.factor
    if scaling.rope_type == "linear":
        return inv_freq / factor
    if scaling.rope_type == "yarn":
        return _yarn_inv_freq(config)
    if scaling.rope_type != "llama3":
        raise ValueError(f"unsupported rope type {scaling.rope_type!r}")
    old_context_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_context_len / scaling.low_freq_factor
    high_freq_wavelen = old_context_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor
                                                                      - scaling.low_freq_factor)
    smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, inv_freq_llama)


def _yarn_inv_freq(config: ModelConfig) -> Tensor:
    s = config.rope_scaling
    dim, base, factor = config.head_dim, config.rope_theta, s.factor
    beta_fast, beta_slow = s.beta_fast or 32, s.beta_slow or 1

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(s.original_max_position_embeddings / (num_rotations * 2 * math.pi))) / (
            2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # HF's guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** _exponents(dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp
    return interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor


def rope_attention_factor(config: ModelConfig) -> float:
    """The factor on cos and sin: yarn's `attention_factor` (given, or from `factor` and
    `mscale` / `mscale_all_dim` as HF infers it); 1.0 for every other type."""
    s = config.rope_scaling
    if s is None or s.rope_type != "yarn":
        return 1.0
    if s.attention_factor is not None:
        return s.attention_factor

    def get_mscale(scale: float, mscale: float = 1) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    if s.mscale and s.mscale_all_dim:
        return float(get_mscale(s.factor, s.mscale) / get_mscale(s.factor, s.mscale_all_dim))
    return get_mscale(s.factor)


def dynamic_inv_freq(config: ModelConfig, seq_lens: Tensor) -> Tensor:
    """`[N, head_dim // 2]` float32 dynamic-NTK frequencies for sequence lengths `seq_lens [N]`
    (int64): HF's `_compute_dynamic_ntk_parameters` with a tensor `seq_len`, one length at a time
    as HF runs it (a vectorised float32 `pow` rounds differently in the last place on the CPU).
    A length up to `max_position_embeddings` gives the unscaled base; callers use
    `rope_inv_freq` there, as HF does."""
    dim, factor, max_pos = config.head_dim, config.rope_scaling.factor, config.max_position_embeddings
    rows = []
    for seq_len in seq_lens.unbind():
        seq_len = torch.maximum(seq_len, torch.tensor(max_pos, dtype=seq_len.dtype, device=seq_len.device))
        base = config.rope_theta * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        rows.append(1.0 / (base ** _exponents(dim, seq_lens.device)))
    return torch.stack(rows) if rows else torch.empty(0, dim // 2, device=seq_lens.device)


def dynamic_seq_lens(positions: Tensor, prompt_len: Tensor | int) -> Tensor:
    """The sequence length each token's dynamic-RoPE frequencies are computed for:
    `max(prompt_len, position + 1)`, `prompt_len` being its request's prompt length (a scalar,
    or one per token)."""
    return torch.maximum(positions + 1, torch.as_tensor(prompt_len, dtype=positions.dtype, device=positions.device))
