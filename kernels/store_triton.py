"""Triton `store_kv`: grid (T, row chunks); each program copies one chunk of one K and V row."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from esp.kernels.triton_util import check_launchable

MAX_BLOCK = 1024


@triton.jit
def _store_kernel(k_cache, v_cache, slots, k, v, W, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = c < W
    slot = tl.load(slots + t).to(tl.int64)
    tl.store(k_cache + slot * W + c, tl.load(k + t * W + c, mask=ok), mask=ok)
    tl.store(v_cache + slot * W + c, tl.load(v + t * W + c, mask=ok), mask=ok)


def store_kv_triton(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                    k: torch.Tensor, v: torch.Tensor) -> None:
    """Triton `store_kv` on checked inputs (see `esp.kernels.store`)."""
    check_launchable(_store_kernel, k_cache, v_cache, slots, k, v)
    t = k.shape[0]
    width = k.shape[1] * k.shape[2]
    if t == 0 or width == 0:
        return
    block = min(MAX_BLOCK, triton.next_power_of_2(width))
    _store_kernel[(t, triton.cdiv(width, block))](k_cache, v_cache, slots, k, v, width, BLOCK=block)
