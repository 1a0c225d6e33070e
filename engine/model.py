"""The Llama-family decoder in plain torch, over packed (varlen) token batches (DESIGN 4.1).

One module for every family `esp.engine.model_config` accepts (Llama, Mistral, Qwen2, Qwen3):
the differences are `ModelConfig` fields, biased q/k/v (`qkv_bias`) and o (`o_bias`)
projections and Qwen3's per-head RMSNorm of q and k before RoPE (`qk_norm`). RoPE frequencies
come from `esp.engine.rope`; yarn's attention factor scales cos and sin.

The model sees T tokens from any number of sequences concatenated, each with its global
position. Every op is per token except attention, which is delegated to a callback: the
worker's callback stores K/V in the KV pool and attends (possibly across instances). So the
model never mixes tokens itself, and T == 0 still calls the callback once per layer, in layer
order, which lets an instance with no tokens take part in a group's collective attention.

Numerics follow Hugging Face `transformers`: RMSNorm in float32 (float64 for float64 models)
cast back before the weight, RoPE frequencies computed in float32 by HF's formulas, cos/sin in
float32 (float64 for float64 models) cast to the model dtype, `rotate_half` convention.
Parameter names equal the Hugging Face checkpoint names, so `named_parameters()` is the
loader's list of expected tensors.

Given a `TPShard` (`--tp N`, `esp.engine.tensor_parallel`), the same module holds one rank's
part: its query and KV heads, its slice of the MLP, its rows of the vocabulary, with o_proj,
down_proj and the embedding all-reduced and the logits all-gathered over the instance's
subgroup. Without one (tp 1) the layers are plain `nn.Linear` / `nn.Embedding`.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import skip_init

from esp.engine.model_config import ModelConfig
from esp.engine.rope import dynamic_inv_freq, rope_attention_factor, rope_inv_freq
from esp.engine.tensor_parallel import RowParallelLinear, TPShard, VocabParallelEmbedding, gather_logits

AttentionFn = Callable[[int, Tensor, Tensor, Tensor], Tensor]
"""`attention(layer, q [T, H, D], k [T, KVH, D], v [T, KVH, D]) -> out [T, H, D]`, RoPE applied."""


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """`x [T, heads, D]`, `cos`/`sin [T, D]`."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype, device: torch.device | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size, dtype=dtype, device=device))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        y = x.to(_compute_dtype(x.dtype))
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


def _linear(n_in: int, n_out: int, dtype: torch.dtype, device: torch.device | None, bias: bool = False) -> nn.Linear:
    return skip_init(nn.Linear, n_in, n_out, bias=bias, dtype=dtype, device=device)


def _out_linear(n_in: int, n_out: int, dtype: torch.dtype, device: torch.device | None, bias: bool,
                tp: TPShard | None) -> nn.Module:
    """o_proj / down_proj: row-parallel (all-reduced) under tensor parallelism."""
    if tp is None:
        return _linear(n_in, n_out, dtype, device, bias)
    return RowParallelLinear(n_in, n_out, bias, tp.group, dtype, device)


class LlamaAttention(nn.Module):
    def __init__(self, c: ModelConfig, dtype: torch.dtype, device: torch.device | None,
                 tp: TPShard | None = None) -> None:
        super().__init__()
        self.heads = c.num_attention_heads if tp is None else tp.heads
        self.kv_heads = c.num_key_value_heads if tp is None else tp.kv_heads
        self.head_dim = c.head_dim
        self.q_proj = _linear(c.hidden_size, self.heads * c.head_dim, dtype, device, c.qkv_bias)
        self.k_proj = _linear(c.hidden_size, self.kv_heads * c.head_dim, dtype, device, c.qkv_bias)
        self.v_proj = _linear(c.hidden_size, self.kv_heads * c.head_dim, dtype, device, c.qkv_bias)
        self.o_proj = _out_linear(self.heads * c.head_dim, c.hidden_size, dtype, device, c.o_bias, tp)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dtype, device)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dtype, device)
        else:
            self.q_norm = self.k_norm = nn.Identity()

    def forward(self, layer: int, x: Tensor, cos: Tensor, sin: Tensor, attention: AttentionFn) -> Tensor:
        t = x.shape[0]
        q = apply_rope(self.q_norm(self.q_proj(x).view(t, self.heads, self.head_dim)), cos, sin)
        k = apply_rope(self.k_norm(self.k_proj(x).view(t, self.kv_heads, self.head_dim)), cos, sin)
        v = self.v_proj(x).view(t, self.kv_heads, self.head_dim)
        out = attention(layer, q, k, v)
        return self.o_proj(out.reshape(t, self.heads * self.head_dim))


