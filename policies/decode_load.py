"""What the running (decoding) requests hold on each instance, summed once per decision, and
what follows from it: how fast an instance's decodes step and how long they can pause."""
from __future__ import annotations

import heapq
from collections import Counter

from esp.costs.cost_model import CostModel
from esp.policies.base import ClusterView, RequestView


class DecodeLoad:
    """Per rank, over the running requests: `newest` (those whose next token lands there), `kv`
    tokens, `count` requests holding KV, `reserve` (the tokens they may still generate),
    `inverse_left` (the sum of 1 / that, each at least 1), `slack` (per request, `(budget, left)`:
    its TPOT target times all the tokens it may generate after its first, less the time it has
    decoded so far, and the tokens it may still generate), `targets` (the tightest TPOT target
    there); `holding`: the ranks with decode KV; `alone`: rank -> the requests whose
    whole KV is there; `pinned`: the ranks holding part of a spread request; `future`: the KV
    all running requests may still add. One pass (this runs at every scheduling round).

    `of(view, ...)` keeps the last load it built: the scheduler's prefill and migration stages
    see the same view, and both policies ask."""

    _last: tuple | None = None

    def __init__(self, running: tuple[RequestView, ...], default_target: float, now: float = 0.0) -> None:
        self.default_target = default_target
        newest, kv, count, reserve, inverse = Counter(), Counter(), Counter(), Counter(), Counter()
        slack: dict[int, list[tuple[float, int]]] = {}
        targets: dict[int, float] = {}
        alone: dict[int, list[RequestView]] = {}
        pinned: set[int] = set()
        future = 0
        for r in running:
            held = r.kv_tokens
            left = max(0, r.max_tokens - r.output_len)
            future += r.prompt_len + left
            if not held:
                continue
            weight = 1 / max(1, left)
            target = r.tpot_slo_s or default_target
            decoded = now - r.first_token_s if r.first_token_s is not None else 0.0
            budget = (target * (r.output_len - 1 + left) - decoded, left)
            for rank, n in held.items():
                future -= n
                kv[rank] += n
                count[rank] += 1
                reserve[rank] += left
                inverse[rank] += weight
                slack.setdefault(rank, []).append(budget)
                if target < targets.get(rank, target + 1):
                    targets[rank] = target
            newest[rank] += 1  # the last holder is the newest token's
            if len(held) == 1:
                alone.setdefault(rank, []).append(r)
            else:
                pinned.update(held)
        self.newest, self.kv, self.count, self.reserve, self.inverse_left = newest, kv, count, reserve, inverse
        self.slack, self.targets, self.alone, self.pinned, self.future = slack, targets, alone, pinned, future
        self.holding = set(count)

    @classmethod
    def of(cls, view: ClusterView, default_target: float) -> DecodeLoad:
        last = cls._last
        if last is not None and last[0] is view.running and last[1] == default_target:
            return last[2]
        load = cls(view.running, default_target, view.now)
        cls._last = (view.running, default_target, load)
        return load

    def target(self, rank: int) -> float:
        """The tightest TPOT target of the decodes on `rank`."""
        return self.targets.get(rank, self.default_target)

    def paused_weight(self, rank: int) -> float:
        """Sum over the decodes on `rank` of 1 / the tokens each may still generate (the paper's
        normalized output latency per second of pause)."""
        return self.inverse_left[rank]

    def step_time(self, rank: int, cost: CostModel, extra_requests: int = 0, extra_kv: int = 0) -> float:
        """Predicted decode step of the requests on `rank` alone (plus `extra_*`)."""
        return cost.decode_time(self.count[rank] + extra_requests, self.kv[rank] + extra_kv)

    def tolerable_pause(self, rank: int, cost: CostModel, miss_share: float = 0.0) -> float:
        """Seconds the decodes on `rank` may pause and each still meet its TPOT target over all its
        output tokens, if its remaining ones step at the rank's predicted decode step: the least
        slack there (0 when a decode there is already behind). With `miss_share`, that share of
        them (rounded down) may miss it: the slack of the next one."""
        if not self.count[rank]:
            return float("inf")
        step = self.step_time(rank, cost)
        slack = (budget - step * left for budget, left in self.slack[rank])
        k = int(miss_share * self.count[rank])
        return max(0.0, heapq.nsmallest(k + 1, slack)[-1] if k else min(slack))
