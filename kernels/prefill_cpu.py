"""`striped_attention_step` on the CPU with torch's fused flash-attention kernel.

`striped_attention_step_cpu(q [Tq,H,D], k [Tk,KVH,D], v [Tk,KVH,D], cu_q, cu_k (host lists),
layout, scale) -> (out [Tq,H,D], lse [Tq,H])`, the contract of `esp.kernels.prefill` for
positions that `layout` (a checked `StripeLayout`) describes.

`torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q [B,H,L,D], k [B,KVH,Lk,D], v, 0.0,
is_causal, scale=) -> (out [B,H,L,D], lse [B,H,L])` is the kernel behind CPU
`scaled_dot_product_attention`; it reads its inputs through their strides (so `[L,H,D]` rows
go in as transposed views, no copies), takes fewer kv heads than query heads (GQA without
repeating K/V), accepts float64, and returns lse in float32 (float64 for float64 inputs).
Its `is_causal` is top-left aligned: query a sees keys 0..a. It must not be called with zero
queries or zero keys (the process dies of SIGFPE), so empty pieces are skipped here.

Per sequence, with shift `t = layout.shift(b)` (key c visible to query a iff c <= a + t):
- t < 0: queries 0..-t-1 see nothing (out 0, lse -inf); the rest are causal from key 0;
- t = 0: plain causal (the single-instance case, and a stripe against an earlier-or-same stripe);
- t > 0: keys 0..t-1 are visible to every query (one unmasked call), keys t.. are causal (one
  causal call), merged by log-sum-exp: a chunk over a cached prefix of t tokens.
Varlen batches are one call (or two) per sequence on slices: no padding.
"""
from __future__ import annotations

import torch

from esp.kernels import checks
from esp.kernels.merge import merge_attn_states_ref
from esp.kernels.prefill import StripeLayout

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def flash_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One fused call on row-major pieces: q `[L,H,D]`, k/v `[Lk,KVH,D]` (any strides, L, Lk >= 1)
    -> out `[L,H,D]` (a view), lse `[L,H]` (a view); causal is top-left aligned."""
    o, lse = _flash(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
                    v.transpose(0, 1).unsqueeze(0), 0.0, causal, scale=scale)
    return o[0].transpose(0, 1), lse[0].transpose(0, 1)


def shifted_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shift: int, scale: float
                   ) -> tuple[int, torch.Tensor, torch.Tensor] | None:
    """Attention of q `[L,H,D]` over k/v `[Lk,KVH,D]` where key c is visible to query a iff
    `c <= a + shift`. Returns `(first, out, lse)` for the query rows `first..L-1` (the rows
    before `first` see no key), or None when no row sees a key."""
    first = max(0, -shift)
    if first >= len(q) or not len(k):
        return None
    q = q[first:]
    prefix = min(max(shift, 0), len(k))
    parts = []
    if prefix:
        parts.append(flash_rows(q, k[:prefix], v[:prefix], False, scale))
    causal_keys = min(len(k) - prefix, len(q))
    if causal_keys > 0:
        end = prefix + causal_keys
        parts.append(flash_rows(q, k[prefix:end], v[prefix:end], True, scale))
    if len(parts) == 1:
        return (first,) + parts[0]
    (oa, la), (ob, lb) = parts
    return (first,) + merge_attn_states_ref(oa, la, ob, lb)


def striped_attention_step_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: list[int],
                               cu_k: list[int], layout: StripeLayout, scale: float
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence, `shifted_causal` on slices, written into one `(out, lse)` pair."""
    tq, h, d = q.shape
    acc = checks.lse_dtype(q.dtype)
    pieces = []
    for b, (qs, qe, ks, ke) in enumerate(zip(cu_q, cu_q[1:], cu_k, cu_k[1:])):
        if qs < qe and ks < ke:
            got = shifted_causal(q[qs:qe], k[ks:ke], v[ks:ke], layout.shift(b), scale)
            if got is not None:
                pieces.append((qs + got[0], got[1], got[2]))
    if len(pieces) == 1 and pieces[0][0] == 0 and len(pieces[0][1]) == tq:
        _, o, lse = pieces[0]
        return o.contiguous(), lse.to(acc).contiguous()
    out = torch.zeros((tq, h, d), dtype=q.dtype, device=q.device)
    lse = torch.full((tq, h), float("-inf"), dtype=acc, device=q.device)
    for start, o, l in pieces:
        out[start: start + len(o)] = o
        lse[start: start + len(o)] = l
    return out, lse
