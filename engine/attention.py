"""The attention callbacks a worker hands to the model for one step (DESIGN 4.3, 4.4).

Each is an `AttentionFn`: `(layer, q [T,H,D], k [T,KVH,D], v [T,KVH,D]) -> out [T,H,D]`,
with RoPE already applied at global positions. They store K/V where the plan says and
compute attention, talking to the other instances of the group when it has more than one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from esp.engine.comm import PeerComm
from esp.engine.kv_pool import KVPool, SlotList
from esp.engine.protocol import DecodeBatch, PrefillBatch
from esp.kernels import (StripeLayout, append_slots, decode_partial_attention, merge_attn_states, slot_runs,
                         store_kv, striped_attention_step)


@dataclass(frozen=True)
class StripeBlock:
    """The tokens of one group member in a prefill batch: global positions, per-sequence bounds,
    and the rows of this block that the current instance keeps (with their slots)."""

    pos: torch.Tensor
    cu: torch.Tensor
    keep_rows: torch.Tensor
    keep_slots: torch.Tensor


def stripe_positions(length: int, index: int, n: int) -> range:
    return range(index, length, n)


class StripedPrefill:
    """Ring attention over stripes: n passes, each attending local Q to the K/V block in hand."""

    def __init__(self, batch: PrefillBatch, rank: int, pool: KVPool, comm: PeerComm,
                 device: torch.device) -> None:
        self.group, self.pool, self.comm = batch.group, pool, comm
        n = len(self.group)
        self.index = self.group.index(rank)
        lengths = [len(s.token_ids) for s in batch.seqs]
        counts = torch.tensor([[len(stripe_positions(L, j, n)) for L in lengths] for j in range(n)],
                              dtype=torch.int64).reshape(n, len(lengths))
        offsets = torch.cumsum(counts, dim=1) - counts
        keep_pos, keep_slot, keep_seq = [], [], []
        for s_idx, seq in enumerate(batch.seqs):
            for kr in seq.keep:
                if kr.rank == rank:
                    keep_pos.append(torch.arange(kr.start, kr.end))
                    keep_slot.append(torch.tensor(kr.slots, dtype=torch.int64))
                    keep_seq.append(torch.full((kr.end - kr.start,), s_idx))
        kp = torch.cat(keep_pos) if keep_pos else torch.empty(0, dtype=torch.int64)
        ks = torch.cat(keep_slot) if keep_slot else torch.empty(0, dtype=torch.int64)
        kq = torch.cat(keep_seq) if keep_seq else torch.empty(0, dtype=torch.int64)
        origin = kp % n
        row = offsets[origin, kq] + torch.div(kp - origin, n, rounding_mode="floor")
        self.blocks = []
        for j in range(n):
            pos = torch.cat([torch.arange(j, max(j, L), n) for L in lengths]) if lengths else torch.empty(0)
            cu = torch.zeros(len(lengths) + 1, dtype=torch.int64)
            cu[1:] = torch.cumsum(counts[j], 0)
            sel = origin == j
            self.blocks.append(StripeBlock(pos.to(torch.int64).to(device), cu.to(device),
                                           row[sel].to(device), ks[sel].to(device)))
        # pass j attends stripe `index` to stripe j: positions are the progressions the fused
        # CPU kernel computes as a causal mask shifted by 0 or -1 rows
        self.layouts = [StripeLayout.stripes(n, self.index, j, len(lengths)) for j in range(n)]
        mine = self.blocks[self.index]
        self.positions = mine.pos
        self.last_rows = {}
        for s_idx, seq in enumerate(batch.seqs):
            last = lengths[s_idx] - 1
            if last % n == self.index:
                self.last_rows[seq.request_id] = int(mine.cu[s_idx]) + last // n

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n, i = len(self.group), self.index
        block = torch.stack((k, v))
        out = lse = None
        for p in range(n):
            j = (i - p) % n
            exchange = None
            if p < n - 1:
                src = (i - p - 1) % n
                incoming = block.new_empty((2, len(self.blocks[src].pos)) + block.shape[2:])
                exchange = self.comm.start([(self.group[(i + 1) % n], block)],
                                           [(self.group[(i - 1) % n], incoming)])
            b = self.blocks[j]
            if len(b.keep_rows):
                store_kv(self.pool.k[layer], self.pool.v[layer], b.keep_slots,
                         block[0, b.keep_rows], block[1, b.keep_rows])
            mine = self.blocks[i]
            o, l = striped_attention_step(q, block[0], block[1], mine.pos, b.pos, mine.cu, b.cu,
                                          layout=self.layouts[j])
            out, lse = (o, l) if out is None else merge_attn_states(out, lse, o, l)
            if exchange is not None:
                exchange.wait()
                block = incoming
        return out


class DistributedDecode:
    """Multi-master decode: masters send Q to the holders of each request's KV, holders
    return partial `(out, lse)`, masters merge (DESIGN 4.4). Built once per round: who sends
    to whom and the slots of the requests served here; `iteration(k, tokens)` then stores
    each row's k-th slot at its position + k, and on the CPU extends the slot runs of the
    previous iteration by the one new slot per row instead of splitting them again."""

    def __init__(self, batch: DecodeBatch, rank: int, pool: KVPool, local: dict[int, SlotList],
                 comm: PeerComm, device: torch.device) -> None:
        self.pool, self.comm, self.rank, self.local, self.device = pool, comm, rank, local, device
        self.rows, self.steps = batch.rows, batch.steps
        rids, masters, holders = self.rows.request_ids, self.rows.masters, self.rows.holders
        self.mine = [i for i, m in enumerate(masters) if m == rank]
        self.mine_ids = [rids[i] for i in self.mine]
        bit = 1 << rank
        self.peers = [r for r in batch.group if r != rank]
        self.send_rows = {b: torch.tensor([j for j, i in enumerate(self.mine) if holders[i] >> b & 1],
                                          dtype=torch.int64, device=device) for b in self.peers}
        theirs = {a: [rids[i] for i, m in enumerate(masters) if m == a and holders[i] & bit] for a in self.peers}
        self.recv_counts = {a: len(ids) for a, ids in theirs.items()}
        self.served = self.mine_ids + [rid for a in self.peers for rid in theirs[a]]
        self.runs = None

    def iteration(self, k: int, tokens: list[int]) -> DistributedDecode:
        rows, device = self.rows, self.device
        slots = [rows.slots[i] if k == 0 else rows.next_slots[i * (self.steps - 1) + k - 1] for i in self.mine]
        for rid, slot in zip(self.mine_ids, slots):
            held = self.local.get(rid)
            if held is None:
                held = self.local[rid] = SlotList(device)
            held.append(slot)
        self.store_slots = torch.tensor(slots, dtype=torch.int64, device=device)
        lists = [self.local[rid].tensor() for rid in self.served]
        self.slots = torch.cat(lists) if lists else torch.empty(0, dtype=torch.int64, device=device)
        cu = torch.zeros(len(lists) + 1, dtype=torch.int64)
        cu[1:] = torch.cumsum(torch.tensor([len(x) for x in lists], dtype=torch.int64), 0)
        self.cu = cu.to(device)
        if self.slots.device.type == "cpu":  # contiguous runs are read in place by the CPU kernel
            self.runs = slot_runs(self.slots, self.cu) if self.runs is None else \
                append_slots(self.runs, self.slots, self.cu, self.store_slots)
        self.positions = torch.tensor([rows.positions[i] + k for i in self.mine], dtype=torch.int64, device=device)
        self.input_ids = torch.tensor(tokens, dtype=torch.int64, device=device)
        return self

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        pool_k, pool_v = self.pool.k[layer], self.pool.v[layer]
        if len(self.mine):
            store_kv(pool_k, pool_v, self.store_slots, k, v)
        head_shape = q.shape[1:]
        if not self.peers:
            out, _ = decode_partial_attention(q, pool_k, pool_v, self.slots, self.cu, runs=self.runs)
            return out
        incoming = [(a, q.new_empty((c,) + head_shape)) for a, c in self.recv_counts.items()]
        self.comm.start([(b, q[rows]) for b, rows in self.send_rows.items()], incoming).wait()
        all_q = torch.cat([q] + [buf for _, buf in incoming])
        o, l = decode_partial_attention(all_q, pool_k, pool_v, self.slots, self.cu, runs=self.runs)
        replies, results, start = [], [], len(self.mine)
        for a, buf in incoming:
            end = start + len(buf)
            replies += [(a, o[start:end]), (a, l[start:end])]
            start = end
        for b, rows in self.send_rows.items():
            results += [(b, o.new_empty((len(rows),) + head_shape)), (b, l.new_empty((len(rows),) + head_shape[:1]))]
        self.comm.start(replies, results).wait()
        out, lse = o[: len(self.mine)], l[: len(self.mine)]
        for idx, b in enumerate(self.send_rows):
            rows = self.send_rows[b]
            if len(rows):
                mo, ml = merge_attn_states(out[rows], lse[rows], results[2 * idx][1], results[2 * idx + 1][1])
                out, lse = out.index_copy(0, rows, mo), lse.index_copy(0, rows, ml)
        return out
