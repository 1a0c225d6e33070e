"""Varlen causal attention on global positions: one ring pass of striped prefill.

`striped_attention_step(q [Tq,H,D], k [Tk,KVH,D], v [Tk,KVH,D], q_pos [Tq], k_pos [Tk],
cu_q [B+1], cu_k [B+1]) -> (out [Tq,H,D], lse [Tq,H])`

Sequence b owns query rows `cu_q[b]:cu_q[b+1]` and key rows `cu_k[b]:cu_k[b+1]`. A key is
visible to a query iff it belongs to the same sequence and `k_pos <= q_pos`; positions may be
strided (r, r+n, r+2n, ...) and need not be sorted. Query head h reads kv head
`h // (H // KVH)`. A query with no visible key gets out = 0 and lse = -inf. out has q's
dtype; lse is float32 (float64 for float64 q); `softmax_scale` defaults to D**-0.5.

`layout=StripeLayout(...)` tells the kernel that each sequence's positions are arithmetic
progressions with one common step (a stripe of a ring pass, or a chunk over a cached prefix);
the CPU backend checks that against `q_pos`/`k_pos` (O(T) on the host) and runs torch's fused
flash-attention kernel (`esp.kernels.prefill_cpu`); without a layout it runs the reference.
The other backends ignore the layout.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from esp.kernels import checks
from esp.kernels.backend import resolve_backend

SCORE_BUDGET = 1 << 24


@dataclass(frozen=True)
class StripeLayout:
    """Positions as arithmetic progressions: in sequence b, query row `a` (counted from
    `cu_q[b]`) has global position `q_first[b] + step * a`, and key row `c` (from `cu_k[b]`)
    has `k_first[b] + step * c`. Then key c is visible to query a iff
    `c <= a + (q_first[b] - k_first[b]) // step`: a causal mask shifted by a whole number
    of rows, which the fused kernels compute without a mask tensor.

    - ring pass of striped prefill on a group of n, queries from stripe r, keys from stripe s:
      `StripeLayout.stripes(n, r, s, batch_size)` (shift 0 when s <= r, else -1);
    - a prompt chunk at positions `start..` over its cached prefix (keys at 0..):
      `StripeLayout(1, starts, (0,) * batch_size)` (shift = start).
    """

    step: int
    q_first: tuple[int, ...]
    k_first: tuple[int, ...]

    @staticmethod
    def stripes(n: int, q_stripe: int, k_stripe: int, batch_size: int) -> "StripeLayout":
        return StripeLayout(n, (q_stripe,) * batch_size, (k_stripe,) * batch_size)

    def shift(self, b: int) -> int:
        """Key row c is visible to query row a of sequence b iff `c <= a + shift(b)`."""
        return (self.q_first[b] - self.k_first[b]) // self.step

    def check(self, q_pos: torch.Tensor, k_pos: torch.Tensor, cq: list[int], ck: list[int]) -> None:
        """ValueError unless the layout has one entry per sequence and reproduces the positions."""
        if isinstance(self.step, bool) or not isinstance(self.step, int) or self.step < 1:
            raise ValueError(f"layout.step must be a positive int, got {self.step!r}")
        for name, first, pos, cu in (("q", self.q_first, q_pos, cq), ("k", self.k_first, k_pos, ck)):
            if len(first) != len(cu) - 1:
                raise ValueError(f"layout.{name}_first has {len(first)} entries for {len(cu) - 1} sequences")
            if not torch.equal(pos, _progressions(first, self.step, cu, pos)):
                raise ValueError(f"{name}_pos are not the arithmetic progressions the layout describes "
                                 f"({name}_first + {self.step} * row)")


def _progressions(first: tuple[int, ...], step: int, cu: list[int], like: torch.Tensor) -> torch.Tensor:
    counts = torch.tensor([b - a for a, b in zip(cu, cu[1:])], dtype=torch.int64)
    base = torch.tensor([f - step * a for f, a in zip(first, cu)], dtype=torch.int64)
    rows = torch.arange(cu[-1], dtype=torch.int64)
    return (base.repeat_interleave(counts, output_size=cu[-1]) + step * rows).to(like)


def striped_attention_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                           k_pos: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                           softmax_scale: float | None = None, *, layout: StripeLayout | None = None,
                           backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Check the inputs, then run the reference, the fused CPU path (needs `layout`) or Triton
    (see `esp.kernels.backend`)."""
    checks.tensor("q", q, 3, checks.FLOAT_DTYPES)
    dev = q.device
    checks.tensor("k", k, 3, checks.FLOAT_DTYPES, dev)
    checks.tensor("v", v, 3, checks.FLOAT_DTYPES, dev)
    checks.same_dtype("q, k and v", q, k, v)
    checks.tensor("q_pos", q_pos, 1, checks.INDEX_DTYPES, dev)
    checks.tensor("k_pos", k_pos, 1, checks.INDEX_DTYPES, dev)
    checks.tensor("cu_q", cu_q, 1, checks.INDEX_DTYPES, dev)
    checks.tensor("cu_k", cu_k, 1, checks.INDEX_DTYPES, dev)
    tq, h, d = q.shape
    tk, kvh, _ = k.shape
    if v.shape != k.shape:
        raise ValueError(f"v shape {tuple(v.shape)} differs from k shape {tuple(k.shape)}")
    checks.dim("k", k, 2, d, "head dim of q")
    checks.heads(h, kvh)
    checks.dim("q_pos", q_pos, 0, tq, "one position per query row")
    checks.dim("k_pos", k_pos, 0, tk, "one position per key row")
    if cu_q.shape != cu_k.shape:
        raise ValueError(f"cu_q {tuple(cu_q.shape)} and cu_k {tuple(cu_k.shape)} must both be [B+1]")
    cq = checks.offsets("cu_q", cu_q, tq, "query rows")
    ck = checks.offsets("cu_k", cu_k, tk, "key rows")
    scale = checks.scale(softmax_scale, d)
    if layout is not None and not isinstance(layout, StripeLayout):
        raise ValueError(f"layout must be a StripeLayout, got {type(layout).__name__}")
    name = resolve_backend(backend, q)
    if name == "cpu" and layout is not None and q.numel() and k.numel():  # the fused op dies on empty inputs
        layout.check(q_pos, k_pos, cq, ck)  # only where it is used: on CUDA it would cost a sync
        from esp.kernels.prefill_cpu import striped_attention_step_cpu
        return striped_attention_step_cpu(q, k, v, cq, ck, layout, scale)
    if name == "triton":
        from esp.kernels.prefill_triton import striped_attention_step_triton
        return striped_attention_step_triton(q, k, v, q_pos, k_pos, cu_q, cu_k, scale,
                                             max_seqlen_q=checks.max_len(cq))
    return striped_attention_step_ref(q, k, v, q_pos, k_pos, cu_q, cu_k, scale)


