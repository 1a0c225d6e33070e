"""Which implementation the public kernels run: plain torch or Triton.

Resolution order, first match wins: the call's `backend=` argument, `set_kernel_backend()`,
the `ESP_KERNELS` environment variable, then the default: Triton for CUDA tensors in
float16, bfloat16 or float32, torch otherwise (CPU tensors, and float64, the dtype of the
ground truth; the Triton kernels take float64 too when asked for explicitly).
Each of these may name `"torch"`, `"triton"` or `"auto"` (the default rule).
"""
from __future__ import annotations

import os

import torch

BACKENDS = ("torch", "triton", "auto")
ENV_VAR = "ESP_KERNELS"
AUTO_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_override: str | None = None


def _checked(name: str, source: str) -> str:
    value = name.strip().lower()
    if value not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r} from {source}; choose one of {BACKENDS}")
    return value


def set_kernel_backend(name: str | None) -> None:
    """Set the process-wide backend (`"torch"`, `"triton"`, `"auto"`), or clear it with None."""
    global _override
    _override = None if name is None else _checked(name, "set_kernel_backend()")


def get_kernel_backend() -> str:
    """The backend asked for by `set_kernel_backend()` or `ESP_KERNELS`, else `"auto"`."""
    if _override is not None:
        return _override
    env = os.environ.get(ENV_VAR)
    return _checked(env, f"${ENV_VAR}") if env else "auto"


def resolve_backend(backend: str | None, like: torch.Tensor) -> str:
    """The concrete backend (`"torch"` or `"triton"`) for a call whose main input is `like`."""
    name = _checked(backend, "backend=") if backend is not None else get_kernel_backend()
    if name != "auto":
        return name
    return "triton" if like.is_cuda and like.dtype in AUTO_TRITON_DTYPES else "torch"
