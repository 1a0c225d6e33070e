"""The main process's slot allocator against a plain set model (hypothesis)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from esp.engine.kv_pool import OutOfSlots, SlotAllocator


@settings(max_examples=200, deadline=None)
@given(size=st.integers(1, 300), ops=st.lists(st.tuples(st.booleans(), st.integers(1, 120)), max_size=40))
def test_allocations_are_disjoint_lowest_first_and_frees_return_them(size, ops):
    alloc, held, used = SlotAllocator(size), [], set()
    for take, n in ops:
        if take:
            if n > size - len(used):
                with pytest.raises(OutOfSlots):
                    alloc.allocate(n)
                continue
            slots = alloc.allocate(n)
            assert len(slots) == n and not used & set(slots) and all(0 <= x < size for x in slots)
            if n <= SlotAllocator.SMALL:
                free = sorted(set(range(size)) - used)
                assert list(slots) == free[:n]
            used |= set(slots)
            held.append(slots)
        elif held:
            slots = held.pop(n % len(held))
            alloc.free(slots)
            used -= set(slots)
        assert alloc.num_free == size - len(used)


def test_double_free_is_refused():
    alloc = SlotAllocator(10)
    slots = alloc.allocate(3)
    alloc.free(slots)
    with pytest.raises(RuntimeError, match="double free"):
        alloc.free(slots)
    more = alloc.allocate(2)
    with pytest.raises(RuntimeError, match="twice"):
        alloc.free([more[0], more[0]])
