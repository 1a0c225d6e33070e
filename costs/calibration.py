"""Step times of LWM-7B on A800s calibrated to LoongServe's published measurements (DESIGN 7).

A roofline scales prefill as exactly 1/DoP and makes tensor parallelism free, so SP1TP8,
SP2TP4 and SP4TP2 all predict the same time and elasticity has nothing to exploit. The
paper measured otherwise (`PAPER_PREFILL`, `PAPER_DECODE`; sources in `docs/cost_model.md`).
`StepCosts` is a small physical model of one step on a group of `sp` instances of `tp` GPUs
(`g = sp * tp` GPUs), linear in its parameters so that the existing relative-error NNLS
(`cost_fit.nnls_relative`) fits it to the published step times:

prefill `T = a + b * sum(len) + c * sum(len^2)` with

    a = alpha * (1 + ALPHA_GROWTH * (sp - 1))      step overhead; grows with the group
    b = linear / g                                 GEMMs, split over all g GPUs
      + allreduce * (tp - 1) / tp / sp             TP: two all-reduces per layer per token
      + ring * (sp - 1) / sp / tp                  SP: KV blocks passed around the ring, not hidden
    c = attention / g                              attention FLOPs, split over all g GPUs
      + ring_attention * (sp - 1) / sp / g         SP: striped ring attention's lost efficiency

decode (the `"busiest"` basis of `CostModel`) `T = d0 + d1 * master_batch + d2 * holder_kv` with

    d0 = decode_overhead + group_comm * (g - 1) / g + seconds_per_byte * weight_bytes / tp
    d1 = linear / tp + allreduce * (tp - 1) / tp   the same per-token GEMM and all-reduce as prefill
    d2 = seconds_per_byte * kv_bytes_per_token / tp   each holder reads its own KV

`ALPHA_GROWTH` carries over only the *shape* of a public fit of the paper's Eq. 7 (SP1TP1
A=18.4 ms, SP8TP1 A=43.5 ms, on an unknown GPU and model): the published step times are far
too long for the constant to be told apart from the rest. Decode's HBM speed is the
datasheet bandwidth times `MEMORY_EFFICIENCY` (the published decode times do not separate
bandwidth from per-step overhead either); decode's per-token GEMM and all-reduce come from the
prefill fit. Only step times are fitted; nothing here looks at capacity or SLO results.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Sequence

import numpy as np

from esp.costs.cost_fit import nnls_relative
from esp.costs.cost_model import CostModel

if TYPE_CHECKING:
    from esp.costs.presets import Device, ModelShape

K = 1024  # "1K", "50K", "500K" tokens in the paper's workloads are taken as multiples of 1024
ALPHA_GROWTH = (43.5 / 18.4 - 1) / 7  # public Eq. 7 fit: A(SP8) / A(SP1) = 2.36, linear in sp
MEMORY_EFFICIENCY = 0.8  # achieved fraction of datasheet HBM bandwidth in decode (GEMV, paged KV reads)
TOLERANCE = 0.10  # every calibrated point within 10% of the published one


@dataclass(frozen=True)
class PrefillPoint:
    """A published prefill: `count` prompts of `length` tokens in one batch on SPxTP, in ms."""

    sp: int
    tp: int
    count: int
    length: int
    ms: float
    source: str

    @property
    def label(self) -> str:
        return f"prefill {self.count}x{_k(self.length)} SP{self.sp}TP{self.tp}"


@dataclass(frozen=True)
class DecodePoint:
    """A published decode step of `batch` requests with `context` KV tokens each, on SPxTP,
    between `lo_ms` and `hi_ms` (equal for a single measurement). Masters and KV are spread
    evenly over the `sp` instances, as in the paper's benchmark."""

    sp: int
    tp: int
    batch: int
    context: int
    lo_ms: float
    hi_ms: float
    source: str

    @property
    def ms(self) -> float:
        return (self.lo_ms + self.hi_ms) / 2

    @property
    def master_batch(self) -> int:
        return -(-self.batch // self.sp)

    @property
    def holder_kv(self) -> float:
        return self.batch * self.context / self.sp

    @property
    def label(self) -> str:
        return f"decode {self.batch}x{_k(self.context)} SP{self.sp}TP{self.tp}"


def _k(n: int) -> str:
    return f"{n // K}K" if n % K == 0 else str(n)


_TABLE = "LoongServe (arXiv 2404.09526), prefill of three batches at 8 GPUs, as quoted in issue 11"
_SOLO = "LoongServe (arXiv 2404.09526), one 1K-token prefill on one A800, as quoted in issue 11"
_DEC1 = "LoongServe (arXiv 2404.09526), one decode step on one A800 after a 1K prefill, as quoted in issue 11"
_DEC8 = ("LoongServe (arXiv 2404.09526), 'decode steps at 8 GPUs about 37-46 ms', as quoted in issue 11; "
         "taken as the decode step after each of the three 8-GPU prefill batches")
_WORKLOADS = ((512, 1 * K), (16, 50 * K), (1, 500 * K))
_MEASURED = {(1, 8): (7758, 19506, 51135), (2, 4): (5776, 16595, 51700), (4, 2): (5267, 15744, 53606)}

PAPER_PREFILL: tuple[PrefillPoint, ...] = (
    *(PrefillPoint(sp, tp, n, length, ms, _TABLE)
      for (sp, tp), row in _MEASURED.items() for (n, length), ms in zip(_WORKLOADS, row)),
    PrefillPoint(1, 1, 1, 1 * K, 68.9, _SOLO),
)
PAPER_DECODE: tuple[DecodePoint, ...] = (
    DecodePoint(1, 1, 1, 1 * K + 1, 13.0, 13.0, _DEC1),
    *(DecodePoint(sp, tp, n, length + 1, 37.0, 46.0, _DEC8) for sp, tp in _MEASURED for n, length in _WORKLOADS),
)


@dataclass(frozen=True)
class StepCosts:
    """The fitted physical parameters (seconds; see the module doc) for one model on one device."""

    alpha: float
    linear: float
    allreduce: float
    ring: float
    attention: float
    ring_attention: float
    decode_overhead: float
    group_comm: float
    seconds_per_byte: float
    weight_bytes: int
    kv_bytes_per_token: int

    def prefill(self, sp: int, tp: int) -> tuple[float, float, float]:
        """`(a, b, c)` of a prefill on `sp` instances of `tp` GPUs."""
        theta = self._prefill_theta()
        a, b, c = (prefill_features(sp, tp, s, q) @ theta for s, q in ((0, 0), (1, 0), (0, 1)))
        return float(a), float(b - a), float(c - a)

    def decode(self, sp: int, tp: int) -> tuple[float, float, float]:
        """`(d0, d1, d2)` of a decode step on `sp` instances of `tp` GPUs (the `"busiest"` basis)."""
        d0 = self.decode_overhead + self.group_comm * _comm(sp, tp) + self.seconds_per_byte * self.weight_bytes / tp
        d1 = self.linear / tp + self.allreduce * (tp - 1) / tp
        return d0, d1, self.seconds_per_byte * self.kv_bytes_per_token / tp

    def _prefill_theta(self) -> np.ndarray:
        return np.array([self.alpha, self.linear, self.allreduce, self.ring, self.attention, self.ring_attention])

    def prefill_ms(self, p: PrefillPoint) -> float:
        a, b, c = self.prefill(p.sp, p.tp)
        return 1e3 * (a + b * p.count * p.length + c * p.count * p.length ** 2)

    def decode_ms(self, p: DecodePoint) -> float:
        d0, d1, d2 = self.decode(p.sp, p.tp)
        return 1e3 * (d0 + d1 * p.master_batch + d2 * p.holder_kv)

    def cost_model(self, device: Device, tp: int, max_dop: int, name: str, meta: dict) -> CostModel:
        """A `CostModel` for instances of `tp` x `device`, groups of 1..`max_dop` instances."""
        prefill = {sp: self.prefill(sp, tp) for sp in range(1, max_dop + 1)}
        decode = {sp: self.decode(sp, tp) for sp in range(1, max_dop + 1)}
        return CostModel(prefill, decode, 2e-5, device.link_bytes_per_s * tp, self.kv_bytes_per_token, name, meta,
                         "busiest")


def prefill_features(sp: int, tp: int, tokens: float, squares: float) -> np.ndarray:
    """The prefill model's terms for a batch with these sums (one row of the fit)."""
    g = sp * tp
    return np.array([1 + ALPHA_GROWTH * (sp - 1), tokens / g, tokens * (tp - 1) / tp / sp,
                     tokens * (sp - 1) / sp / tp, squares / g, squares * (sp - 1) / sp / g])


def _comm(sp: int, tp: int) -> float:
    g = sp * tp
    return (g - 1) / g


def calibrate(model: ModelShape, device: Device, prefill: Sequence[PrefillPoint] = PAPER_PREFILL,
              decode: Sequence[DecodePoint] = PAPER_DECODE,
              memory_efficiency: float = MEMORY_EFFICIENCY) -> StepCosts:
    """Fit `StepCosts` to published step times: prefill first (six terms), then decode's two
    free terms with its HBM, GEMM and all-reduce terms fixed (see the module doc)."""
    if len(prefill) < 6 or len(decode) < 2:
        raise ValueError("the calibration needs at least 6 prefill and 2 decode points")
    rows = np.array([prefill_features(p.sp, p.tp, p.count * p.length, p.count * p.length ** 2) for p in prefill])
    theta = nnls_relative(rows, np.array([p.ms / 1e3 for p in prefill]))
    alpha, linear, allreduce, ring, attention, ring_attention = (float(v) for v in theta)
    spb = 1.0 / (device.hbm_bytes_per_s * memory_efficiency)
    weight_bytes = model.matmul_params * model.dtype_bytes  # read once per decode step
    partial = StepCosts(alpha, linear, allreduce, ring, attention, ring_attention, 0.0, 0.0, spb, weight_bytes,
                        model.kv_bytes_per_token)
    known = np.array([partial.decode_ms(p) / 1e3 for p in decode])
    feats = np.array([[1.0, _comm(p.sp, p.tp)] for p in decode])
    overhead, comm = (float(v) for v in nnls_relative(feats, np.array([p.ms / 1e3 for p in decode]), known))
    return StepCosts(alpha, linear, allreduce, ring, attention, ring_attention, overhead, comm, spb, weight_bytes,
                     model.kv_bytes_per_token)


def report(costs: StepCosts, prefill: Sequence[PrefillPoint] = PAPER_PREFILL,
           decode: Sequence[DecodePoint] = PAPER_DECODE) -> list[dict]:
    """Each point: `label`, published `lo_ms`/`hi_ms`, `predicted_ms`, relative `error` to the
    nearest published value (0 inside a published range)."""
    out = []
    for p in prefill:
        pred = costs.prefill_ms(p)
        out.append({"label": p.label, "lo_ms": p.ms, "hi_ms": p.ms, "predicted_ms": pred,
                    "error": (pred - p.ms) / p.ms, "source": p.source})
    for p in decode:
        pred = costs.decode_ms(p)
        nearest = min(max(pred, p.lo_ms), p.hi_ms)
        out.append({"label": p.label, "lo_ms": p.lo_ms, "hi_ms": p.hi_ms, "predicted_ms": pred,
                    "error": (pred - nearest) / nearest, "source": p.source})
    return out


@lru_cache(maxsize=None)
def a800_lwm7b() -> StepCosts:
    """The calibration behind the `a800-lwm7b-tp{1,2,4,8}` presets (computed once)."""
    from esp.costs.presets import A800_80GB, LWM_7B
    return calibrate(LWM_7B, A800_80GB)


def markdown_table(costs: StepCosts) -> str:
    """The calibrated points beside the published ones, as `docs/cost_model.md` shows them."""
    lines = ["| point | published (ms) | calibrated (ms) | error |", "|---|---|---|---|"]
    for row in report(costs):
        ranged = row["lo_ms"] != row["hi_ms"]
        pub = f"{row['lo_ms']:g}-{row['hi_ms']:g}" if ranged else f"{row['lo_ms']:g}"
        err = "inside" if ranged and row["error"] == 0 else f"{100 * row['error']:+.1f}%"
        lines.append(f"| {row['label']} | {pub} | {row['predicted_ms']:.1f} | {err} |")
    return "\n".join(lines)


def main() -> None:
    """`python -m esp.costs.calibration`: the fitted parameters, the points, and the coefficients per (sp, tp)."""
    costs = a800_lwm7b()
    print("# A800 x LWM-7B step-time calibration (seconds)")
    for key, value in vars(costs).items():
        print(f"{key:>16s} = {value:.6g}")
    print()
    print(markdown_table(costs))
    print()
    print("| SPxTP | a (ms) | b (us/token) | c (ps/token^2) | d0 (ms) | d1 (us/request) | d2 (ns/KV token) |")
    print("|---|---|---|---|---|---|---|")
    for tp in (1, 2, 4, 8):
        for sp in (1, 2, 4, 8):
            if sp * tp > 8:
                continue
            a, b, c = costs.prefill(sp, tp)
            d0, d1, d2 = costs.decode(sp, tp)
            print(f"| SP{sp}TP{tp} | {a * 1e3:.2f} | {b * 1e6:.3f} | {c * 1e12:.1f} | {d0 * 1e3:.2f} | "
                  f"{d1 * 1e6:.2f} | {d2 * 1e9:.3f} |")
    worst = max(abs(r["error"]) for r in report(costs))
    print(f"\nworst error {100 * worst:.1f}% (tolerance {100 * TOLERANCE:.0f}%)")
    if not math.isfinite(worst) or worst > TOLERANCE:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
