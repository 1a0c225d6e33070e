"""The plug-in surface (DESIGN 6): a read-only view in, decision dataclasses out.

Policies are pure: they read a `ClusterView` and return decisions; the `Scheduler`
validates every decision before it touches engine state.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from typing import Any, Callable, Mapping

from esp.costs.cost_model import CostModel

NO_KV: Mapping[int, int] = MappingProxyType({})  # the `kv_tokens` of a request that holds none


@dataclass(frozen=True)
class RequestView:
    """A request as policies see it. `prompt_len` is what its prefill processes (the prompt,
    plus already generated tokens after a recompute preemption); `kv_tokens` maps rank to
    KV tokens held there (empty while waiting, unless a chunk of its prompt already ran);
    `ttft_slo_s` / `tpot_slo_s` the client's latency targets (the request's `slo`), if any;
    `first_token_s` when its first token came (on the view's clock), if it has one."""

    request_id: int
    arrival_s: float
    prompt_len: int
    output_len: int
    max_tokens: int
    kv_tokens: Mapping[int, int] = field(default_factory=lambda: NO_KV)
    ttft_slo_s: float | None = None
    tpot_slo_s: float | None = None
    first_token_s: float | None = None

    @property
    def context_len(self) -> int:
        return sum(self.kv_tokens.values())

    @property
    def remaining_prompt(self) -> int:
        """Prompt tokens still to prefill (fewer than `prompt_len` after a chunk of it ran)."""
        return self.prompt_len - self.context_len

    @property
    def max_kv_tokens(self) -> int:
        """Upper bound of the KV this request can ever hold."""
        return self.prompt_len + self.max_tokens - self.output_len


@dataclass(frozen=True)
class ClusterView:
    """What the scheduler knows, frozen for one decision. `idle` instances run no step now;
    `running` lists decoding requests that are not in a step now; `cost_model` predicts step
    times (None when the engine has none: policies then fall back to their own defaults)."""

    now: float
    capacity: tuple[int, ...]
    free_slots: tuple[int, ...]
    idle: frozenset[int]
    waiting: tuple[RequestView, ...]
    running: tuple[RequestView, ...]
    cost_model: CostModel | None = None

    @property
    def num_instances(self) -> int:
        return len(self.capacity)

    @cached_property
    def waiting_by_id(self) -> Mapping[int, RequestView]:
        """`waiting` by request id (built once per view, on first use)."""
        return MappingProxyType({r.request_id: r for r in self.waiting})

    @cached_property
    def running_by_id(self) -> Mapping[int, RequestView]:
        """`running` by request id (built once per view, on first use)."""
        return MappingProxyType({r.request_id: r for r in self.running})


@dataclass(frozen=True)
class Dispatch:
    """Waiting requests to prefill now, and the idle instances they may use."""

    request_ids: tuple[int, ...] = ()
    instances: tuple[int, ...] = ()


@dataclass(frozen=True)
class Batch:
    """Requests that run one step together on `group` (prefill or decode).

    Chunked prefill (one-instance groups only): `chunk_tokens` maps a request to the prompt
    tokens this step processes (absent: the rest of its prompt), continuing after the KV it
    already holds; `decode_ids` are running requests whose decode token rides along in the
    same step.
    """

    request_ids: tuple[int, ...]
    group: tuple[int, ...]
    chunk_tokens: Mapping[int, int] = field(default_factory=lambda: MappingProxyType({}))
    decode_ids: tuple[int, ...] = ()

    def prefill_tokens(self, view: ClusterView) -> dict[int, int]:
        """Prompt tokens this step processes for each request."""
        waiting = view.waiting_by_id
        return {rid: self.chunk_tokens.get(rid, waiting[rid].remaining_prompt) for rid in self.request_ids}


@dataclass(frozen=True)
class KeepPlan:
    """Scale-down target of a prefill batch: for each request, `(rank, tokens)` pairs that
    cover its prompt in order with contiguous ranges."""

    ranges: Mapping[int, tuple[tuple[int, int], ...]]


@dataclass(frozen=True)
class DecodePlan:
    """The group that runs a decode batch (every KV holder, plus scale-up instances) and the
    master of each request."""

    group: tuple[int, ...]
    masters: Mapping[int, int]


@dataclass(frozen=True)
class Migration:
    """Move the last `tokens` KV tokens that instance `src` holds of a request onto `dst`."""

    request_id: int
    src: int
    dst: int
    tokens: int


@dataclass(frozen=True)
class PolicyOptions:
    """Knobs a bundle may read. Unknown policies ignore what they do not use."""

    max_prefill_tokens: int = 16384
    max_batch_size: int = 256
    extra: Mapping[str, Any] = field(default_factory=dict)


class SchedulingPolicy(ABC):
    """Which waiting requests start prefill now, on which idle instances."""

    def __init__(self, options: PolicyOptions) -> None:
        self.options = options

    @abstractmethod
    def dispatch(self, view: ClusterView) -> Dispatch: ...


class BatchingPolicy(ABC):
    """How dispatched requests split into prefill batches, and running ones into decode batches."""

    def __init__(self, options: PolicyOptions) -> None:
        self.options = options

    @abstractmethod
    def prefill_batches(self, view: ClusterView, dispatch: Dispatch) -> list[Batch]: ...

    @abstractmethod
    def decode_batches(self, view: ClusterView, instances: frozenset[int]) -> list[Batch]: ...


class ScalingPolicy(ABC):
    """Scale-down after prefill (keep plans) and scale-up of decode (groups and masters)."""

    def __init__(self, options: PolicyOptions) -> None:
        self.options = options

    @abstractmethod
    def keep_plan(self, view: ClusterView, batch: Batch) -> KeepPlan: ...

    @abstractmethod
    def decode_plan(self, view: ClusterView, batch: Batch) -> DecodePlan: ...

    def migrations(self, view: ClusterView) -> list[Migration]:
        """KV moves to run now between idle instances (to consolidate a request). None by default."""
        return []


@dataclass(frozen=True)
class PolicySet:
    """A named bundle of the three kinds, as `esp-run --policy NAME` selects it."""

    name: str
    scheduling: SchedulingPolicy
    batching: BatchingPolicy
    scaling: ScalingPolicy


PolicySetFactory = Callable[[PolicyOptions], PolicySet]
