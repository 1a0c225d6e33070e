"""The one interface between the engine and whatever executes its steps (DESIGN 3).

`WorkerGroup` (real worker processes) and `SimBackend` (cost model and virtual clock) both
satisfy `Backend`; `create_backend` picks one from the config, once, so the engine never
asks which it has. This module imports neither: the simulator never loads the worker stack.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Protocol

from esp.engine.protocol import Step

if TYPE_CHECKING:
    from esp.engine.config import EngineConfig
    from esp.engine.model_config import ModelConfig
    from esp.costs.cost_model import CostModel


class BackendError(RuntimeError):
    """A step, or the backend as a whole, failed (a worker raised or died)."""


@dataclass(frozen=True)
class StepResult:
    """A whole group's answer to one step: tokens by request, requests that failed alone in it
    (e.g. sampling; the step's other requests are fine), the slowest member's times, and the
    iterations a multi-step round ran. `sampled` holds what `on_tokens` has not delivered: a
    token per request, or a list of them for a round that streamed nothing."""

    step_id: int
    sampled: dict[int, int | list[int]]
    compute_s: float
    comm_s: float
    failed: dict[int, str] = field(default_factory=dict)
    iterations: int = 1


class Backend(Protocol):
    """`kv_slots`, `tokenizer` and `max_model_len` are known after `start()`. `dead` is None
    while healthy, else why it failed; `on_failure(reason)` is called once when it fails
    between or during steps, and `restart()` brings up a fresh one with empty KV pools.
    A backend may stream the tokens of a multi-step round's iterations to
    `on_tokens(step_id, {request: token})` before the round's `StepResult`; `new_work()` (a
    request arrived) and `end_round(step_id)` ask rounds to end after the iteration in
    progress."""

    kv_slots: list[int]
    tokenizer: object
    max_model_len: int
    dead: str | None
    on_failure: Callable[[str], None] | None
    on_tokens: Callable[[int, dict[int, int]], None] | None

    async def start(self) -> None: ...

    async def restart(self) -> None: ...

    async def run(self, step: Step) -> StepResult: ...

    def new_work(self) -> None: ...

    def end_round(self, step_id: int) -> None: ...

    async def shutdown(self) -> None: ...


def create_backend(config: EngineConfig, model: ModelConfig, cost: CostModel) -> Backend:
    if config.backend == "sim":
        from esp.engine.sim import SimBackend
        return SimBackend.for_config(config, model, cost)
    from esp.engine.workers import WorkerGroup
    return WorkerGroup.for_config(config, model)
