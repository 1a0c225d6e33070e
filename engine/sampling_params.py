"""Per-request generation parameters, validated once at the edge."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from esp.engine.errors import InvalidRequest

MIN_TEMPERATURE = 1e-3
MAX_TEMPERATURE = 100.0
MAX_INT32 = 2**31 - 1
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 1024


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop.

    `temperature == 0` is greedy; otherwise it lies in [1e-3, 100], where float64 sampling
    stays finite. `top_k <= 0` and `top_p == 1` disable those filters. `seed` (an int64) makes
    sampling reproducible: the k-th output token is drawn from a generator seeded by
    `(seed, k)`, so it does not depend on which instance samples it. Every error is an
    `InvalidRequest` naming its field.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    ignore_eos: bool = False
    stop: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        _check(_is_int(self.max_tokens) and 1 <= self.max_tokens <= MAX_INT32,
               f"max_tokens must be an integer in [1, {MAX_INT32}], got {_show(self.max_tokens)}", "max_tokens")
        t = self.temperature
        _check(_is_number(t) and (t == 0 or MIN_TEMPERATURE <= t <= MAX_TEMPERATURE),
               f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE:g}], got {_show(t)}",
               "temperature")
        _check(_is_number(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {_show(self.top_p)}",
               "top_p")
        _check(_is_int(self.top_k) and -1 <= self.top_k <= MAX_INT32,
               f"top_k must be an integer in [-1, {MAX_INT32}] (<= 0 disables), got {_show(self.top_k)}", "top_k")
        _check(self.seed is None or (_is_int(self.seed) and -2**63 <= self.seed < 2**63),
               f"seed must be a 64-bit integer, got {_show(self.seed)}", "seed")
        _check(isinstance(self.ignore_eos, bool), "ignore_eos must be a boolean", "ignore_eos")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        _check(isinstance(stop, (tuple, list)) and all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS
                                                       for s in stop),
               f"stop must be a string or a list of strings of 1 to {MAX_STOP_CHARS} characters", "stop")
        _check(len(stop) <= MAX_STOP_STRINGS, f"at most {MAX_STOP_STRINGS} stop strings", "stop")
        _check(all(_is_unicode(s) for s in stop), "stop strings must be valid Unicode", "stop")
        object.__setattr__(self, "stop", tuple(stop))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    if isinstance(x, int) and not isinstance(x, bool):
        return abs(x) < 2**64
    return isinstance(x, float) and math.isfinite(x)


def _is_unicode(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _show(x: object) -> str:
    if isinstance(x, int) and x.bit_length() > 128:
        return f"an integer of {x.bit_length()} bits"
    text = repr(x)
    return text if len(text) <= 40 else text[:37] + "..."


def _check(ok: bool, message: str, param: str) -> None:
    if not ok:
        raise InvalidRequest(message, param)
