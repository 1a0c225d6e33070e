"""Triton `merge_attn_states`: one program per block of (token, head) rows."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from esp.kernels.triton_util import acc_dtype, block_d, check_launchable

BLOCK_ROWS = 16


@triton.jit
def _merge_kernel(out_a, lse_a, out_b, lse_b, out, lse, rows, D,
                  ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    rmask = r < rows
    la = tl.load(lse_a + r, mask=rmask, other=float("-inf")).to(ACC)
    lb = tl.load(lse_b + r, mask=rmask, other=float("-inf")).to(ACC)
    m = tl.maximum(la, lb)
    m = tl.where(m == float("-inf"), 0.0, m)
    wa = tl.exp(la - m)
    wb = tl.exp(lb - m)
    total = wa + wb
    inv = tl.where(total > 0, 1.0 / tl.where(total > 0, total, 1.0), 0.0)
    offs = r.to(tl.int64)[:, None] * D + d[None, :]
    mask = rmask[:, None] & (d < D)[None, :]
    oa = tl.load(out_a + offs, mask=mask, other=0.0).to(ACC)
    ob = tl.load(out_b + offs, mask=mask, other=0.0).to(ACC)
    o = oa * (wa * inv)[:, None] + ob * (wb * inv)[:, None]
    tl.store(out + offs, o.to(out.dtype.element_ty), mask=mask)
    merged = tl.where(total > 0, m + tl.log(tl.where(total > 0, total, 1.0)), float("-inf"))
    tl.store(lse + r, merged.to(lse.dtype.element_ty), mask=rmask)


def merge_attn_states_triton(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                             lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton `merge_attn_states` on checked inputs (see `esp.kernels.merge`)."""
    check_launchable(_merge_kernel, out_a, lse_a, out_b, lse_b)
    t, h, d = out_a.shape
    out, lse = torch.empty_like(out_a), torch.empty_like(lse_a)
    rows = t * h
    if rows:
        grid = (triton.cdiv(rows, BLOCK_ROWS),)
        _merge_kernel[grid](out_a, lse_a, out_b, lse_b, out, lse, rows, d,
                            ACC=acc_dtype(lse_a.dtype), BLOCK_R=BLOCK_ROWS, BLOCK_D=block_d(d))
    return out, lse
