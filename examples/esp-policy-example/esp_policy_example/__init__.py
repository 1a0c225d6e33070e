"""An esp-serve policy plug-in.

`ShortestPromptFirst` is its own scheduling policy: it admits waiting requests shortest
prompt first (shortest-job-first on the prefill) instead of in arrival order, bounded so
that a request waiting longer than `max_wait_s` goes first. Batching and scaling reuse the
built-in FCFS batching and greedy scaling components.
"""
from __future__ import annotations

from dataclasses import replace

from esp.policies import ClusterView, Dispatch, PolicyOptions, PolicySet, SchedulingPolicy
from esp.policies.fcfs import FCFSBatching, FCFSScheduling, GreedyScaling


class ShortestPromptFirst(SchedulingPolicy):
    max_wait_s = 5.0

    def dispatch(self, view: ClusterView) -> Dispatch:
        overdue = [r for r in view.waiting if view.now - r.arrival_s > self.max_wait_s]
        rest = sorted((r for r in view.waiting if r not in overdue), key=lambda r: (r.prompt_len, r.arrival_s))
        return FCFSScheduling(self.options).dispatch(replace(view, waiting=tuple(overdue + rest)))


def example(options: PolicyOptions) -> PolicySet:
    return PolicySet("example", ShortestPromptFirst(options), FCFSBatching(options), GreedyScaling(options))
