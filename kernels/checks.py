"""Input checks shared by the kernel wrappers; every failure is a ValueError naming the argument."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def tensor(name: str, x: object, ndim: int, dtypes: tuple[torch.dtype, ...],
           device: torch.device | None = None) -> torch.Tensor:
    """`x` is a contiguous tensor with `ndim` dimensions, one of `dtypes`, on `device` if given."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if x.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name} must have dtype in ({names}), got {x.dtype}")
    if device is not None and x.device != device:
        raise ValueError(f"{name} is on {x.device}, expected {device} like the other inputs")
    if not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first)")
    return x


def same_dtype(names: str, *xs: torch.Tensor) -> None:
    dtypes = {x.dtype for x in xs}
    if len(dtypes) != 1:
        raise ValueError(f"{names} must share one dtype, got {sorted(map(str, dtypes))}")


def dim(name: str, x: torch.Tensor, axis: int, size: int, what: str) -> None:
    if x.shape[axis] != size:
        raise ValueError(f"{name}.shape[{axis}] is {x.shape[axis]}, expected {size} ({what})")


def lse_dtype(q_dtype: torch.dtype) -> torch.dtype:
    """lse is float32, or float64 when the attention inputs are float64."""
    return torch.float64 if q_dtype == torch.float64 else torch.float32


def heads(h: int, kvh: int) -> None:
    if kvh == 0 or h % kvh != 0:
        raise ValueError(f"query heads ({h}) must be a multiple of kv heads ({kvh})")


def offsets(name: str, cu: torch.Tensor, total: int, what: str) -> list[int]:
    """`cu` is [B+1] non-decreasing offsets from 0 to `total`; returns them on the host."""
    values = cu.tolist()
    if not values:
        raise ValueError(f"{name} must hold at least one offset (shape [B+1])")
    if values[0] != 0 or values[-1] != total:
        raise ValueError(f"{name} must run from 0 to {total} ({what}), got {values[0]}..{values[-1]}")
    if any(b < a for a, b in zip(values, values[1:])):
        raise ValueError(f"{name} must be non-decreasing")
    return values


def max_len(values: list[int]) -> int:
    return max((b - a for a, b in zip(values, values[1:])), default=0)


def scale(softmax_scale: float | None, d: int) -> float:
    """The softmax scale to use: D**-0.5 unless a finite positive number is given."""
    if softmax_scale is None:
        return d ** -0.5
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise ValueError(f"softmax_scale must be a float, got {type(softmax_scale).__name__}")
    if not (0 < softmax_scale < float("inf")):
        raise ValueError(f"softmax_scale must be finite and positive, got {softmax_scale}")
    return float(softmax_scale)
