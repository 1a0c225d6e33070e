"""Token-granular KV storage (DESIGN 4.2).

`SlotAllocator` is the main process's mirror of one instance's free slots: plans name the
exact slots to write. `KVPool` is the tensor storage inside a worker, and `SlotList` a
request's local slots there, grown in place.
"""
from __future__ import annotations

from array import array

import numpy as np
import torch


class OutOfSlots(RuntimeError):
    pass


class SlotAllocator:
    """Free list of one instance's pool. A prompt's KV takes the first contiguous run that fits
    (else the lowest free slots); decode tokens take the lowest free slots, found from a
    cursor below which every slot is in use, so a decode step never scans the whole pool.
    Above `_tail` every slot is free: when the free slots below it are too few for a prompt,
    no hole there can hold it and the run starts at the tail, found without a scan."""

    SMALL = 64

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._free = np.ones(num_slots, dtype=bool)
        self.num_free = num_slots
        self._cursor = 0
        self._tail: int | None = 0  # None: to recompute after a free

    def allocate(self, n: int) -> array:
        """`n` free slots as an `array('q')`: a list of ints that numpy reads without a copy."""
        if n > self.num_free:
            raise OutOfSlots(f"asked for {n} slots, {self.num_free} free")
        if n == 0:
            return array("q")
        if n <= self.SMALL:
            slots = self._lowest(n)
        else:
            tail = self._free_tail()
            if self.num_free - (self.num_slots - tail) < n <= self.num_slots - tail:
                start = tail
            else:
                start = self._first_run(n)
            slots = np.arange(start, start + n) if start >= 0 else np.flatnonzero(self._free)[:n]
        self._free[slots] = False
        self.num_free -= n
        if self._tail is not None:
            self._tail = max(self._tail, int(slots[-1]) + 1)
        out = array("q")
        out.frombytes(slots.astype(np.int64).tobytes())
        return out

    def free(self, slots: array | list[int]) -> None:
        if not len(slots):
            return
        idx = np.frombuffer(slots, dtype=np.int64) if isinstance(slots, array) else np.asarray(slots, dtype=np.int64)
        if self._free[idx].any():
            raise RuntimeError("double free of KV slots")
        self._free[idx] = True
        expected, self.num_free = self.num_free + len(idx), int(np.count_nonzero(self._free))
        if self.num_free != expected:
            raise RuntimeError("double free of KV slots (a slot is listed twice)")
        self._cursor = min(self._cursor, int(idx.min()))
        self._tail = None

    def _free_tail(self) -> int:
        """The first slot from which every slot is free."""
        if self._tail is None:
            used = np.flatnonzero(~self._free)
            self._tail = int(used[-1]) + 1 if len(used) else 0
        return self._tail

    def _lowest(self, n: int) -> np.ndarray:
        found, start = [], self._cursor
        while n > 0:
            window = np.flatnonzero(self._free[start: start + 4096])[:n] + start
            found.append(window)
            n -= len(window)
            start += 4096
        slots = np.concatenate(found)
        self._cursor = int(slots[-1]) + 1
        return slots

    def _first_run(self, n: int) -> int:
        padded = np.concatenate(([False], self._free, [False])).astype(np.int8)
        edges = np.flatnonzero(np.diff(padded))
        starts, ends = edges[0::2], edges[1::2]
        fits = np.flatnonzero(ends - starts >= n)
        return int(starts[fits[0]]) if len(fits) else -1


class KVPool:
    """Per-instance K and V storage: `k[layer]`, `v[layer]` are `[num_slots, kv_heads, head_dim]`."""

    def __init__(self, num_layers: int, num_slots: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (num_layers, num_slots, kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_slots = num_slots

    @staticmethod
    def bytes_per_slot(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


class SlotList:
    """A request's slots on this instance, in position order, appended without re-copying."""

    def __init__(self, device: torch.device) -> None:
        self._buf = torch.empty(16, dtype=torch.int64, device=device)
        self._len = 0

    def extend(self, slots: list[int] | torch.Tensor) -> None:
        new = torch.as_tensor(slots, dtype=torch.int64).to(self._buf.device)
        need = self._len + len(new)
        if need > len(self._buf):
            grown = torch.empty(max(need, 2 * len(self._buf)), dtype=torch.int64, device=self._buf.device)
            grown[: self._len] = self._buf[: self._len]
            self._buf = grown
        self._buf[self._len: need] = new
        self._len = need

    def append(self, slot: int) -> None:
        if self._len == len(self._buf):
            self.extend((slot,))
            return
        self._buf[self._len] = slot
        self._len += 1

    def drop_last(self, n: int) -> None:
        self._len -= n

    def tensor(self) -> torch.Tensor:
        return self._buf[: self._len]

    def __len__(self) -> int:
        return self._len
