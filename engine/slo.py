"""A client's latency targets for one request (the body's optional `slo`), and how it did."""
from __future__ import annotations

import math
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
