"""A client's latency targets for one request (the body's optional `slo`), the targets a server
holds requests to that bring none (`ServiceSLO`), and how a request did."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from esp.engine.errors import InvalidRequest
from esp.engine.outputs import Timing


@dataclass(frozen=True)
class LatencySLO:
    """Targets in seconds for the time to first token and the time per output token; either may
    be None. Schedulers may use them (`RequestView.ttft_slo_s` / `tpot_slo_s`); the finished
    request reports them with attainment in `usage.esp.slo`."""

    ttft_s: float | None = None
    tpot_s: float | None = None

    def __post_init__(self) -> None:
        for name, value in (("ttft", self.ttft_s), ("tpot", self.tpot_s)):
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise InvalidRequest(f"slo.{name}_ms must be a positive number, got {value!r}", f"slo.{name}_ms")

    @classmethod
    def from_ms(cls, ttft_ms: float | None = None, tpot_ms: float | None = None) -> LatencySLO | None:
        if ttft_ms is None and tpot_ms is None:
            return None
        return cls(None if ttft_ms is None else ttft_ms / 1e3, None if tpot_ms is None else tpot_ms / 1e3)

    def report(self, timing: Timing) -> dict:
        """`{ttft_ms, tpot_ms, ttft_met, tpot_met}`: a target not given, or a latency not measured
        (no token; one output token has no TPOT), reports None."""
        def met(target: float | None, got: float | None) -> bool | None:
            return None if target is None or got is None else got <= target
        return {"ttft_ms": None if self.ttft_s is None else self.ttft_s * 1e3,
                "tpot_ms": None if self.tpot_s is None else self.tpot_s * 1e3,
                "ttft_met": met(self.ttft_s, timing.ttft_s), "tpot_met": met(self.tpot_s, timing.tpot_s)}


def length_aware_ttft(prompt_len: int, scale: float | None, floor_s: float,
                      predict_prefill: Callable[[int], float] | None) -> float | None:
    """max(`floor_s`, `scale` x the predicted prefill of the prompt alone): LoongServe's and
    DistServe's length-aware TTFT target; `floor_s` alone without a scale or a predictor, None
    when that is 0 too."""
    if scale is None or predict_prefill is None:
        return floor_s or None
    return max(floor_s, scale * float(predict_prefill(prompt_len)))


@dataclass(frozen=True)
class ServiceSLO:
    """The latency targets of a server (`EngineConfig.slo`): TTFT <= max(`ttft_floor_s`,
    `ttft_scale` x the predicted prefill of the prompt alone on one instance) and TPOT <= `tpot_s`
    (None: no such target). A request's own `slo` replaces them field by field; the scheduler sees
    the result as the request's targets, and `usage.esp.slo` reports it."""

    ttft_scale: float | None = None
    ttft_floor_s: float = 0.0
    tpot_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("ttft_scale", "tpot_s"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"slo {name} must be a positive number, got {value!r}")
        if not (math.isfinite(self.ttft_floor_s) and self.ttft_floor_s >= 0):
            raise ValueError(f"slo ttft_floor_s must be at least 0, got {self.ttft_floor_s!r}")

    def for_request(self, prompt_len: int, predict_prefill: Callable[[int], float],
                    own: LatencySLO | None = None) -> LatencySLO | None:
        """The targets of a request of `prompt_len` tokens that asked for `own`."""
        ttft = own.ttft_s if own is not None and own.ttft_s is not None else \
            length_aware_ttft(prompt_len, self.ttft_scale, self.ttft_floor_s, predict_prefill)
        tpot = own.tpot_s if own is not None and own.tpot_s is not None else self.tpot_s
        return None if ttft is None and tpot is None else LatencySLO(ttft, tpot)
