"""Step-time predictions for policies (DESIGN 7).

Prefill of a batch on a group of size `dop`: `T = a + b*sum(len) + c*sum(len^2)` with
coefficients per group size (the paper's Eq. 7); decode: `d0 + d1*batch + d2*kv_tokens`
per group size; transfer: `latency + bytes / bandwidth`. Coefficients come from a profile
(JSON) or from a roofline computed from the model's shape and the device's speeds.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence


@dataclass(frozen=True)
class CostModel:
    prefill: Mapping[int, tuple[float, float, float]]
    decode: Mapping[int, tuple[float, float, float]]
    transfer_latency_s: float
    transfer_bytes_per_s: float
    kv_bytes_per_token: int
    name: str = "custom"
    meta: Mapping[str, object] = field(default_factory=dict)

    def _coeffs(self, table: Mapping[int, tuple[float, float, float]], dop: int) -> tuple[float, float, float]:
        if dop in table:
            return table[dop]
        base = max((d for d in table if d <= dop), default=min(table))
        a, b, c = table[base]
        return a, b * base / dop, c * base / dop

    def prefill_time(self, lengths: Sequence[int], dop: int = 1) -> float:
        """Seconds for one prefill batch of these prompt lengths on `dop` instances."""
        return self.prefill_time_of_sums(sum(lengths), sum(n * n for n in lengths), len(lengths), dop)

    def prefill_time_of_sums(self, tokens: int, squares: int, count: int, dop: int = 1) -> float:
        """`prefill_time` from the batch's sum of lengths and sum of squared lengths."""
        if count == 0:
            return 0.0
        a, b, c = self._coeffs(self.prefill, dop)
        return a + b * tokens + c * squares

    def decode_time(self, batch_size: int, kv_tokens: int, dop: int = 1) -> float:
        """Seconds for one decode step of `batch_size` requests holding `kv_tokens` in total."""
        if batch_size == 0:
            return 0.0
        d0, d1, d2 = self._coeffs(self.decode, dop)
        return d0 + d1 * batch_size + d2 * kv_tokens

    def chunked_time(self, chunks: Sequence[tuple[int, int]], batch_size: int, kv_tokens: int) -> float:
        """One mixed step on one instance: prompt chunks `(cached, tokens)` attending to their
        cached prefix, plus `batch_size` decode tokens over `kv_tokens` (one step overhead)."""
        a, b, c = self._coeffs(self.prefill, 1)
        _, d1, d2 = self._coeffs(self.decode, 1)
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
                 link_latency_s: float = 2e-5, name: str = "roofline") -> CostModel:
        """Coefficients from the model's shape and the device's peak speeds (no measurement)."""
        params = num_layers * (hidden * (heads + 2 * kv_heads) * head_dim + heads * head_dim * hidden
                               + 3 * hidden * intermediate) + vocab * hidden
        flops = flops_per_s * efficiency
        b1 = 2 * params / flops
        c1 = 2 * num_layers * heads * head_dim / flops
        kv_bytes = 2 * num_layers * kv_heads * head_dim * dtype_bytes
        prefill, decode = {}, {}
        for dop in range(1, max_dop + 1):
            ring = kv_bytes / link_bytes_per_s * (dop - 1) / dop
            prefill[dop] = (step_overhead_s * dop ** 0.5, max(b1 / dop, ring), c1 / dop)
            weights = params * dtype_bytes / (mem_bytes_per_s * efficiency)
            decode[dop] = (step_overhead_s + weights, 2 * params / flops,
                           kv_bytes / (mem_bytes_per_s * efficiency) / dop)
        return cls(prefill, decode, link_latency_s, link_bytes_per_s, kv_bytes, name)

    def to_json(self) -> dict:
        return {"name": self.name, "prefill": {str(k): list(v) for k, v in self.prefill.items()},
                "decode": {str(k): list(v) for k, v in self.decode.items()},
                "transfer": {"latency_s": self.transfer_latency_s, "bytes_per_s": self.transfer_bytes_per_s},
                "kv_bytes_per_token": self.kv_bytes_per_token, "meta": dict(self.meta)}

    @classmethod
    def from_json(cls, data: Mapping) -> CostModel:
        try:
            return cls({int(k): tuple(v) for k, v in data["prefill"].items()},
                       {int(k): tuple(v) for k, v in data["decode"].items()},
                       float(data["transfer"]["latency_s"]), float(data["transfer"]["bytes_per_s"]),
                       int(data["kv_bytes_per_token"]), data.get("name", "custom"), data.get("meta", {}))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"invalid cost-model profile: {err}") from err

    @classmethod
    def load(cls, path: str | Path) -> CostModel:
        return cls.from_json(json.loads(Path(path).read_text()))

    @classmethod
    def load_profile(cls, name_or_path: str | Path) -> CostModel:
        """A named roofline preset (`esp.policies.presets.preset_names()`) or a JSON profile path."""
        from esp.policies.presets import load_profile
        return load_profile(name_or_path)
