"""The `loong` bundle: elastic sequence parallelism (LoongServe)."""
from __future__ import annotations

from esp.policies.base import PolicyOptions, PolicySet
from esp.policies.fcfs import FCFSBatching, FCFSScheduling, GreedyScaling


def loong(options: PolicyOptions) -> PolicySet:
    return PolicySet("loong", FCFSScheduling(options), FCFSBatching(options), GreedyScaling(options))
