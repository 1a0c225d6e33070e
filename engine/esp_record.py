"""What ESP did with one request (`usage.esp`): typed events that the scheduler plans with a
step and adds to the request's record when the step completes, rendered as JSON only for the
response."""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class PrefillPlacement:
    """A prefill step of the request (or a chunk of its prompt, `chunk` = `(start, end)`): the
    group that ran it and the tokens of it each instance kept, `(rank, tokens)` in position order."""

    group: tuple[int, ...]
    keep: tuple[tuple[int, int], ...]
    chunk: tuple[int, int] | None = None

    def keep_plan(self) -> dict[str, int]:
        return {str(rank): n for rank, n in self.keep}


@dataclass(frozen=True)
class ScaleUpEvent:
    """A decode master that held none of the request's KV took it on from token `at_token`."""

    rank: int
    at_token: int

    def to_dict(self) -> dict:
        return {"kind": "scale_up", "rank": self.rank, "at_token": self.at_token}


@dataclass(frozen=True)
class MigrationEvent:
    """The last `tokens` of the request's KV moved from instance `src` to `dst`."""

    src: int
    dst: int
    tokens: int

    def to_dict(self) -> dict:
        return {"kind": "migrate", "src": self.src, "dst": self.dst, "tokens": self.tokens}


EspEvent = PrefillPlacement | ScaleUpEvent | MigrationEvent


@dataclass
class EspRecord:
    """A request's ESP history, filled in as its steps complete."""

    prefill: list[PrefillPlacement] = field(default_factory=list)
    decode_groups: Counter = field(default_factory=Counter)
    masters: Counter = field(default_factory=Counter)
    scale_events: list[ScaleUpEvent | MigrationEvent] = field(default_factory=list)
    preemptions: int = 0

    def record(self, events: Iterable[EspEvent]) -> None:
        """Add a completed step's events."""
        for event in events:
            (self.prefill if isinstance(event, PrefillPlacement) else self.scale_events).append(event)

    def summary(self, recomputed: int) -> dict:
        """`usage.esp`: the last prefill's group and keep plan, decode groups and masters (tokens
        each), scale events, preemptions and recomputations."""
        last = self.prefill[-1] if self.prefill else None
        return {"prefill_group": list(last.group) if last else None, "keep_plan": last.keep_plan() if last else None,
                "decode_groups": {",".join(map(str, g)): n for g, n in self.decode_groups.items()},
                "masters": {str(m): n for m, n in self.masters.items()},
                "scale_events": [e.to_dict() for e in self.scale_events],
                "preemptions": self.preemptions, "recomputed": recomputed}
