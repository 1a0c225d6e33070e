"""Tensor parallelism inside an instance (`--tp N`, LoongServe section 2.1; DESIGN 3).

With `tp > 1` an instance is N worker processes, one per device, that hold one replica sharded
Megatron-style: q/k/v and gate/up are column-parallel (each rank computes its own heads and its
own slice of the MLP), o and down are row-parallel (partial sums, then one all-reduce on the
instance's subgroup per block), the embedding and the LM head are vocabulary-parallel (the
masked lookup is all-reduced; the logits are all-gathered, so every rank holds the same full
logits and samples the same token with the same per-token seed: no broadcast of sampled tokens).

Heads: each rank gets `num_attention_heads / N` query heads and `num_key_value_heads / N` KV
heads; with fewer KV heads than ranks (N a multiple of them) each rank holds the one KV head
its query heads read, replicated on `N / num_key_value_heads` ranks. The vocabulary is split in
rows of `ceil(vocab / N)` (the last shard padded with zero rows, sliced off the logits); the
MLP's intermediate size in near-equal parts. Biases follow their weight's rows (o's bias is
added once, after the all-reduce); per-head q/k norms and the RMSNorms are replicated.

`TPShard` is what one rank holds; `checkpoint_slice` maps a checkpoint tensor to the part of it
that rank loads. Nothing here runs when `tp == 1`: the model keeps its plain layers.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from esp.engine.model_config import ModelConfig


class TensorParallelError(ValueError):
    """The model cannot be split over this many ranks."""


def check_tp(config: ModelConfig, size: int) -> None:
    """Raise `TensorParallelError` when `config`'s heads cannot be split over `size` ranks."""
    if size < 1:
        raise TensorParallelError(f"tp must be at least 1, got {size}")
    h, kvh = config.num_attention_heads, config.num_key_value_heads
    if h % size:
        raise TensorParallelError(f"--tp {size} must divide the model's {h} attention heads")
    if kvh % size and size % kvh:
        raise TensorParallelError(f"--tp {size} must divide the model's {kvh} KV heads or be a multiple of them")
    if config.intermediate_size < size or config.vocab_size < size:
        raise TensorParallelError(f"--tp {size} exceeds the model's intermediate size or vocabulary")


def local_kv_heads(config: ModelConfig, size: int) -> int:
    """KV heads in one rank's pool (1, replicated, when there are fewer KV heads than ranks)."""
    return max(1, config.num_key_value_heads // size)


@dataclass(frozen=True)
class TPShard:
    """What rank `rank` of an instance's `size` tensor-parallel ranks holds; `group` is the
    instance's torch.distributed subgroup (only inside a worker)."""

    size: int
    rank: int
    heads: int
    head_start: int
    kv_heads: int
    kv_head_start: int
    inter_start: int
    inter_end: int
    vocab_start: int
    vocab_rows: int
    vocab_size: int
    group: Any = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, config: ModelConfig, size: int, rank: int, group: Any = None) -> TPShard:
        check_tp(config, size)
        heads = config.num_attention_heads // size
        kv_heads = local_kv_heads(config, size)
        kv_start = rank * config.num_key_value_heads // size  # floor: the replicated head when kvh < size
        inter = config.intermediate_size
        rows = -(-config.vocab_size // size)
        return cls(size, rank, heads, rank * heads, kv_heads, kv_start, inter * rank // size,
                   inter * (rank + 1) // size, rank * rows, rows, config.vocab_size, group)

    @property
    def vocab_end(self) -> int:
        """End of the real rows (the padded rows beyond it are zero)."""
        return max(self.vocab_start, min(self.vocab_size, self.vocab_start + self.vocab_rows))


_COLUMN = re.compile(r"\.(q_proj|k_proj|v_proj|gate_proj|up_proj)\.(weight|bias)$")
_ROW = re.compile(r"\.(o_proj|down_proj)\.weight$")
_VOCAB = ("model.embed_tokens.weight", "lm_head.weight")


def checkpoint_slice(shard: TPShard, name: str, head_dim: int) -> tuple[int, int, int] | None:
    """`(dim, start, stop)` of checkpoint tensor `name` that `shard` loads; None: all of it."""
    if name in _VOCAB:
        return 0, shard.vocab_start, shard.vocab_end
    m = _COLUMN.search(name)
    if m:
        kind = m.group(1)
        if kind == "q_proj":
            return 0, shard.head_start * head_dim, (shard.head_start + shard.heads) * head_dim
        if kind in ("k_proj", "v_proj"):
            return 0, shard.kv_head_start * head_dim, (shard.kv_head_start + shard.kv_heads) * head_dim
        return 0, shard.inter_start, shard.inter_end
    m = _ROW.search(name)
    if m:
        if m.group(1) == "o_proj":
            return 1, shard.head_start * head_dim, (shard.head_start + shard.heads) * head_dim
        return 1, shard.inter_start, shard.inter_end
    return None


def all_reduce(x: Tensor, group: Any) -> Tensor:
    """Sum `x` in place over `group` (every rank of an instance has the same token count, so
    all of them skip an empty tensor together)."""
    if x.numel():
        dist.all_reduce(x, group=group)
    return x


class RowParallelLinear(nn.Module):
    """`y = sum over ranks of x_r @ W_r^T`, then the bias once: o_proj and down_proj."""

    def __init__(self, n_in: int, n_out: int, bias: bool, group: Any, dtype: torch.dtype,
                 device: torch.device | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_out, n_in, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(n_out, dtype=dtype, device=device)) if bias else None
        self.group = group

    def forward(self, x: Tensor) -> Tensor:
        y = all_reduce(F.linear(x, self.weight), self.group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Rows `[start, start + rows)` of the embedding; other ids embed as zero, then all-reduce."""

    def __init__(self, shard: TPShard, hidden: int, dtype: torch.dtype, device: torch.device | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(shard.vocab_rows, hidden, dtype=dtype, device=device))
        self.start, self.rows, self.group = shard.vocab_start, shard.vocab_rows, shard.group

    def forward(self, ids: Tensor) -> Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.rows)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return all_reduce(out.masked_fill_(outside[:, None], 0), self.group)


def gather_logits(local: Tensor, shard: TPShard) -> Tensor:
    """`[N, vocab_rows]` of every rank -> the same `[N, vocab]` on every rank."""
    if not local.numel():
        return local.new_empty((local.shape[0], shard.vocab_size))
    parts = [torch.empty_like(local) for _ in range(shard.size)]
    dist.all_gather(parts, local.contiguous(), group=shard.group)
    return torch.cat(parts, dim=-1)[:, : shard.vocab_size]


def new_instance_groups(instances: int, size: int, rank: int) -> Any:
    """Create one subgroup per instance (every process creates all of them, in the same order,
    as torch.distributed requires) and return the one of process `rank`."""
    mine = None
    for i in range(instances):
        group = dist.new_group(list(range(i * size, (i + 1) * size)))
        if i == rank // size:
            mine = group
    return mine
