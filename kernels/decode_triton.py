"""Triton `decode_partial_attention`, flash-decoding style.

Stage 1, grid (B, KVH, splits): each program takes one request, one kv head with its
GROUP query heads (padded to a `tl.dot` tile), and one contiguous share of the request's
slot range; it gathers K/V rows by slot and writes a partial (out, lse) in the accumulator
dtype. Stage 2, grid (B*H,): combines the splits with the log-sum-exp math of
`merge_attn_states`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from esp.kernels.triton_util import (acc_dtype, block_d, check_launchable, finish_softmax,
                                     online_softmax_step, row_bytes)

MAX_SPLITS = 64


@triton.jit
def _decode_split_kernel(q, k_cache, v_cache, slots, cu, part_out, part_lse, scale, H, KVH, D,
                         split_len, num_splits, GROUP: tl.constexpr, ACC: tl.constexpr,
                         BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    req = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    start = tl.load(cu + req).to(tl.int32)
    end = tl.load(cu + req + 1).to(tl.int32)
    lo = start + split * split_len
    hi = tl.minimum(lo + split_len, end)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    g_ok = g < GROUP
    d_ok = d < D
    heads = (kv_head * GROUP + g).to(tl.int64)
    qb = tl.load(q + (req.to(tl.int64) * H + heads[:, None]) * D + d[None, :],
                 mask=g_ok[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_G], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_G], ACC)
    acc = tl.zeros([BLOCK_G, BLOCK_D], ACC)
    for n0 in range(lo, hi, BLOCK_N):
        idx = n0 + tl.arange(0, BLOCK_N)
        col_ok = idx < hi
        rows = tl.load(slots + idx, mask=col_ok, other=0).to(tl.int64)
        kv_offs = (rows[:, None] * KVH + kv_head) * D + d[None, :]
        kv_mask = col_ok[:, None] & d_ok[None, :]
        kb = tl.load(k_cache + kv_offs, mask=kv_mask, other=0.0)
        vb = tl.load(v_cache + kv_offs, mask=kv_mask, other=0.0)
        s = tl.dot(qb, tl.trans(kb), input_precision="ieee").to(ACC) * scale
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_i, l_i, acc = online_softmax_step(m_i, l_i, acc, s, vb, ACC)

    o, row_lse = finish_softmax(m_i, l_i, acc)
    part = (req.to(tl.int64) * H + heads) * num_splits + split
    tl.store(part_out + part[:, None] * D + d[None, :], o, mask=g_ok[:, None] & d_ok[None, :])
    tl.store(part_lse + part, row_lse, mask=g_ok)


@triton.jit
def _decode_reduce_kernel(part_out, part_lse, out, lse, D, num_splits,
                          BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_ok = s < num_splits
    d_ok = d < D
    ls = tl.load(part_lse + row * num_splits + s, mask=s_ok, other=float("-inf"))
    m = tl.max(ls, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(ls - m)
    total = tl.sum(w, axis=0)
    inv = tl.where(total > 0, 1.0 / tl.where(total > 0, total, 1.0), 0.0)
    po = tl.load(part_out + (row * num_splits + s[:, None]) * D + d[None, :],
                 mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    o = tl.sum(po * (w * inv)[:, None], axis=0)
    tl.store(out + row * D + d, o.to(out.dtype.element_ty), mask=d_ok)
    merged = tl.where(total > 0, m + tl.log(tl.where(total > 0, total, 1.0)), float("-inf"))
    tl.store(lse + row, merged.to(lse.dtype.element_ty))


def default_block_n(dtype: torch.dtype, d: int) -> int:
    """KV tile length keeping shared memory under about 50 KiB (fp16 D=128: 64)."""
    width = row_bytes(dtype, d)
    return 64 if width <= 256 else 32 if width <= 512 else 16


def _splits(max_len: int, batch: int, kvh: int, block_n: int, device: torch.device) -> int:
    """Enough splits to give the GPU about two programs per SM, each at least one tile long."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    want = max(1, min(MAX_SPLITS, triton.cdiv(2 * sms, max(1, batch * kvh))))
    return max(1, min(want, triton.cdiv(max_len, block_n)))


def decode_partial_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                    slots: torch.Tensor, cu_slots: torch.Tensor,
                                    softmax_scale: float | None = None, *,
                                    max_len: int | None = None, num_splits: int | None = None,
                                    block_n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton `decode_partial_attention` on checked inputs (see `esp.kernels.decode`).

    `max_len` (the longest slot range) is read from `cu_slots` when not given; `num_splits`
    and `block_n` (a power of two, >= 16) override the split count and the KV tile.
    """
    check_launchable(_decode_split_kernel, q, k_cache, v_cache, slots, cu_slots)
    b, h, d = q.shape
    kvh = k_cache.shape[1]
    group = h // kvh
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.empty_like(q)
    lse = torch.empty((b, h), dtype=acc, device=q.device)
    if b == 0:
        return out, lse
    if max_len is None:
        max_len = int((cu_slots[1:] - cu_slots[:-1]).max())
    bn = block_n or default_block_n(q.dtype, d)
    splits = num_splits or _splits(max_len, b, kvh, bn, q.device)
    split_len = triton.cdiv(triton.cdiv(max(max_len, 1), splits), bn) * bn
    part_out = torch.empty((b, h, splits, d), dtype=acc, device=q.device)
    part_lse = torch.empty((b, h, splits), dtype=acc, device=q.device)
    bd = block_d(d)
    _decode_split_kernel[(b, kvh, splits)](
        q, k_cache, v_cache, slots, cu_slots, part_out, part_lse, scale, h, kvh, d, split_len,
        splits, GROUP=group, ACC=acc_dtype(q.dtype), BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_N=bn, BLOCK_D=bd)
    _decode_reduce_kernel[(b * h,)](part_out, part_lse, out, lse, d, splits,
                                    BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=bd)
    return out, lse
