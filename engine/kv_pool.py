"""Token-granular KV storage inside a worker (DESIGN 4.2): `KVPool` holds the tensors, `SlotList`
a request's local slots there, grown in place. The main process's mirror of the free slots is
`esp.engine.slot_allocator.SlotAllocator`."""
from __future__ import annotations

import torch


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
