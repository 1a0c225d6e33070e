"""`decode_partial_attention` on the CPU: contiguous runs of the pool are read in place.

`decode_partial_attention_cpu(q [B,H,D], k_cache [S,KVH,D], v_cache [S,KVH,D], slots [N],
cu_slots (host list), scale, runs) -> (out [B,H,D], lse [B,H])`, the contract of
`esp.kernels.decode`.

The allocator gives a prompt's KV a contiguous run of slots first, so a request's slots are
mostly a few long runs (its prompt, its chunks) plus a short scattered tail (decode tokens
that took the lowest free slots). `slot_runs(slots, cu_slots)` splits them once per step,
on the host, into long runs (`MIN_RUN` slots or more) and the rest; then, per layer:

- each long run is a slice view of the pool, `k_cache[start:start+length]`: no gather. Its
  attention is two matmuls on the un-repeated grouped view (query heads of one kv head as the
  rows of one `[group, D] @ [D, L]` product, so K/V are read once per kv head) and a max /
  exp / sum softmax that also yields the lse;
- the rest of all requests is gathered (`index_select`) into padded batches of similar width
  (padding at most doubles a bucket) and computed the same way under a length mask;
- partials of one request merge by log-sum-exp (one batched merge per round of runs).

Arithmetic is in float32 (float64 for float64 q), like the reference.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from esp.kernels import checks
from esp.kernels.merge import merge_attn_states_ref

MIN_RUN = 32
"""Runs shorter than this are gathered with the scattered rest (one batched call) rather
than attended in place (one call each)."""


@dataclass(frozen=True, eq=False)
class SlotRuns:
    """The slots of one decode call split into long contiguous runs and a scattered rest.

    `runs`: `(request, first slot, length)` for every run of consecutive slot numbers at
    least `MIN_RUN` long (in slot-list order); `rest_slots [R]` the other slots, request by
    request, with `rest_cu` ([B+1] host offsets). `slots` / `cu_slots` are the tensors this was
    computed from: the kernel accepts it only with those very tensors."""

    slots: torch.Tensor
    cu_slots: torch.Tensor
    runs: tuple[tuple[int, int, int], ...]
    rest_slots: torch.Tensor
    rest_cu: tuple[int, ...]


def slot_runs(slots: torch.Tensor, cu_slots: torch.Tensor, min_run: int = MIN_RUN) -> SlotRuns:
    """Split `slots [N]` (requests delimited by `cu_slots [B+1]`) into runs and rest: O(N)
    vectorised host work, meant to be done once per step and passed to every layer's call."""
    s = slots.to(torch.int64)
    cu = cu_slots.to(torch.int64)
    n = s.numel()
    if n == 0:
        return SlotRuns(slots, cu_slots, (), s, tuple(cu.tolist()))
    starts = torch.ones(n, dtype=torch.bool)
    starts[1:] = s[1:] != s[:-1] + 1
    starts[cu[:-1][cu[:-1] < n]] = True
    run_start = starts.nonzero().flatten()
    run_len = torch.diff(run_start, append=torch.tensor([n]))
    long = run_len >= min_run
    in_rest = (~long).repeat_interleave(run_len, output_size=n)
    rest_cu = torch.zeros(n + 1, dtype=torch.int64)
    rest_cu[1:] = torch.cumsum(in_rest, 0)
    first = run_start[long]
    request = torch.searchsorted(cu, first, right=True) - 1
    runs = tuple(zip(request.tolist(), s[first].tolist(), run_len[long].tolist()))
    return SlotRuns(slots, cu_slots, runs, s[in_rest], tuple(rest_cu[cu].tolist()))


def append_slots(runs: SlotRuns, slots: torch.Tensor, cu_slots: torch.Tensor, new: torch.Tensor) -> SlotRuns:
    """`runs` of the previous decode iteration, with one slot more at the end of each of the
    first `len(new)` requests (`new [m]`): the new slots join those requests' rests (where a
    rest is read, it may hold consecutive slots), so nothing is split again. `slots` /
    `cu_slots` are the grown lists the result describes."""
    m = new.numel()
    if not m:
        return SlotRuns(slots, cu_slots, runs.runs, runs.rest_slots, runs.rest_cu)
    rest_cu = runs.rest_cu
    at = torch.tensor(rest_cu[1:m + 1], dtype=torch.int64) + torch.arange(m)
    grown = torch.empty(len(runs.rest_slots) + m, dtype=torch.int64)
    keep = torch.ones(len(grown), dtype=torch.bool)
    keep[at] = False
    grown[keep] = runs.rest_slots.to(torch.int64)
    grown[at] = new.to(torch.int64)
    cu = tuple(c + min(j, m) for j, c in enumerate(rest_cu))
    return SlotRuns(slots, cu_slots, runs.runs, grown, cu)


