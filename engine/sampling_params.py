"""Per-request generation parameters, validated once at the edge."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop.

    `temperature == 0` is greedy. `top_k <= 0` and `top_p == 1` disable those filters.
    `seed` makes sampling reproducible: the k-th output token is drawn from a generator
    seeded by `(seed, k)`, so it does not depend on which instance samples it.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    ignore_eos: bool = False
    stop: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        _check(isinstance(self.max_tokens, int) and not isinstance(self.max_tokens, bool),
               "max_tokens must be an integer")
        _check(self.max_tokens >= 1, f"max_tokens must be at least 1, got {self.max_tokens}")
        _check(_is_number(self.temperature) and self.temperature >= 0,
               f"temperature must be a number >= 0, got {self.temperature!r}")
        _check(_is_number(self.top_p) and 0 < self.top_p <= 1,
               f"top_p must be in (0, 1], got {self.top_p!r}")
        _check(isinstance(self.top_k, int) and not isinstance(self.top_k, bool),
               f"top_k must be an integer, got {self.top_k!r}")
        _check(self.seed is None or (isinstance(self.seed, int) and not isinstance(self.seed, bool)),
               f"seed must be an integer, got {self.seed!r}")
        _check(isinstance(self.ignore_eos, bool), "ignore_eos must be a boolean")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        _check(isinstance(stop, (tuple, list)) and all(isinstance(s, str) and s for s in stop),
               "stop must be a non-empty string or a list of non-empty strings")
        _check(len(stop) <= 16, "at most 16 stop strings")
        object.__setattr__(self, "stop", tuple(stop))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
