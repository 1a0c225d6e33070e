"""Which implementation the public kernels run: the torch reference, the fused CPU path, or
Triton. This module is the one place where that choice is made.

Resolution order, first match wins: the call's `backend=` argument, `set_kernel_backend()`,
the `ESP_KERNELS` environment variable, then the default (`"auto"`):

- CPU tensors: `"cpu"`, the production CPU path (torch's fused flash-attention CPU kernel for
  prefill, contiguous-run views of the pool for decode; `esp.kernels.*_cpu`), in every dtype,
  float64 included, so the float64 equivalence tests run on it.
- CUDA tensors in float16, bfloat16 or float32: `"triton"`.
- anything else (CUDA float64, the dtype of the ground truth): `"torch"`.

`"torch"` is the reference, the oracle every other path is tested against; it runs on any
device and dtype. `"cpu"` refuses non-CPU tensors and `"triton"` refuses CPU tensors unless
TRITON_INTERPRET=1. Kernels with no dedicated CPU version (`merge_attn_states`, `store_kv`)
run their reference under `"cpu"`.
"""
from __future__ import annotations

import os

import torch

BACKENDS = ("torch", "cpu", "triton", "auto")
ENV_VAR = "ESP_KERNELS"
AUTO_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_override: str | None = None


def _checked(name: str, source: str) -> str:
    value = name.strip().lower()
    if value not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r} from {source}; choose one of {BACKENDS}")
    return value


def set_kernel_backend(name: str | None) -> None:
    """Set the process-wide backend (`"torch"`, `"cpu"`, `"triton"`, `"auto"`), or clear it with None."""
    global _override
    _override = None if name is None else _checked(name, "set_kernel_backend()")


def get_kernel_backend() -> str:
    """The backend asked for by `set_kernel_backend()` or `ESP_KERNELS`, else `"auto"`."""
    if _override is not None:
        return _override
    env = os.environ.get(ENV_VAR)
    return _checked(env, f"${ENV_VAR}") if env else "auto"


def resolve_backend(backend: str | None, like: torch.Tensor) -> str:
    """The concrete backend (`"torch"`, `"cpu"` or `"triton"`) for a call whose main input is `like`."""
    name = _checked(backend, "backend=") if backend is not None else get_kernel_backend()
    if name == "cpu" and like.device.type != "cpu":
        raise ValueError(f"the cpu kernel backend runs on CPU tensors, got a tensor on {like.device}")
    if name != "auto":
        return name
    if like.device.type == "cpu":
        return "cpu"
    return "triton" if like.is_cuda and like.dtype in AUTO_TRITON_DTYPES else "torch"
