"""What the running (decoding) requests hold on each instance, gathered once per decision, and
what follows from it: how fast an instance's decodes step and how long they can pause."""
from __future__ import annotations

import heapq
from typing import NamedTuple

from esp.costs.cost_model import CostModel
from esp.policies.base import ClusterView, RequestView


class RankLoad(NamedTuple):
    """The decodes holding KV on one rank: `kv` tokens, `count` requests, `reserve` (the tokens
    they may still generate), `inverse_left` (the sum of 1 / that, each at least 1), `slack` (per
    request, `(budget, left)`: its TPOT target times all the tokens it may generate after its
    first, less the time it has decoded so far, and the tokens it may still generate), `target`
    (the tightest TPOT target), `alone` (the requests whose whole KV is there), `pinned` (it holds
    part of a request spread over several ranks)."""

    kv: int = 0
    count: int = 0
    reserve: int = 0
    inverse_left: float = 0.0
    slack: tuple[tuple[float, int], ...] = ()
    target: float = 0.0
    alone: tuple[RequestView, ...] = ()
    pinned: bool = False


class _Counts(dict):
    """Counts by rank; a rank not counted has 0."""

    def __missing__(self, key: int) -> int:
        return 0


class DecodeLoad:
    """Over the running requests: `newest` (per rank, those whose next token lands there),
    `holding` (the ranks with decode KV), `future` (the KV they may all still add), and per rank
    a :class:`RankLoad`, summed the first time that rank is asked about. A request's TPOT target
    is its `tpot_slo_s`, else `default_target`.

    `of(view, ...)` keeps the last load it built: the scheduler's prefill and migration stages
    see the same view, and both policies ask."""

    _last: tuple | None = None

    def __init__(self, running: tuple[RequestView, ...], default_target: float, now: float = 0.0) -> None:
        self.default_target, self.now = default_target, now
        newest = _Counts()
        by_rank: dict[int, list[RequestView]] = {}
        future = 0
        for r in running:  # the one pass every dispatch needs; per-rank sums wait until asked for
            held = r.kv_tokens
            future += r.prompt_len + r.max_tokens - r.output_len
            if held:
                future -= sum(held.values())
                for rank in held:
                    if rank in by_rank:
                        by_rank[rank].append(r)
                    else:
                        by_rank[rank] = [r]
                newest[rank] = newest.get(rank, 0) + 1  # the last holder is the newest token's
        self.newest, self.future, self._by_rank = newest, future, by_rank
        self.holding = set(by_rank)
        self._ranks: dict[int, RankLoad] = {}
        self._tolerance: dict[tuple[int, float], float] = {}  # of `_tolerance_cost`
        self._tolerance_cost: CostModel | None = None

    @classmethod
    def of(cls, view: ClusterView, default_target: float) -> DecodeLoad:
        last = cls._last
        if last is not None and last[0] is view.running and last[1] == default_target:
            return last[2]
        load = cls(view.running, default_target, view.now)
        cls._last = (view.running, default_target, load)
        return load

    def rank(self, rank: int) -> RankLoad:
        out = self._ranks.get(rank)
        if out is None:
            out = self._ranks[rank] = self._sum(rank)
        return out

    def _sum(self, rank: int) -> RankLoad:
        requests = self._by_rank.get(rank)
        if not requests:
            return RankLoad(target=self.default_target)
        kv = reserve = 0
        inverse, slack, target, alone, pinned = 0.0, [], float("inf"), [], False
        for r in requests:
            held = r.kv_tokens
            left = max(0, r.max_tokens - r.output_len)
            own = r.tpot_slo_s or self.default_target
            decoded = self.now - r.first_token_s if r.first_token_s is not None else 0.0
            kv += held[rank]
            reserve += left
            inverse += 1 / max(1, left)
            slack.append((own * (r.output_len - 1 + left) - decoded, left))
            target = min(target, own)
            if len(held) == 1:
                alone.append(r)
            else:
                pinned = True
        return RankLoad(kv, len(requests), reserve, inverse, tuple(slack), target, tuple(alone), pinned)

    def target(self, rank: int) -> float:
        """The tightest TPOT target of the decodes on `rank`."""
        return self.rank(rank).target

    def paused_weight(self, rank: int) -> float:
        """Sum over the decodes on `rank` of 1 / the tokens each may still generate (the paper's
        normalized output latency per second of pause)."""
        return self.rank(rank).inverse_left

    def step_time(self, rank: int, cost: CostModel, extra_requests: int = 0, extra_kv: int = 0) -> float:
        """Predicted decode step of the requests on `rank` alone (plus `extra_*`)."""
        load = self.rank(rank)
        return cost.decode_time(load.count + extra_requests, load.kv + extra_kv)

    def tolerable_pause(self, rank: int, cost: CostModel, miss_share: float = 0.0) -> float:
        """Seconds the decodes on `rank` may pause and each still meet its TPOT target over all its
        output tokens, if its remaining ones step at the rank's predicted decode step: the least
        slack there (0 when a decode there is already behind). With `miss_share`, that share of
        them (rounded down) may miss it: the slack of the next one."""
        if cost is not self._tolerance_cost:
            self._tolerance, self._tolerance_cost = {}, cost
        key = (rank, miss_share)
        out = self._tolerance.get(key)
        if out is None:
            load = self.rank(rank)
            if not load.count:
                return float("inf")
            step = self.step_time(rank, cost)
            slack = (budget - step * left for budget, left in load.slack)
            k = int(miss_share * load.count)
            out = self._tolerance[key] = max(0.0, heapq.nsmallest(k + 1, slack)[-1] if k else min(slack))
        return out
