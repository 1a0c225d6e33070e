"""The attention callback of a mixed step on one instance: prefill chunks over cached KV and
decode tokens in one forward pass (chunked prefill, Sarathi / SplitFuse style; DESIGN 6).

Rows are the chunks' tokens first, then one row per decode token. Every row's K/V is stored
before attention, so a chunk row attends, causally by global position, to its request's
whole local slot list (cached prefix plus this chunk), and a decode row to all of its slots.

A chunk at positions `start..` over keys at positions `0..` is a causal mask shifted by
`start` rows (`StripeLayout(1, (start,), (0,))`), which the fused CPU kernel computes as an
unmasked pass over the prefix plus a causal pass over the chunk. Its keys are a slice view
of the pool when the request's slots are one contiguous run (the allocator tries that
first), else gathered once per layer.
"""
from __future__ import annotations

import torch

from esp.engine.kv_pool import KVPool, SlotList
from esp.engine.protocol import MixedBatch
from esp.kernels import StripeLayout, decode_partial_attention, slot_runs, store_kv, striped_attention_step


def _cu(lengths: list[int], device: torch.device) -> torch.Tensor:
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0)
    return cu.to(device)


def _cat(parts: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    return torch.cat(parts).to(device) if parts else torch.empty(0, dtype=torch.int64, device=device)


def _run_start(slots: torch.Tensor) -> int | None:
    """The first slot when `slots` are consecutive numbers (a slice of the pool), else None."""
    if not len(slots):
        return None
    first = int(slots[0])
    return first if torch.equal(slots, torch.arange(first, first + len(slots), device=slots.device)) else None


class _Chunk:
    """One request's chunk: its query rows, its keys (a pool run or a slot list) and layout."""

    def __init__(self, rows: slice, start: int, ctx: torch.Tensor, device: torch.device) -> None:
        self.rows, self.ctx = rows, ctx
        self.run = _run_start(ctx)
        n_q, n_k = rows.stop - rows.start, len(ctx)
        self.q_pos = torch.arange(start, start + n_q, device=device)
        self.k_pos = torch.arange(n_k, device=device)
        self.cu_q = torch.tensor([0, n_q], dtype=torch.int64, device=device)
        self.cu_k = torch.tensor([0, n_k], dtype=torch.int64, device=device)
        self.layout = StripeLayout(1, (start,), (0,))

    def keys(self, pool: torch.Tensor) -> torch.Tensor:
        if self.run is not None:
            return pool[self.run: self.run + len(self.ctx)]
        return pool.index_select(0, self.ctx)


class MixedStep:
    def __init__(self, batch: MixedBatch, rank: int, pool: KVPool, local: dict[int, SlotList],
                 device: torch.device) -> None:
        if batch.group != (rank,):
            raise ValueError(f"a mixed step runs on one instance, got group {batch.group}")
        self.pool = pool
        store, q_pos, self.chunks, q_lens, self.last_rows = [], [], [], [], {}
        for s in batch.seqs:
            slots = [slot for kr in s.keep for slot in kr.slots]
            if len(slots) != len(s.token_ids) or any(kr.rank != rank for kr in s.keep):
                raise ValueError(f"request {s.request_id}: a chunk must keep all its tokens on instance {rank}")
            held = local.setdefault(s.request_id, SlotList(device))
            if len(held) != s.start:
                raise ValueError(f"request {s.request_id}: chunk starts at {s.start} but {len(held)} tokens are cached")
            held.extend(slots)
            store.append(torch.tensor(slots, dtype=torch.int64))
            q_pos.append(torch.arange(s.start, s.start + len(slots)))
            row = sum(q_lens)
            self.chunks.append(_Chunk(slice(row, row + len(slots)), s.start, held.tensor().clone(), device))
            q_lens.append(len(slots))
            if s.sample is not None:
                self.last_rows[s.request_id] = sum(q_lens) - 1
        self.num_prefill = sum(q_lens)
        rows = self.decode = batch.decode
        for rid, slot in zip(rows.request_ids, rows.slots):
            local.setdefault(rid, SlotList(device)).append(slot)
        store.append(torch.tensor(rows.slots, dtype=torch.int64))
        decode_ctx = [local[rid].tensor() for rid in rows.request_ids]
        self.store_slots = _cat(store, device)
        self.q_pos = _cat(q_pos, device)
        self.decode_slots = _cat(decode_ctx, device)
        self.decode_cu = _cu([len(x) for x in decode_ctx], device)
        self.decode_runs = slot_runs(self.decode_slots, self.decode_cu) if device.type == "cpu" else None
        self.positions = torch.cat([self.q_pos, torch.tensor(rows.positions, dtype=torch.int64, device=device)])
        self.input_ids = torch.tensor([t for s in batch.seqs for t in s.token_ids] + list(rows.token_ids),
                                      dtype=torch.int64, device=device)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        pool_k, pool_v = self.pool.k[layer], self.pool.v[layer]
        store_kv(pool_k, pool_v, self.store_slots, k, v)
        p = self.num_prefill
        outs = []
        for c in self.chunks:
            o, _ = striped_attention_step(q[c.rows], c.keys(pool_k), c.keys(pool_v), c.q_pos, c.k_pos,
                                          c.cu_q, c.cu_k, layout=c.layout)
            outs.append(o)
        if len(self.decode):
            o, _ = decode_partial_attention(q[p:], pool_k, pool_v, self.decode_slots, self.decode_cu,
                                            runs=self.decode_runs)
            outs.append(o)
        return torch.cat(outs) if len(outs) > 1 else outs[0]