def _softmax_av(scores: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`scores [..., G, L]` (every row with at least one finite score), `v [..., L, D]` ->
    (out `[..., G, D]`, lse `[..., G]`). Consumes `scores`."""
    m = scores.amax(-1, keepdim=True)
    p = scores.sub_(m).exp_()
    z = p.sum(-1)
    out = torch.matmul(p, v).div_(z.unsqueeze(-1))
    return out, m.squeeze(-1).add_(z.log_())


def _run_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, acc: torch.dtype
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """q `[H,D]` over k/v `[L,KVH,D]` (slice views of the pool) -> out `[H,D]`, lse `[H]`."""
    h, d = q.shape
    kvh = k.shape[1]
    qg = q.to(acc).view(kvh, h // kvh, d) * scale
    scores = torch.matmul(qg, k.to(acc).permute(1, 2, 0))
    out, lse = _softmax_av(scores, v.to(acc).transpose(0, 1))
    return out.view(h, d), lse.view(h)


def _buckets(rows: list[int], counts: list[int]) -> list[list[int]]:
    """Rows in decreasing count order, cut so a bucket's width is < 2x its smallest count."""
    order = sorted(rows, key=lambda r: -counts[r])
    out: list[list[int]] = []
    for r in order:
        if out and counts[r] * 2 > counts[out[-1][0]]:
            out[-1].append(r)
        else:
            out.append([r])
    return out


def _rest_attention(q, k_cache, v_cache, runs: SlotRuns, scale, acc, out, lse) -> None:
    """Gathered, padded attention of every request's rest; writes rows of out/lse."""
    cu = runs.rest_cu
    counts = [b - a for a, b in zip(cu, cu[1:])]
    kvh, d = k_cache.shape[1:]
    h = q.shape[1]
    for bucket in _buckets([r for r, c in enumerate(counts) if c], counts):
        width = counts[bucket[0]]
        rows = torch.tensor(bucket, dtype=torch.int64)
        offs = torch.arange(width)
        first = torch.tensor([cu[r] for r in bucket], dtype=torch.int64)
        n = torch.tensor([counts[r] for r in bucket], dtype=torch.int64)
        valid = offs < n.unsqueeze(1)
        idx = runs.rest_slots[torch.minimum(first.unsqueeze(1) + offs, (first + n - 1).unsqueeze(1))]
        kb = k_cache.index_select(0, idx.flatten()).view(len(bucket), width, kvh, d).to(acc)
        vb = v_cache.index_select(0, idx.flatten()).view(len(bucket), width, kvh, d).to(acc)
        qg = q[rows].to(acc).view(len(bucket), kvh, h // kvh, d) * scale
        scores = torch.matmul(qg, kb.permute(0, 2, 3, 1))
        if not bool(valid.all()):
            scores.masked_fill_(~valid.view(len(bucket), 1, 1, width), float("-inf"))
        o, l = _softmax_av(scores, vb.transpose(1, 2))
        out[rows] = o.reshape(len(bucket), h, d)
        lse[rows] = l.reshape(len(bucket), h)


def decode_partial_attention_cpu(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 slots: torch.Tensor, cu_slots: torch.Tensor, scale: float,
                                 runs: SlotRuns | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Long runs in place, the rest gathered and batched, merged per request."""
    b, h, d = q.shape
    acc = checks.lse_dtype(q.dtype)
    if runs is None:
        runs = slot_runs(slots, cu_slots)
    out = torch.zeros((b, h, d), dtype=acc, device=q.device)
    lse = torch.full((b, h), float("-inf"), dtype=acc, device=q.device)
    if len(runs.rest_slots):
        _rest_attention(q, k_cache, v_cache, runs, scale, acc, out, lse)
    rounds: list[list[tuple[int, torch.Tensor, torch.Tensor]]] = []
    seen: dict[int, int] = {}
    for r, start, length in runs.runs:
        o, l = _run_attention(q[r], k_cache[start: start + length], v_cache[start: start + length], scale, acc)
        k = seen.get(r, 0)
        seen[r] = k + 1
        if k == len(rounds):
            rounds.append([])
        rounds[k].append((r, o, l))
    for parts in rounds:
        rows = torch.tensor([r for r, _, _ in parts], dtype=torch.int64)
        o = torch.stack([o for _, o, _ in parts])
        l = torch.stack([l for _, _, l in parts])
        mo, ml = merge_attn_states_ref(out[rows], lse[rows], o, l)
        out[rows], lse[rows] = mo, ml
    return out.to(q.dtype), lse
