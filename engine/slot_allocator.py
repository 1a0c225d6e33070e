"""The main process's mirror of one instance's free KV slots (DESIGN 4.2): plans name the exact
slots to write. Plain Python and numpy, no torch: the control plane and the simulator import it."""
from __future__ import annotations

from array import array

import numpy as np


class OutOfSlots(RuntimeError):
    pass


class SlotAllocator:
    """Free list of one instance's pool. A prompt's KV takes the first contiguous run that fits
    (else the lowest free slots); decode tokens take the lowest free slots, found from a
    cursor below which every slot is in use, so a decode step never scans the whole pool.
    From `_tail` on every slot is free: when the free slots below it are too few for a prompt,
    no hole there can hold it and the run starts at the tail, found without a scan.

    The free map is a `bytearray` (1 = free) with a numpy view of the same memory: small
    allocations and frees walk it in Python, `bytearray.find`/`rfind` (C) find runs and the
    tail, numpy handles large lists of slots."""

    SMALL = 64

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._bits = bytearray(b"\x01") * num_slots
        self._free = np.frombuffer(self._bits, dtype=np.bool_)
        self.num_free = num_slots
        self._cursor = 0
        self._tail = 0

    def allocate(self, n: int) -> array:
        """`n` free slots as an `array('q')`: a list of ints that numpy reads without a copy."""
        if n > self.num_free:
            raise OutOfSlots(f"asked for {n} slots, {self.num_free} free")
        if n == 0:
            return array("q")
        out = self._lowest(n) if n <= self.SMALL else self._run(n)
        self.num_free -= n
        if out[-1] >= self._tail:
            self._tail = out[-1] + 1
        return out

    def free(self, slots: array | list[int]) -> None:
        if not len(slots):
            return
        if len(slots) <= self.SMALL:
            bits = self._bits
            if any(bits[i] for i in slots):
                raise RuntimeError("double free of KV slots")
            for i in slots:
                if bits[i]:
                    raise RuntimeError("double free of KV slots (a slot is listed twice)")
                bits[i] = 1
            self.num_free += len(slots)
            lowest, highest = min(slots), max(slots)
        elif slots[-1] - slots[0] + 1 == len(slots) and self._is_run(slots):
            lowest, highest = slots[0], slots[-1]
            if self._free[lowest: highest + 1].any():
                raise RuntimeError("double free of KV slots")
            self._free[lowest: highest + 1] = True
            self.num_free += len(slots)
        else:
            idx = np.frombuffer(slots, dtype=np.int64) if isinstance(slots, array) \
                else np.asarray(slots, dtype=np.int64)
            if self._free[idx].any():
                raise RuntimeError("double free of KV slots")
            self._free[idx] = True
            expected, self.num_free = self.num_free + len(idx), int(np.count_nonzero(self._free))
            if self.num_free != expected:
                raise RuntimeError("double free of KV slots (a slot is listed twice)")
            lowest, highest = int(idx.min()), int(idx.max())
        self._cursor = min(self._cursor, lowest)
        if highest + 1 == self._tail:
            self._tail = self._bits.rfind(0, 0, highest) + 1

    @staticmethod
    def _is_run(slots: array | list[int]) -> bool:
        """Whether `slots` (first and last `len - 1` apart) are consecutive (a prompt's KV)."""
        idx = np.frombuffer(slots, dtype=np.int64) if isinstance(slots, array) else np.asarray(slots, dtype=np.int64)
        return bool((np.diff(idx) == 1).all())

    def _lowest(self, n: int) -> array:
        """The lowest `n` free slots, taken run by run (one run when the pool is unfragmented)."""
        bits, find, out, i = self._bits, self._bits.find, array("q"), self._cursor
        while n:
            i = find(1, i)
            end = find(0, i, i + n)
            take = (end if end >= 0 else min(i + n, self.num_slots)) - i
            bits[i: i + take] = bytes(take)
            out.extend(range(i, i + take))
            i, n = i + take, n - take
        self._cursor = i
        return out

    def _run(self, n: int) -> array:
        """The first run of `n` free slots (at the tail when no hole below it can hold them),
        else the lowest `n` free slots."""
        tail = self._tail
        if self.num_free - (self.num_slots - tail) < n <= self.num_slots - tail:
            start = tail
        else:
            start = self._first_run(n)
        if start >= 0:
            slots = np.arange(start, start + n, dtype=np.int64)
            self._free[start: start + n] = False
        else:
            slots = np.flatnonzero(self._free)[:n].astype(np.int64)
            self._free[slots] = False
        out = array("q")
        out.frombytes(memoryview(slots).cast("B"))
        return out

    def _first_run(self, n: int) -> int:
        """The start of the first run of `n` free slots, or -1: from run to run with memchr."""
        find, start = self._bits.find, self._cursor
        while True:
            start = find(1, start)
            if start < 0:
                return -1
            end = find(0, start)
            if end < 0:
                end = self.num_slots
            if end - start >= n:
                return start
            start = end