def striped_attention_step_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               q_pos: torch.Tensor, k_pos: torch.Tensor, cu_q: torch.Tensor,
                               cu_k: torch.Tensor, softmax_scale: float | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference: per sequence, dense masked scores in float32 (float64 for float64 q),
    in query chunks of at most SCORE_BUDGET scores."""
    tq, h, d = q.shape
    group = h // k.shape[1]
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    acc = checks.lse_dtype(q.dtype)
    out = torch.zeros((tq, h, d), dtype=acc, device=q.device)
    lse = torch.full((tq, h), float("-inf"), dtype=acc, device=q.device)
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for qs, qe, ks, ke in zip(cq, cq[1:], ck, ck[1:]):
        if qs == qe or ks == ke:
            continue
        kb = k[ks:ke].to(acc).repeat_interleave(group, dim=1)
        vb = v[ks:ke].to(acc).repeat_interleave(group, dim=1)
        rows = max(1, SCORE_BUDGET // (h * (ke - ks)))
        for a in range(qs, qe, rows):
            b = min(a + rows, qe)
            scores = torch.einsum("qhd,khd->hqk", q[a:b].to(acc), kb) * scale
            visible = k_pos[ks:ke].unsqueeze(0) <= q_pos[a:b].unsqueeze(1)
            scores = scores.masked_fill(~visible, float("-inf"))
            row_lse = torch.logsumexp(scores, dim=-1)
            shift = torch.where(torch.isneginf(row_lse), torch.zeros_like(row_lse), row_lse)
            probs = torch.exp(scores - shift.unsqueeze(-1))
            out[a:b] = torch.einsum("hqk,khd->qhd", probs, vb)
            lse[a:b] = row_lse.transpose(0, 1)
    return out.to(q.dtype), lse
