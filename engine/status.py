"""What the engine reports about itself: its health and counters (read by `/health`, `/metrics`)."""
from __future__ import annotations

from dataclasses import dataclass


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
    """A snapshot: requests by state, KV slots per instance, and counters since start."""

    running: int
    waiting: int
    waiting_tokens: int
    kv_capacity: tuple[int, ...]
    kv_free: tuple[int, ...]
    restarts: int
    recomputed_requests: int
    rejected_overloaded: int
    schedule_seconds_total: float
