"""The simulator backend (DESIGN 7): the same Engine, Scheduler and policies, with step times
from a `CostModel` and a virtual clock, no worker processes and no model.

`run_virtual(coro)` runs a coroutine on an event loop whose clock jumps to the next timer
whenever nothing is ready, so `asyncio.sleep(step_time)` costs no wall time and a replay is
deterministic. Simulated requests have no EOS: each runs to its `max_tokens`.
"""
from __future__ import annotations

import asyncio
import selectors
from bisect import bisect_left
from collections import Counter
from itertools import accumulate
from functools import singledispatch
from typing import Awaitable, Sequence, TypeVar

from esp.engine.backend import StepResult
from esp.engine.protocol import DecodeBatch, MigrateKV, MixedBatch, PrefillBatch, Step
from esp.costs.cost_model import CostModel

T = TypeVar("T")
SIM_TOKEN = 0


class _JumpingSelector:
    """Wraps the loop's selector: a wait for the next timer advances virtual time instead.

    Nothing real happens in virtual time but thread wake-ups and signals through the loop's
    self-pipe, so while callbacks or timers are due the real selector is polled only every
    `POLL_EVERY` iterations (a syscall per iteration was a twentieth of a replay); with nothing
    scheduled at all, it blocks as usual."""

    POLL_EVERY = 256

    def __init__(self, selector: selectors.BaseSelector, loop: VirtualClockLoop) -> None:
        self._selector, self._loop = selector, loop
        self._skipped = 0

    def select(self, timeout: float | None = None):
        if timeout is None:
            return self._selector.select(None)
        if timeout > 0:
            self._loop.advance(timeout)
        self._skipped += 1
        if self._skipped < self.POLL_EVERY:
            return []
        self._skipped = 0
        return self._selector.select(0)

    def __getattr__(self, name: str):
        return getattr(self._selector, name)


class VirtualClockLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        super().__init__()
        self._now = 0.0
        self._selector = _JumpingSelector(self._selector, self)

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        """Jump to the earliest timer exactly (adding `seconds` could stop a rounding error
        short of it, and the loop would spin there)."""
        due = self._scheduled[0].when() if self._scheduled else self._now + seconds
        self._now = max(self._now + seconds, due) if due - self._now <= seconds else self._now + seconds


def run_virtual(main: Awaitable[T]) -> T:
    """Run `main` to completion on a fresh virtual-clock loop (time starts at 0)."""
    loop = VirtualClockLoop()
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(main)
    finally:
        asyncio.set_event_loop(None)
        loop.close()


@singledispatch
def step_time(step: object, cost: CostModel) -> float:
    raise TypeError(f"the simulator cannot time a {type(step).__name__}")


@step_time.register
def _(step: PrefillBatch, cost: CostModel) -> float:
    return cost.prefill_time([len(s.token_ids) for s in step.seqs], len(step.group))


@step_time.register
def _(step: MixedBatch, cost: CostModel) -> float:
    return cost.chunked_time([(s.start, len(s.token_ids)) for s in step.seqs], len(step.decode),
                             step.decode.kv_tokens())


def iteration_times(step: DecodeBatch, cost: CostModel) -> list[float]:
    """Predicted time of each iteration of a (multi-step) decode batch; the KV grows by one
    token per request per iteration, on the request's master. A step waits for its busiest
    master (requests it runs the FFN for) and its busiest holder (KV tokens it reads); the step
    names each row's holders, not their token counts, so a row's KV is taken as split evenly
    over its holders."""
    rows = step.rows
    batch, kv, dop = len(rows), rows.kv_tokens(), len(step.group)
    if dop == 1 or cost.decode_basis == "total":
        return [cost.decode_time(batch, kv + k * batch, dop) for k in range(step.steps)]
    by_mask: dict[int, int] = {}
    for mask, position in zip(rows.holders, rows.positions):
        by_mask[mask] = by_mask.get(mask, 0) + position + 1
    load: dict[int, float] = {}
    for mask, tokens in by_mask.items():
        ranks = [r for r in range(mask.bit_length()) if mask >> r & 1]
        for r in ranks:
            load[r] = load.get(r, 0.0) + tokens / len(ranks)
    masters = Counter(rows.masters)
    for r in masters:
        load.setdefault(r, 0.0)
    master_batch = max(masters.values())
    return [cost.decode_time(batch, kv + k * batch, dop, master_batch=master_batch,
                             holder_kv=max(tokens + k * masters.get(r, 0) for r, tokens in load.items()))
            for k in range(step.steps)]


@step_time.register
def _(step: DecodeBatch, cost: CostModel) -> float:
    return sum(iteration_times(step, cost))


@step_time.register
def _(step: MigrateKV, cost: CostModel) -> float:
    return cost.migration_time(len(step.src_slots))


@singledispatch
def sampled_ids(step: object) -> list[int]:
    return []


@sampled_ids.register
def _(step: PrefillBatch) -> list[int]:
    return [s.request_id for s in step.seqs]


