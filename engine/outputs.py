"""What a request yields to its caller, step by step."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Timing:
    """Seconds since the request arrived: time to first token, per output token, end to end, and
    the time it waited before its first prefill was scheduled."""

    ttft_s: float | None
    tpot_s: float | None
    e2e_s: float | None
    queue_s: float | None = None


@dataclass(frozen=True)
class RequestOutput:
    """A delta (`new_token_ids`, `new_text`) plus the running totals.

    `finish_reason` is None while running, else "stop" (EOS or a stop string), "length",
    "abort" or "error" (then `error` says why).
    """

    request_id: str
    new_token_ids: list[int]
    new_text: str
    token_ids: list[int]
    text: str
    prompt_tokens: int
    finish_reason: str | None = None
    error: str | None = None
    timing: Timing | None = None
    esp: dict = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)
