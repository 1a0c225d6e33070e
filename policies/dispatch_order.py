"""The order in which `loong`'s dispatch considers waiting requests (`LoongOptions.order`), and
what dispatch asks of the queue before it orders it: a lower bound of the prefill that can start,
the highest response ratio, and the largest share of a TTFT target used.

An order is called as `order(view, cost)` for the requests in order (indexable and iterable);
`heads` is how many requests from its front dispatch may start with (`lookahead + 1`).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from esp.costs.cost_model import CostModel
from esp.policies.base import ClusterView, RequestView

__all__ = ["ORDERS", "ArrivalOrder", "DispatchOrder", "RatioOrder", "ResponseRatio", "dispatch_order"]


class DispatchOrder(Protocol):
    def __call__(self, view: ClusterView, cost: CostModel) -> Sequence[RequestView]: ...

    def shortest_prefill(self, view: ClusterView, cost: CostModel, heads: int = 1) -> float:
        """A lower bound of the prefill alone on one instance of every request dispatch may start with."""

    def urgency(self, view: ClusterView, cost: CostModel) -> float:
        """The highest response ratio, `(waited + T) / budget`, dispatch would serve first."""

    def slo_urgency(self, view: ClusterView, cost: CostModel, heads: int = 1) -> float:
        """The largest share of its TTFT target that a waiting prompt with one will have used when
        its prefill alone ends, if it starts now (0 when none has a target)."""


class ArrivalOrder:
    """The paper's FCFS: the queue as it arrived, so only its front `heads` can start."""

    def __call__(self, view: ClusterView, cost: CostModel) -> list[RequestView]:
        return list(view.waiting)

    def shortest_prefill(self, view: ClusterView, cost: CostModel, heads: int = 1) -> float:
        return min(cost.prefill_time([r.remaining_prompt], 1) for r in view.waiting[:heads])

    def urgency(self, view: ClusterView, cost: CostModel) -> float:
        return _ratio(view.now, cost, view.waiting[0])

    def slo_urgency(self, view: ClusterView, cost: CostModel, heads: int = 1) -> float:
        return max((_ratio(view.now, cost, r) for r in view.waiting[:heads] if r.ttft_slo_s), default=0.0)


def _ratio(now: float, cost: CostModel, r: RequestView) -> float:
    """One request's response ratio, `(waited + T) / budget` (:class:`ResponseRatio`)."""
    alone = cost.prefill_time([r.remaining_prompt], 1)
    return (now - r.arrival_s + alone) / (r.ttft_slo_s or alone)


class ResponseRatio:
    """Highest response ratio next: waiting requests by `(waited + T) / budget`, highest first,
    with `T` the request's predicted prefill alone on one instance and `budget` its
    `ttft_slo_s`, else `T`. The paper's metrics average latency normalized by length, so a short
    prompt stuck behind a long one costs the mean far more than the reverse; the ratio grows
    with waiting, so no request starves. The per-request terms are columns kept while the
    queue's view is the same object (the scheduler rebuilds it only when the queue changes);
    a queue that only grew at its back extends them."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._start = self._budget = self._alone = np.empty(0)
        self._targeted = np.empty(0, dtype=bool)
        self.shortest = 0.0  # the shortest predicted prefill alone in the queue
        self.any_targeted = False  # whether a request in the queue has a TTFT target

    def __call__(self, view: ClusterView, cost: CostModel) -> RatioOrder:
        self.prepare(view, cost)
        return RatioOrder(view.waiting, np.argsort((self._start - view.now) / self._budget, kind="stable"))

    def prepare(self, view: ClusterView, cost: CostModel) -> ResponseRatio:
        waiting, key = view.waiting, self._key
        if key is not None and key[0] is waiting and key[1] is cost:
            return self
        known = key[0] if key is not None and key[1] is cost else ()
        k = len(known)
        if 0 < k <= len(waiting) and waiting[:k] == known:
            start, budget, alone, targeted = self._columns(waiting[k:], cost)
            start, budget = np.concatenate((self._start, start)), np.concatenate((self._budget, budget))
            alone, targeted = np.concatenate((self._alone, alone)), np.concatenate((self._targeted, targeted))
        else:
            start, budget, alone, targeted = self._columns(waiting, cost)
        self._start, self._budget, self._alone, self._targeted = start, budget, alone, targeted
        self._key = (waiting, cost)
        self.shortest = float(alone.min()) if len(alone) else 0.0
        self.any_targeted = bool(targeted.any())
        return self

    @staticmethod
    def _columns(requests: tuple[RequestView, ...], cost: CostModel) -> tuple[np.ndarray, ...]:
        """Per request: the time its ratio's clock starts (arrival less `T`), its budget, `T`,
        and whether it has a TTFT target."""
        a, b, c = cost.prefill_coefficients(1)
        flat: list[float] = []
        add = flat.extend
        for r in requests:
            add((r.arrival_s, r.prompt_len - sum(r.kv_tokens.values()) if r.kv_tokens else r.prompt_len,
                 r.ttft_slo_s or math.nan))
        arrival, n, target = np.array(flat, dtype=np.float64).reshape(-1, 3).T
        alone = a + n * (b + c * n)
        targeted = ~np.isnan(target)
        return arrival - alone, np.where(targeted, target, alone), alone, targeted

    def shortest_prefill(self, view: ClusterView, cost: CostModel, heads: int = 1) -> float:
        return self.prepare(view, cost).shortest  # any request may come first

    def urgency(self, view: ClusterView, cost: CostModel) -> float:
        return self.prepare(view, cost).highest(view.now)

    def slo_urgency(self, view: ClusterView, cost: CostModel, heads: int = 1) -> float:
        return self.prepare(view, cost).highest(view.now, with_target=True)

    def highest(self, now: float, with_target: bool = False) -> float:
        """The highest response ratio in the queue (`with_target`: among prompts with a TTFT
        target, whose ratio is the share of it used; 0 when none has one)."""
        start, budget = self._start, self._budget
        if with_target:
            if not self.any_targeted:
                return 0.0
            start, budget = start[self._targeted], budget[self._targeted]
        return float(((now - start) / budget).max()) if len(start) else 0.0


class RatioOrder:
    """A queue's requests in a precomputed order, materialized only as far as they are read."""

    def __init__(self, waiting: tuple[RequestView, ...], index: np.ndarray) -> None:
        self.waiting, self.index = waiting, index

    def __getitem__(self, k: slice) -> list[RequestView]:
        return [self.waiting[i] for i in self.index[k]]

    def __iter__(self):
        waiting, index = self.waiting, self.index
        for part in (index[:16], index[16:]):  # dispatch mostly stops within the first few
            for i in part.tolist():
                yield waiting[i]


ORDERS: dict[str, Callable[[], DispatchOrder]] = {"hrrn": ResponseRatio, "fcfs": ArrivalOrder}
"""`LoongOptions.order` -> the order's class (one instance per policy: `ResponseRatio` keeps columns)."""


def dispatch_order(view: ClusterView, cost: CostModel, order: str = "hrrn") -> list[RequestView]:
    """The waiting requests in the order dispatch considers them: `fcfs`, arrival order (the
    paper's), or `hrrn`, highest response ratio first (:class:`ResponseRatio`)."""
    return list(ORDERS[order]()(view, cost))
