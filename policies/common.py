"""Small pieces several policies share."""
from __future__ import annotations

from collections import Counter

from esp.policies.base import Batch, ClusterView, RequestView


def running_on(view: ClusterView) -> Counter:
    """Per rank, the running requests whose newest KV is there (each will want a slot there next
    step)."""
    return Counter(next(reversed(r.kv_tokens)) for r in view.running if r.kv_tokens)


def batches_by_holders(requests: list[RequestView], max_batch: int) -> list[Batch]:
    """Decode batches on disjoint groups: requests whose KV holders overlap share a batch."""
    groups: list[tuple[set[int], list[int]]] = []
    for r in requests:
        holders = set(r.kv_tokens)
        touching = [g for g in groups if g[0] & holders]
        merged = (holders.union(*(g[0] for g in touching)), [rid for g in touching for rid in g[1]] + [r.request_id])
        groups = [g for g in groups if not (g[0] & holders)] + [merged]
    return [Batch(tuple(ids[:max_batch]), tuple(sorted(ranks))) for ranks, ids in groups]


def spare_instances(view: ClusterView, group: set[int], free: dict[int, int]) -> list[int]:
    """Idle instances a decode batch may scale up onto: outside its group, with a free slot,
    and holding no other running request's KV (those belong to other decode batches).
    Most free slots first."""
    holding = {i for r in view.running for i in r.kv_tokens}
    return sorted((i for i in view.idle - group - holding if free[i] > 0), key=lambda i: (-free[i], i))


def first_with_room(candidates, free: dict[int, int], group: set[int], spare: list[int]) -> int | None:
    """The first candidate with a free slot, else a spare instance with one (scale-up: taken
    out of `spare` and added to `group`), else None."""
    chosen = next((i for i in candidates if free[i] > 0), None)
    spare[:] = [i for i in spare if free[i] > 0]
    if chosen is None and spare:
        chosen = spare.pop(0)
        group.add(chosen)
    return chosen


def pick_master(r: RequestView, group: set[int], free: dict[int, int], spare: list[int]) -> int | None:
    """The holder of the newest token if it has room, else the group member with the most free
    slots, else a spare instance (scale-up)."""
    holders = list(r.kv_tokens)
    master = first_with_room(holders[-1:] + sorted(group, key=lambda i: -free[i]), free, group, spare)
    if master is not None:
        free[master] -= 1
    return master
