"""Step-time predictions (DESIGN 7): what the engine, simulator, profiler and policies all read.

Prefill of a batch on a group of `dop` instances: `T = a + b*sum(len) + c*sum(len^2)` with
coefficients per group size (the paper's Eq. 7). Decode, per group size, `d0 + d1*B + d2*K`
where, by `decode_basis`:

- `"total"` (profiles fitted by `esp-run profile`, older JSON): `B` is the batch size and `K`
  the KV tokens of the whole batch;
- `"busiest"` (the roofline and the calibrated presets): `B` is the batch of the busiest
  master (the FFN and projections are split across masters) and `K` the KV tokens on the
  busiest holder (a decode step waits for its slowest member; KV is not assumed evenly
  spread). Callers that do not know them get the even spread.

Transfer: `latency + bytes / bandwidth`. An instance is `tp` devices running tensor
parallelism (`meta["tp"]`); the coefficients already include what TP costs (its all-reduces).
Coefficients come from a profile (JSON), a roofline computed from the model's shape and the
device's speeds, or the calibrated presets (`esp.costs.calibration`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

Coefficients = tuple[float, float, float]
DECODE_BASES = ("total", "busiest")


@dataclass(frozen=True)
class CostModel:
    prefill: Mapping[int, Coefficients]
    decode: Mapping[int, Coefficients]
    transfer_latency_s: float
    transfer_bytes_per_s: float
    kv_bytes_per_token: int
    name: str = "custom"
    meta: Mapping[str, object] = field(default_factory=dict)
    decode_basis: str = "total"

    def __post_init__(self) -> None:
        if self.decode_basis not in DECODE_BASES:
            raise ValueError(f"decode_basis must be one of {DECODE_BASES}, got {self.decode_basis!r}")
        if not self.prefill or not self.decode:
            raise ValueError("a cost model needs prefill and decode coefficients for at least one group size")

    @property
    def tp(self) -> int:
        """Devices per instance (tensor parallelism inside it)."""
        return int(self.meta.get("tp", 1))

    def prefill_coefficients(self, dop: int) -> Coefficients:
        """`(a, b, c)` of a prefill on `dop` instances. Past the table, `b` and `c` shrink as 1/dop
        from the largest measured group size (an optimistic extrapolation)."""
        table = self.prefill
        if dop in table:
            return table[dop]
        base = max((d for d in table if d <= dop), default=min(table))
        a, b, c = table[base]
        return a, b * base / dop, c * base / dop

    def decode_coefficients(self, dop: int) -> Coefficients:
        """`(d0, d1, d2)` of a decode step on `dop` instances (see `decode_basis`)."""
        table = self.decode
        if dop in table:
            return table[dop]
        base = max((d for d in table if d <= dop), default=min(table))
        d0, d1, d2 = table[base]
        if self.decode_basis == "busiest":  # per-master and per-holder terms do not shrink with dop
            return d0, d1, d2
        return d0, d1 * base / dop, d2 * base / dop

    def prefill_time(self, lengths: Sequence[int], dop: int = 1) -> float:
        """Seconds for one prefill batch of these prompt lengths on `dop` instances."""
        return self.prefill_time_of_sums(sum(lengths), sum(n * n for n in lengths), len(lengths), dop)

    def prefill_time_of_sums(self, tokens: int, squares: int, count: int, dop: int = 1) -> float:
        """`prefill_time` from the batch's sum of lengths and sum of squared lengths."""
        if count == 0:
            return 0.0
        a, b, c = self.prefill_coefficients(dop)
        return a + b * tokens + c * squares

    def decode_time(self, batch_size: int, kv_tokens: int, dop: int = 1, *, master_batch: int | None = None,
                    holder_kv: float | None = None) -> float:
        """Seconds for one decode step of `batch_size` requests holding `kv_tokens` in total on
        `dop` instances. `master_batch`: requests on the busiest master; `holder_kv`: KV tokens on
        the busiest holder (both default to an even spread over the `dop` instances; a
        `"total"`-basis profile ignores them)."""
        if batch_size == 0:
            return 0.0
        d0, d1, d2 = self.decode_coefficients(dop)
        if self.decode_basis == "total":
            return d0 + d1 * batch_size + d2 * kv_tokens
        if master_batch is None:
            master_batch = -(-batch_size // dop)
        if holder_kv is None:
            holder_kv = kv_tokens / dop
        return d0 + d1 * master_batch + d2 * holder_kv

    def chunked_time(self, chunks: Sequence[tuple[int, int]], batch_size: int, kv_tokens: int) -> float:
        """One mixed step on one instance: prompt chunks `(cached, tokens)` attending to their
        cached prefix, plus `batch_size` decode tokens over `kv_tokens` (one step overhead)."""
        a, b, c = self.prefill_coefficients(1)
        _, d1, d2 = self.decode_coefficients(1)
        squares = sum((s + n) ** 2 - s * s for s, n in chunks)
        return a + b * sum(n for _, n in chunks) + c * squares + d1 * batch_size + d2 * kv_tokens

    def transfer_time(self, nbytes: float) -> float:
        return self.transfer_latency_s + nbytes / self.transfer_bytes_per_s if nbytes else 0.0

    def migration_time(self, tokens: int) -> float:
        return self.transfer_time(tokens * self.kv_bytes_per_token)

    # -- construction -------------------------------------------------------------------
    @classmethod
    def roofline(cls, *, num_layers: int, hidden: int, heads: int, kv_heads: int, head_dim: int,
                 intermediate: int, vocab: int, dtype_bytes: int, flops_per_s: float, mem_bytes_per_s: float,
                 link_bytes_per_s: float, max_dop: int = 8, efficiency: float = 0.6, step_overhead_s: float = 1e-3,
                 link_latency_s: float = 2e-5, tp: int = 1, name: str = "roofline") -> CostModel:
        """Coefficients from the model's shape and the instance's peak speeds (no measurement).
        `flops_per_s`, `mem_bytes_per_s` and `link_bytes_per_s` are the instance's totals over its
        `tp` devices. With `tp > 1`, each layer's two all-reduces cost a ring's
        `2 (tp - 1) / tp` of the activations per token over one device's link, plus their latency
        once per step. Decode is on the `"busiest"` basis."""
        if tp < 1 or max_dop < 1:
            raise ValueError("tp and max_dop must be >= 1")
        params = num_layers * (hidden * (heads + 2 * kv_heads) * head_dim + heads * head_dim * hidden
                               + 3 * hidden * intermediate) + vocab * hidden
        flops = flops_per_s * efficiency
        allreduce = 2 * num_layers * hidden * dtype_bytes * 2 * (tp - 1) / tp / (link_bytes_per_s / tp)
        allreduce_latency = 2 * num_layers * link_latency_s if tp > 1 else 0.0
        b1 = 2 * params / flops + allreduce
        c1 = 2 * num_layers * heads * head_dim / flops
        kv_bytes = 2 * num_layers * kv_heads * head_dim * dtype_bytes
        weights = params * dtype_bytes / (mem_bytes_per_s * efficiency)
        prefill, decode = {}, {}
        for dop in range(1, max_dop + 1):
            ring = kv_bytes / link_bytes_per_s * (dop - 1) / dop
            prefill[dop] = (step_overhead_s * dop ** 0.5 + allreduce_latency, max(b1 / dop, ring), c1 / dop)
            decode[dop] = (step_overhead_s + weights + allreduce_latency, 2 * params / flops + allreduce,
                           kv_bytes / (mem_bytes_per_s * efficiency))
        return cls(prefill, decode, link_latency_s, link_bytes_per_s, kv_bytes, name, {"tp": tp}, "busiest")

    def to_json(self) -> dict:
        return {"name": self.name, "prefill": {str(k): list(v) for k, v in self.prefill.items()},
                "decode": {str(k): list(v) for k, v in self.decode.items()}, "decode_basis": self.decode_basis,
                "transfer": {"latency_s": self.transfer_latency_s, "bytes_per_s": self.transfer_bytes_per_s},
                "kv_bytes_per_token": self.kv_bytes_per_token, "meta": dict(self.meta)}

    @classmethod
    def from_json(cls, data: Mapping) -> CostModel:
        try:
            return cls({int(k): tuple(v) for k, v in data["prefill"].items()},
                       {int(k): tuple(v) for k, v in data["decode"].items()},
                       float(data["transfer"]["latency_s"]), float(data["transfer"]["bytes_per_s"]),
                       int(data["kv_bytes_per_token"]), data.get("name", "custom"), data.get("meta", {}),
                       data.get("decode_basis", "total"))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"invalid cost-model profile: {err}") from err

    @classmethod
    def load(cls, path: str | Path) -> CostModel:
        return cls.from_json(json.loads(Path(path).read_text()))

    @classmethod
    def load_profile(cls, name_or_path: str | Path) -> CostModel:
        """A named preset (`esp.costs.presets.preset_names()`) or a JSON profile path."""
        from esp.costs.presets import load_profile
        return load_profile(name_or_path)
