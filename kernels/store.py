"""Write new K/V rows into the KV pool.

`store_kv(k_cache [S,KVH,D], v_cache [S,KVH,D], slots [T], k [T,KVH,D], v [T,KVH,D])`
sets `k_cache[slots[t]] = k[t]` and `v_cache[slots[t]] = v[t]` in place. Slots must be
distinct and in [0, S); they are not range-checked (that would cost a device sync).
"""
from __future__ import annotations

import torch

from esp.kernels import checks
from esp.kernels.backend import resolve_backend


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor, *, backend: str | None = None) -> None:
    """Check the inputs, then run the torch or Triton implementation (see `esp.kernels.backend`)."""
    checks.tensor("k_cache", k_cache, 3, checks.FLOAT_DTYPES)
    dev = k_cache.device
    checks.tensor("v_cache", v_cache, 3, checks.FLOAT_DTYPES, dev)
    checks.tensor("slots", slots, 1, checks.INDEX_DTYPES, dev)
    checks.tensor("k", k, 3, checks.FLOAT_DTYPES, dev)
    checks.tensor("v", v, 3, checks.FLOAT_DTYPES, dev)
    checks.same_dtype("k_cache, v_cache, k and v", k_cache, v_cache, k, v)
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache shape {tuple(v_cache.shape)} differs from k_cache {tuple(k_cache.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v shape {tuple(v.shape)} differs from k shape {tuple(k.shape)}")
    if k.shape[1:] != k_cache.shape[1:]:
        raise ValueError(f"k rows {tuple(k.shape[1:])} must match cache rows {tuple(k_cache.shape[1:])}")
    checks.dim("slots", slots, 0, k.shape[0], "one slot per row of k")
    if resolve_backend(backend, k_cache) == "triton":
        from esp.kernels.store_triton import store_kv_triton
        store_kv_triton(k_cache, v_cache, slots, k, v)
    else:
        store_kv_ref(k_cache, v_cache, slots, k, v)


def store_kv_ref(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                 k: torch.Tensor, v: torch.Tensor) -> None:
    """Torch reference: `index_copy_` along the slot dimension."""
    index = slots.to(torch.int64)
    k_cache.index_copy_(0, index, k)
    v_cache.index_copy_(0, index, v)
