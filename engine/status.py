"""What the engine reports about itself: its health and counters (read by `/health`, `/metrics`)."""
from __future__ import annotations

from dataclasses import dataclass

#: upper bounds (seconds) of the buckets of `EngineStats.schedule_buckets`; the last counts the rest
SCHEDULE_BUCKETS = (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


@dataclass(frozen=True)
class Health:
    """`status`: starting, ok, recovering (workers restarting), draining (shutting down) or down.
    `retry_after`: seconds after which trying again may help; None when it will not."""

    status: str
    detail: str | None = None
    retry_after: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True)
class EngineStats:
    """A snapshot: requests by state, KV slots per instance, and counters since start.
    `schedule_buckets`: how many `schedule()` calls took at most each of `SCHEDULE_BUCKETS`
    (not cumulative; one more entry for the slower ones)."""

    running: int
    waiting: int
    waiting_tokens: int
    kv_capacity: tuple[int, ...]
    kv_free: tuple[int, ...]
    restarts: int
    recomputed_requests: int
    rejected_overloaded: int
    schedule_seconds_total: float
    schedule_buckets: tuple[int, ...] = (0,) * (len(SCHEDULE_BUCKETS) + 1)
