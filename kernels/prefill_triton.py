"""Triton `striped_attention_step`: varlen flash attention with a position mask.

Grid (query blocks of the longest sequence, B, H). Each program streams the key blocks of
its sequence with an online softmax, and skips a key block without loading K/V when its
smallest position is above the block's largest query position (exact for any ordering,
effective when positions ascend, as stripes do).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from esp.kernels.triton_util import (acc_dtype, block_d, check_launchable, finish_softmax,
                                     online_softmax_step, row_bytes)

FAR = tl.constexpr(2 ** 62)


@triton.jit
def _striped_kernel(q, k, v, q_pos, k_pos, cu_q, cu_k, out, lse, scale, H, KVH, D,
                    GROUP: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    m_block = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    kv_head = head // GROUP
    q_start = tl.load(cu_q + seq).to(tl.int32) + m_block * BLOCK_M
    q_end = tl.load(cu_q + seq + 1).to(tl.int32)
    k_start = tl.load(cu_k + seq).to(tl.int32)
    k_end = tl.load(cu_k + seq + 1).to(tl.int32)
    k_stop = tl.where(q_start < q_end, k_end, k_start)

    rows = q_start + tl.arange(0, BLOCK_M)
    row_ok = rows < q_end
    rows = rows.to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    qb = tl.load(q + (rows[:, None] * H + head) * D + d[None, :],
                 mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    qp = tl.load(q_pos + rows, mask=row_ok, other=0).to(tl.int64)
    q_last = tl.max(tl.where(row_ok, qp, -FAR), axis=0)

    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    for n0 in range(k_start, k_stop, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < k_end
        cols = cols.to(tl.int64)
        kp = tl.load(k_pos + cols, mask=col_ok, other=0).to(tl.int64)
        if tl.min(tl.where(col_ok, kp, FAR), axis=0) <= q_last:
            kv_offs = (cols[:, None] * KVH + kv_head) * D + d[None, :]
            kv_mask = col_ok[:, None] & d_ok[None, :]
            kb = tl.load(k + kv_offs, mask=kv_mask, other=0.0)
            vb = tl.load(v + kv_offs, mask=kv_mask, other=0.0)
            s = tl.dot(qb, tl.trans(kb), input_precision="ieee").to(ACC) * scale
            seen = (kp[None, :] <= qp[:, None]) & col_ok[None, :] & row_ok[:, None]
            s = tl.where(seen, s, float("-inf"))
            m_i, l_i, acc = online_softmax_step(m_i, l_i, acc, s, vb, ACC)

    o, row_lse = finish_softmax(m_i, l_i, acc)
    tl.store(out + (rows[:, None] * H + head) * D + d[None, :], o.to(out.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(lse + rows * H + head, row_lse.to(lse.dtype.element_ty), mask=row_ok)


def default_blocks(dtype: torch.dtype, d: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) keeping shared memory near or under 64 KiB (fp16 D=128: 64x64)."""
    width = row_bytes(dtype, d)
    if width <= 256:
        return 64, 64
    if width <= 512:
        return 64, 32
    return (32, 16) if width <= 1024 else (16, 16)


def striped_attention_step_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  q_pos: torch.Tensor, k_pos: torch.Tensor, cu_q: torch.Tensor,
                                  cu_k: torch.Tensor, softmax_scale: float | None = None, *,
                                  max_seqlen_q: int | None = None, block_m: int | None = None,
                                  block_n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton `striped_attention_step` on checked inputs (see `esp.kernels.prefill`).

    `max_seqlen_q` (the longest query range) sizes the grid; it is read from `cu_q` when not
    given. `block_m`/`block_n` (powers of two, >= 16) override the tile sizes.
    """
    check_launchable(_striped_kernel, q, k, v, q_pos, k_pos, cu_q, cu_k)
    tq, h, d = q.shape
    kvh = k.shape[1]
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.empty_like(q)
    lse = torch.empty((tq, h), dtype=lse_dtype, device=q.device)
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_q[1:] - cu_q[:-1]).max()) if cu_q.numel() > 1 else 0
    batch = cu_q.numel() - 1
    if tq == 0 or batch == 0 or max_seqlen_q == 0:
        return out, lse
    bm, bn = default_blocks(q.dtype, d)
    bm, bn = block_m or bm, block_n or bn
    grid = (triton.cdiv(max_seqlen_q, bm), batch, h)
    _striped_kernel[grid](q, k, v, q_pos, k_pos, cu_q, cu_k, out, lse, scale, h, kvh, d,
                          GROUP=h // kvh, ACC=acc_dtype(q.dtype), BLOCK_M=bm, BLOCK_N=bn,
                          BLOCK_D=block_d(d))
    return out, lse
