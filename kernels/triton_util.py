"""Glue shared by the Triton kernels: launch checks, tile sizes, the streaming softmax.

Triton fixes interpreter mode when it is imported (`TRITON_INTERPRET=1` must be set
before the first `import triton` in the process): kernels and Triton's own library
functions are then interpreted on the host instead of compiled for the GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def interpreted(kernel) -> bool:
    """Whether `kernel` (a `@triton.jit` function) runs under the Triton interpreter."""
    return not isinstance(kernel, triton.runtime.JITFunction)


def check_launchable(kernel, *xs: torch.Tensor) -> None:
    """A compiled kernel needs CUDA tensors; an interpreted one runs on any device."""
    if interpreted(kernel):
        return
    for x in xs:
        if not x.is_cuda:
            raise ValueError(f"the triton backend needs CUDA tensors (got {x.device}); use "
                             "backend='torch', or TRITON_INTERPRET=1 set before triton is imported")


def acc_dtype(dtype: torch.dtype):
    """Triton accumulator type: float64 for float64 inputs, float32 otherwise."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def block_d(d: int) -> int:
    """Head-dim block: a power of two, at least 16 so it can be a `tl.dot` operand."""
    return max(16, triton.next_power_of_2(d))


def row_bytes(dtype: torch.dtype, d: int) -> int:
    """Bytes of one head-dim row as tiled, which bounds how large the K/V tiles can be."""
    return torch.empty((), dtype=dtype).element_size() * block_d(d)


@triton.jit
def online_softmax_step(m_i, l_i, acc, s, vb, ACC: tl.constexpr):
    """Fold one key block into a streaming softmax: scores `s [M, N]` (hidden keys at -inf),
    values `vb [N, D]`; returns the new running max, sum and weighted values."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - shift)
    p = tl.exp(s - shift[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision="ieee").to(ACC)
    return m_new, l_i, acc


@triton.jit
def finish_softmax(m_i, l_i, acc):
    """`(out, lse)` of a streaming softmax; rows that saw no key give out 0 and lse -inf."""
    has_key = l_i > 0
    o = acc / tl.where(has_key, l_i, 1.0)[:, None]
    row_lse = tl.where(has_key, m_i + tl.log(tl.where(has_key, l_i, 1.0)), float("-inf"))
    return o, row_lse
