"""Log-sum-exp merge of two partial attention results over disjoint key sets.

`merge_attn_states(out_a [T,H,D], lse_a [T,H], out_b [T,H,D], lse_b [T,H]) -> (out, lse)`
returns the attention over the union of both key sets. A side with lse = -inf (no key)
contributes nothing; when both are -inf the result is out = 0, lse = -inf, never NaN.
"""
from __future__ import annotations

import torch

from esp.kernels import checks
from esp.kernels.backend import resolve_backend


def merge_attn_states(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                      lse_b: torch.Tensor, *, backend: str | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two `(out [T,H,D], lse [T,H])` partials; out keeps its dtype, lse its dtype."""
    checks.tensor("out_a", out_a, 3, checks.FLOAT_DTYPES)
    dev = out_a.device
    checks.tensor("out_b", out_b, 3, checks.FLOAT_DTYPES, dev)
    checks.tensor("lse_a", lse_a, 2, (torch.float32, torch.float64), dev)
    checks.tensor("lse_b", lse_b, 2, (torch.float32, torch.float64), dev)
    checks.same_dtype("out_a and out_b", out_a, out_b)
    checks.same_dtype("lse_a and lse_b", lse_a, lse_b)
    if out_b.shape != out_a.shape:
        raise ValueError(f"out_b shape {tuple(out_b.shape)} differs from out_a {tuple(out_a.shape)}")
    for name, lse in (("lse_a", lse_a), ("lse_b", lse_b)):
        if lse.shape != out_a.shape[:2]:
            raise ValueError(f"{name} shape {tuple(lse.shape)} must be [T,H] = {tuple(out_a.shape[:2])}")
    if resolve_backend(backend, out_a) == "triton":
        from esp.kernels.merge_triton import merge_attn_states_triton
        return merge_attn_states_triton(out_a, lse_a, out_b, lse_b)
    return merge_attn_states_ref(out_a, lse_a, out_b, lse_b)


def merge_attn_states_ref(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                          lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of `merge_attn_states`, computed in float32 (float64 for float64 lse)."""
    acc = torch.promote_types(lse_a.dtype, torch.float32)
    la, lb = lse_a.to(acc), lse_b.to(acc)
    m = torch.maximum(la, lb)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    wa, wb = torch.exp(la - m), torch.exp(lb - m)
    total = wa + wb
    inv = torch.where(total > 0, 1.0 / total, torch.zeros_like(total))
    out = out_a.to(acc) * (wa * inv).unsqueeze(-1) + out_b.to(acc) * (wb * inv).unsqueeze(-1)
    return out.to(out_a.dtype), (m + torch.log(total)).to(lse_a.dtype)
