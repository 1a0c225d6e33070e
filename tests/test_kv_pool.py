"""The main process's slot allocator against a plain set model (hypothesis)."""
from __future__ import annotations

from array import array

import pytest
from hypothesis import given, settings, strategies as st

from esp.engine.slot_allocator import OutOfSlots, SlotAllocator


@settings(max_examples=200, deadline=None)
@given(size=st.integers(1, 300), ops=st.lists(st.tuples(st.booleans(), st.integers(1, 120)), max_size=40))
def test_allocations_are_disjoint_lowest_first_or_first_fit_and_frees_return_them(size, ops):
    alloc, held, used = SlotAllocator(size), [], set()
    for take, n in ops:
        if take:
            if n > size - len(used):
                with pytest.raises(OutOfSlots):
                    alloc.allocate(n)
                continue
            slots = alloc.allocate(n)
            assert len(slots) == n and not used & set(slots) and all(0 <= x < size for x in slots)
            free = sorted(set(range(size)) - used)
            runs = [s for s in free if all(s + k not in used and s + k < size for k in range(n))]
            if n <= SlotAllocator.SMALL or not runs:
                assert list(slots) == free[:n]
            else:
                assert list(slots) == list(range(runs[0], runs[0] + n))  # the first run that fits
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


def test_a_prompt_takes_the_first_run_that_fits_and_a_fragmented_pool_its_lowest_slots():
    alloc = SlotAllocator(400)
    a, b, c, d = (alloc.allocate(100) for _ in range(4))
    alloc.free(a)
    alloc.free(c)
    assert list(alloc.allocate(10)) == list(range(10))  # decode tokens: the lowest free slots
    assert list(alloc.allocate(95)) == list(range(200, 295))  # the hole 10..99 is too small
    assert list(alloc.allocate(90)) == list(range(10, 100))  # this one fits exactly
    alloc.free(d)
    assert list(alloc.allocate(100)) == list(range(295, 395))  # the tail: d's slots joined 295..299
    alloc.free(array("q", range(150, 160)))
    alloc.free(b[60:])
    assert list(alloc.allocate(55)) == list(range(150, 200)) + list(range(395, 400))
    assert alloc.num_free == 0
