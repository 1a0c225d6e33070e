"""Admission control (DESIGN 9): what the engine checks before a request joins the waiting
queue. A request that can never run is refused as invalid; one that would overfill the
queue is refused as overloaded, with the queue's predicted drain time as `retry_after`."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

from esp.engine.errors import InvalidRequest, Overloaded
from esp.engine.sampling_params import SamplingParams
from esp.costs.cost_model import CostModel

MAX_RETRY_AFTER_S = 600.0


@dataclass(frozen=True)
class EncodedPrompt:
    """Token ids the engine has already checked (from `Engine.encode`): `generate` takes them
    without checking again."""

    ids: Sequence[int]

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class Limits:
    """`context`: the model's context length; `kv_slots`: KV slots of all instances together;
    `waiting_requests` / `waiting_tokens` bound the queue (None: unbounded)."""

    context: int
    kv_slots: int
    waiting_requests: int | None
    waiting_tokens: int | None

    @property
    def max_model_len(self) -> int:
        return min(self.context, self.kv_slots)


def check_fits(limits: Limits, prompt_len: int, params: SamplingParams) -> None:
    """A request whose prompt plus `max_tokens` exceeds the context or the cluster's KV can never
    finish: refuse it up front rather than hold every pool and fail later."""
    need = prompt_len + params.max_tokens
    if need > limits.context:
        raise InvalidRequest(f"this model's maximum context length is {limits.context} tokens, but {prompt_len} "
                             f"prompt tokens plus max_tokens={params.max_tokens} were requested",
                             _at_fault(prompt_len, limits.context))
    if need > limits.kv_slots:
        raise InvalidRequest(f"{prompt_len} prompt tokens plus max_tokens={params.max_tokens} need {need} KV "
                             f"slots, but all instances together hold {limits.kv_slots}",
                             _at_fault(prompt_len, limits.kv_slots))


def _at_fault(prompt_len: int, limit: int) -> str:
    return "prompt" if prompt_len >= limit else "max_tokens"


def check_queue(limits: Limits, count: int, tokens: int, prompt_len: int, lengths: Callable[[], Sequence[int]],
                cost: CostModel | None, instances: int) -> None:
    """`count` requests with `tokens` prompt tokens are queued; `lengths()` gives their prompt
    lengths (read only to price a refusal). An empty queue always takes a request that fits."""
    if not count:
        return
    full = None
    if limits.waiting_requests is not None and count >= limits.waiting_requests:
        full = f"{count} requests are waiting (limit {limits.waiting_requests})"
    elif limits.waiting_tokens is not None and tokens + prompt_len > limits.waiting_tokens:
        full = f"{tokens} prompt tokens are waiting (limit {limits.waiting_tokens})"
    if full:
        raise Overloaded(f"the server is overloaded: {full}; retry later", drain_time(lengths(), cost, instances))


def drain_time(waiting: Sequence[int], cost: CostModel | None, instances: int) -> float:
    """Seconds until the queue's prompts are prefilled, by the cost model (at least 1 s)."""
    if cost is None:
        return 1.0
    seconds = cost.prefill_time(list(waiting), instances)
    return min(MAX_RETRY_AFTER_S, max(1.0, math.ceil(seconds)))
