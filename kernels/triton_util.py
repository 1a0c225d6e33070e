"""Glue shared by the Triton kernels: launch checks and tile sizes.

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
