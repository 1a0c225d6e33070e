"""The policies' picture of the scheduler's state (`ClusterView`), rebuilt only where it changed:
a request's view is cached under its version (its own methods bump it), and the waiting queue's
tuple is extended while the queue only grew at its back (`WaitingQueue.mark`)."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import islice
from types import MappingProxyType

from esp.costs.cost_model import CostModel
from esp.engine.request import Request, Status
from esp.engine.slot_allocator import SlotAllocator
from esp.engine.waiting_queue import WaitingQueue
from esp.policies.base import NO_KV, ClusterView, RequestView


class ViewCache:
    def __init__(self) -> None:
        self._views: dict[int, tuple[int, RequestView]] = {}
        self._waiting: tuple[int, tuple[RequestView, ...], int] = (-1, (), 0)  # (epoch, views, queue length)

    def cluster(self, now: float, allocators: Sequence[SlotAllocator], busy: set[int], waiting: WaitingQueue,
                running: Iterable[Request], cost_model: CostModel | None) -> ClusterView:
        return ClusterView(now, tuple([a.num_slots for a in allocators]), tuple([a.num_free for a in allocators]),
                           frozenset([i for i in range(len(allocators)) if i not in busy]),
                           self._queue(waiting), self._of(running, Status.RUNNING), cost_model)

    def _queue(self, queue: WaitingQueue) -> tuple[RequestView, ...]:
        epoch, views, size = self._waiting
        if epoch != queue.epoch:
            if queue.mark <= epoch:  # only appended to since
                views += self._of(islice(queue, size, None), Status.WAITING)
            else:
                views = self._of(queue, Status.WAITING)
            self._waiting = (queue.epoch, views, len(queue))
        return views

    def _of(self, requests: Iterable[Request], status: Status) -> tuple[RequestView, ...]:
        """The views of those of `requests` in `status` (a request in a step is in no view)."""
        cache, out = self._views, []
        for r in requests:  # the cache check inlined: this runs over long queues
            if r.status is status:
                hit = cache.get(r.id)
                out.append(hit[1] if hit is not None and hit[0] == r.version else self.build(r))
        return tuple(out)

    def build(self, r: Request) -> RequestView:
        """The request's view, built when its version (status, tokens, placement) has no cached one."""
        output = len(r.output_ids)
        prompt = len(r.prompt_ids) + output if r.status is Status.WAITING else len(r.prompt_ids)
        slo, placement = r.slo, r.placement
        view = RequestView(r.id, r.arrival, prompt, output, r.params.max_tokens,
                           MappingProxyType({k: len(v) for k, v in placement.items()}) if placement else NO_KV,
                           slo and slo.ttft_s, slo and slo.tpot_s, r.first_token_at)
        self._views[r.id] = (r.version, view)
        return view

    def forget(self, request_id: int) -> None:
        self._views.pop(request_id, None)