@sampled_ids.register
def _(step: MixedBatch) -> list[int]:
    return [s.request_id for s in step.seqs if s.sample is not None] + list(step.decode.request_ids)


@sampled_ids.register
def _(step: DecodeBatch) -> list[int]:
    return list(step.rows.request_ids)


class SyntheticPrompt(Sequence[int]):
    """A prompt of `length` copies of one token id, never materialized: the simulator needs only
    lengths, and a trace's 500K-token prompts would otherwise cost 4 MB of list each."""

    def __init__(self, length: int, token_id: int = SIM_TOKEN) -> None:
        if length < 1:
            raise ValueError("prompt must have at least one token")
        self.length, self.token_id = length, token_id

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index):
        if isinstance(index, slice):
            return SyntheticPrompt(len(range(*index.indices(self.length))) or 1, self.token_id)
        if not -self.length <= index < self.length:
            raise IndexError(index)
        return self.token_id

    def __add__(self, other: Sequence[int]) -> SyntheticPrompt:
        return SyntheticPrompt(self.length + len(other), self.token_id)


def _set_result(future: asyncio.Future, value: object) -> None:
    if not future.done():
        future.set_result(value)


class _Round:
    """A multi-step round in flight: `done` resolves to the iterations it ran, at the end of
    its last iteration (all of them, or the one in progress when `cut`)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, ends: list[float]) -> None:
        self.loop, self.ends, self.start = loop, ends, loop.time()
        self.done = loop.create_future()
        self._timer = loop.call_at(self.start + ends[-1], _set_result, self.done, len(ends))

    def cut(self) -> None:
        """End after the iteration in progress."""
        iterations = min(len(self.ends), bisect_left(self.ends, self.loop.time() - self.start) + 1)
        if iterations < len(self.ends):
            self._timer.cancel()
            self._timer = self.loop.call_at(self.start + self.ends[iterations - 1], _set_result, self.done,
                                            iterations)

    def cancel(self) -> None:
        self._timer.cancel()


class SimBackend:
    """Stands where `WorkerGroup` stands: `run(step)` sleeps the predicted step time on the
    loop's clock and returns a token for every request the step samples.

    A multi-step decode round ends early, after the iteration in progress, when `new_work()`
    reports a new request: multi-step decode saves the simulator scheduling rounds without
    holding a new request back for the rest of a round."""

    def __init__(self, kv_slots: list[int], cost: CostModel, max_model_len: int = 0) -> None:
        self.kv_slots, self.cost = kv_slots, cost
        self.tokenizer = SimTokenizer()
        self.max_model_len = max_model_len or int(cost.meta.get("max_context") or 0)
        self.dead: str | None = None
        self.on_failure = None
        self.on_tokens = None
        self._rounds: list[_Round] = []  # rounds in flight, cut by an arrival

    @classmethod
    def for_config(cls, config, model, cost: CostModel) -> SimBackend:
        slots = config.kv_tokens_per_instance or cost.meta.get("kv_tokens_per_instance")
        if not slots:
            raise ValueError(f"the sim backend needs --kv-tokens-per-instance: profile {cost.name} "
                             f"does not give the instances' KV capacity")
        return cls([int(slots)] * config.instances, cost,
                    int(cost.meta.get("max_context") or model.max_position_embeddings))

    async def start(self) -> None:
        return None

    async def restart(self) -> None:
        return None

    def new_work(self) -> None:
        for round_ in self._rounds:
            round_.cut()
        self._rounds = []

    async def run(self, step: Step) -> StepResult:
        if isinstance(step, DecodeBatch) and step.steps > 1:
            return await self._round(step)
        seconds = step_time(step, self.cost)
        await asyncio.sleep(seconds)
        return StepResult(step.step_id, dict.fromkeys(sampled_ids(step), SIM_TOKEN), seconds, 0.0)

    async def _round(self, step: DecodeBatch) -> StepResult:
        round_ = _Round(asyncio.get_running_loop(), list(accumulate(iteration_times(step, self.cost))))
        self._rounds.append(round_)
        try:
            done = await round_.done
        finally:
            round_.cancel()
        return StepResult(step.step_id, dict.fromkeys(sampled_ids(step), [SIM_TOKEN] * done), round_.ends[done - 1],
                          0.0, iterations=done)

    def end_round(self, step_id: int) -> None:
        """Simulated rounds report their tokens at the end; only arrivals end them early."""

    async def shutdown(self) -> None:
        return None


class _NoText:
    def step(self, ids: list[int]) -> str:
        return ""

    def flush(self) -> str:
        return ""


class SimTokenizer:
    """No vocabulary: prompts are token ids, outputs carry ids and no text, nothing is EOS."""

    eos_token_ids: frozenset[int] = frozenset()

    def encode(self, text: str) -> list[int]:
        raise ValueError("the sim backend takes token-id prompts, not text")

    def detokenizer(self, prompt_ids: list[int]) -> _NoText:
        return _NoText()
