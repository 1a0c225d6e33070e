"""Pluggable policies: base classes, decision dataclasses, and the registry (DESIGN 6)."""
from __future__ import annotations

from esp.policies.base import (Batch, BatchingPolicy, ClusterView, DecodePlan, Dispatch, KeepPlan,
                               Migration, PolicyOptions, PolicySet, RequestView, ScalingPolicy, SchedulingPolicy)
from esp.policies.registry import PolicyError, available, load_policy_set

__all__ = ["Batch", "BatchingPolicy", "ClusterView", "DecodePlan", "Dispatch", "KeepPlan", "Migration",
           "PolicyError", "PolicyOptions", "PolicySet", "RequestView", "ScalingPolicy",
           "SchedulingPolicy", "available", "load_policy_set"]
