"""Decode attention of one query token per request over scattered KV pool rows.

`decode_partial_attention(q [B,H,D], k_cache [S,KVH,D], v_cache [S,KVH,D], slots [N],
cu_slots [B+1]) -> (out [B,H,D], lse [B,H])`

Request b attends, without a mask, to the pool rows `slots[cu_slots[b]:cu_slots[b+1]]`
(token-granular, any order, any slot numbers in [0, S)). These may be only the part of
the request's KV held by this instance: partials from several instances combine with
`merge_attn_states`. An empty range gives out = 0, lse = -inf. Query head h reads kv head
`h // (H // KVH)`. out has q's dtype; lse is float32 (float64 for float64 q).

On the CPU backend (`esp.kernels.decode_cpu`) long contiguous runs of slots are attended in
place, as slice views of the pool; `runs=slot_runs(slots, cu_slots)`, computed once per step
by the caller, saves re-splitting the slots at every layer (without it each call splits them).
"""
from __future__ import annotations

import torch

from esp.kernels import checks
from esp.kernels.backend import resolve_backend
from esp.kernels.decode_cpu import SlotRuns, append_slots, decode_partial_attention_cpu, slot_runs

__all__ = ["SlotRuns", "append_slots", "decode_partial_attention", "decode_partial_attention_ref", "slot_runs"]


def decode_partial_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             slots: torch.Tensor, cu_slots: torch.Tensor,
                             softmax_scale: float | None = None, *, runs: SlotRuns | None = None,
                             backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Check the inputs, then run the reference, the CPU path or Triton (see
    `esp.kernels.backend`). `runs` must come from `slot_runs(slots, cu_slots)` on these very
    tensors; the other backends ignore it.

    Slot values are not range-checked (that would cost a device sync per call).
    """
    checks.tensor("q", q, 3, checks.FLOAT_DTYPES)
    dev = q.device
    checks.tensor("k_cache", k_cache, 3, checks.FLOAT_DTYPES, dev)
    checks.tensor("v_cache", v_cache, 3, checks.FLOAT_DTYPES, dev)
    checks.same_dtype("q, k_cache and v_cache", q, k_cache, v_cache)
    checks.tensor("slots", slots, 1, checks.INDEX_DTYPES, dev)
    checks.tensor("cu_slots", cu_slots, 1, checks.INDEX_DTYPES, dev)
    b, h, d = q.shape
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache shape {tuple(v_cache.shape)} differs from k_cache {tuple(k_cache.shape)}")
    checks.dim("k_cache", k_cache, 2, d, "head dim of q")
    checks.heads(h, k_cache.shape[1])
    checks.dim("cu_slots", cu_slots, 0, b + 1, "one range per request, [B+1]")
    cu = checks.offsets("cu_slots", cu_slots, slots.numel(), "entries of slots")
    scale = checks.scale(softmax_scale, d)
    if runs is not None and not (isinstance(runs, SlotRuns) and runs.slots is slots
                                 and runs.cu_slots is cu_slots):
        raise ValueError("runs must be slot_runs(slots, cu_slots) of the slots and cu_slots passed here")
    name = resolve_backend(backend, q)
    if name == "cpu":
        return decode_partial_attention_cpu(q, k_cache, v_cache, slots, cu_slots, scale, runs)
    if name == "triton":
        from esp.kernels.decode_triton import decode_partial_attention_triton
        return decode_partial_attention_triton(q, k_cache, v_cache, slots, cu_slots, scale,
                                               max_len=checks.max_len(cu))
    return decode_partial_attention_ref(q, k_cache, v_cache, slots, cu_slots, scale)


def decode_partial_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 slots: torch.Tensor, cu_slots: torch.Tensor,
                                 softmax_scale: float | None = None
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference: gather every request's rows into a padded `[B, Lmax]` batch and take
    one masked softmax, in float32 (float64 for float64 q)."""
    b, h, d = q.shape
    kvh = k_cache.shape[1]
    group = h // kvh
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    acc = checks.lse_dtype(q.dtype)
    lengths = cu_slots[1:] - cu_slots[:-1]
    width = int(lengths.max()) if b else 0
    if width == 0:
        return (torch.zeros((b, h, d), dtype=q.dtype, device=q.device),
                torch.full((b, h), float("-inf"), dtype=acc, device=q.device))
    offs = torch.arange(width, device=q.device)
    valid = offs.unsqueeze(0) < lengths.unsqueeze(1)
    rows = torch.where(valid, slots[(cu_slots[:-1].unsqueeze(1) + offs).clamp(max=max(slots.numel() - 1, 0))], 0)
    kb = k_cache[rows].to(acc)
    vb = v_cache[rows].to(acc)
    qg = q.to(acc).view(b, kvh, group, d)
    scores = torch.einsum("bkgd,blkd->bkgl", qg, kb) * scale
    scores = scores.masked_fill(~valid.view(b, 1, 1, width), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    shift = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    out = torch.einsum("bkgl,blkd->bkgd", torch.exp(scores - shift.unsqueeze(-1)), vb)
    return out.reshape(b, h, d).to(q.dtype), lse.reshape(b, h)