class LlamaMLP(nn.Module):
    def __init__(self, c: ModelConfig, dtype: torch.dtype, device: torch.device | None,
                 tp: TPShard | None = None) -> None:
        super().__init__()
        inter = c.intermediate_size if tp is None else tp.inter_end - tp.inter_start
        self.gate_proj = _linear(c.hidden_size, inter, dtype, device)
        self.up_proj = _linear(c.hidden_size, inter, dtype, device)
        self.down_proj = _out_linear(inter, c.hidden_size, dtype, device, False, tp)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, c: ModelConfig, dtype: torch.dtype, device: torch.device | None,
                 tp: TPShard | None = None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype, device)
        self.self_attn = LlamaAttention(c, dtype, device, tp)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype, device)
        self.mlp = LlamaMLP(c, dtype, device, tp)

    def forward(self, layer: int, h: Tensor, cos: Tensor, sin: Tensor, attention: AttentionFn) -> Tensor:
        h = h + self.self_attn(layer, self.input_layernorm(h), cos, sin, attention)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, c: ModelConfig, dtype: torch.dtype, device: torch.device | None,
                 tp: TPShard | None = None) -> None:
        super().__init__()
        self.embed_tokens = skip_init(nn.Embedding, c.vocab_size, c.hidden_size, dtype=dtype, device=device) \
            if tp is None else VocabParallelEmbedding(tp, c.hidden_size, dtype, device)
        self.layers = nn.ModuleList(LlamaDecoderLayer(c, dtype, device, tp) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype, device)


class LlamaForCausalLM(nn.Module):
    """Parameters are allocated uninitialised; `esp.engine.loader.load_model` fills them.
    `tp`: the part of the model one tensor-parallel rank holds (None: all of it)."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, tp: TPShard | None = None) -> None:
        super().__init__()
        device = torch.device(device if device is not None else "cpu")
        self.config = config
        self.tp = tp
        self.model = LlamaModel(config, dtype, device, tp)
        vocab = config.vocab_size if tp is None else tp.vocab_rows
        self.lm_head = None if config.tie_word_embeddings else _linear(config.hidden_size, vocab, dtype, device)
        self.register_buffer("inv_freq", rope_inv_freq(config).to(device), persistent=False)
        self.attention_factor = rope_attention_factor(config)
        self.dynamic = config.rope_scaling is not None and config.rope_scaling.rope_type == "dynamic"

    def rope(self, positions: Tensor, dtype: torch.dtype, seq_lens: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """`cos`, `sin [T, head_dim]` in `dtype` for global `positions [T]`.

        `seq_lens [T]` (int64) matters to dynamic RoPE only: the sequence length each token's
        frequencies are computed for, `max(prompt length, position + 1)` of its request (the
        rule in `esp.engine.rope`). None means `positions + 1`, exact for generated tokens and
        for prompts within `max_position_embeddings`."""
        cdtype = _compute_dtype(dtype)
        inv_freq = self.inv_freq
        if self.dynamic:
            seq_lens = positions + 1 if seq_lens is None else seq_lens
            scaled = seq_lens > self.config.max_position_embeddings
            if bool(scaled.any()):
                lens, index = torch.unique(seq_lens[scaled], return_inverse=True)
                inv_freq = inv_freq.expand(len(positions), -1).clone()
                inv_freq[scaled] = dynamic_inv_freq(self.config, lens).to(inv_freq.device)[index]
        freqs = positions.to(cdtype)[:, None] * inv_freq.to(cdtype)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos.to(dtype), sin.to(dtype)

    def forward(self, input_ids: Tensor, positions: Tensor, attention: AttentionFn,
                seq_lens: Tensor | None = None) -> Tensor:
        """`input_ids`, `positions [T]` (int64) -> final-normed hidden states `[T, hidden]`.
        `seq_lens [T]`: see `rope` (dynamic RoPE only).
        `attention` is called exactly once per layer, in layer order, even when T == 0."""
        h = self.model.embed_tokens(input_ids)
        cos, sin = self.rope(positions, h.dtype, seq_lens)
        for i, layer in enumerate(self.model.layers):
            h = layer(i, h, cos, sin, attention)
        return self.model.norm(h)

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """`hidden [N, hidden]` -> logits `[N, vocab]` in float32 (float64 for float64 models);
        under tensor parallelism every rank calls it and gets the same all-gathered logits."""
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(hidden, weight)
        if self.tp is not None:
            logits = gather_logits(logits, self.tp)
        return logits.to(_compute_dtype(weight.dtype))
