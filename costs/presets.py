"""Named cost models for model/device pairs (DESIGN 7), used when no measured profile exists.

An *instance* (one elastic-SP member) is `tp` GPUs running tensor parallelism. Two kinds:

- **calibrated** (`a800-lwm7b-tp{1,2,4,8}`, and `a800-lwm7b` = `-tp1`): LWM-7B on A800s, fitted
  to LoongServe's published step times (`esp.costs.calibration`, `docs/cost_model.md`): TP's
  all-reduce costs time, prefill scales worse than 1/DoP, decode waits for its busiest master
  and holder;
- **roofline** (`h100-lwm7b*`, `h200-lwm7b*`, and `a800-lwm7b-tp{1,2,4,8}-roofline`): the
  fallback for hardware without measurements, from the model's shape and the device's peak
  speeds (an instance is one device with `tp` times the FLOP/s, HBM bandwidth, memory and link
  bandwidth, plus the ring all-reduce of TP over one device's link).

Constants:

- Peak FLOP/s are dense bf16 tensor-core numbers (no sparsity).
- `link_bytes_per_s` is NVLink bandwidth *per direction* per GPU: a KV migration or a
  ring step sends one way. Datasheets quote the bidirectional total, so A800 "400 GB/s" ->
  200 GB/s, H100/H200 "900 GB/s" -> 450 GB/s.
- `memory_bytes` is the capacity CUDA sees (nvidia-smi total: 81920 MiB for A800-80GB,
  81559 MiB for H100-80GB SXM, 143771 MiB for H200).
- `KV_MEMORY_FRACTION = 0.9` of an instance's memory is usable for weights + KV cache;
  the rest goes to the CUDA context, activations of the largest step, NCCL buffers and
  allocator fragmentation (the same default as vLLM's `gpu_memory_utilization`).

The paper evaluates LWM-1M-Text (a Llama-2-7B shape) on one node of 8 A800s, with TP=2
instances. The unsuffixed names (`a800-lwm7b`, `h100-lwm7b`, `h200-lwm7b`) are one GPU per
instance: `--instances 8` is the paper's node, with about 120K tokens of KV per instance, so a
500K-token request spans five or more instances; `--profile a800-lwm7b-tp2 --instances 4` is
the paper's configuration. `max_dop` is 8 // tp (one 8-GPU node).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from esp.costs.calibration import a800_lwm7b
from esp.costs.cost_model import CostModel

MiB = 1 << 20
KV_MEMORY_FRACTION = 0.9
GPUS_PER_NODE = 8
DEFAULT_TP = 1
CALIBRATED_TP = (1, 2, 4, 8)


@dataclass(frozen=True)
class Device:
    name: str
    bf16_flops_per_s: float
    hbm_bytes_per_s: float
    link_bytes_per_s: float  # per direction
    memory_bytes: int


A800_80GB = Device("a800", 312e12, 2.039e12, 200e9, 81920 * MiB)
H100_80GB = Device("h100", 989e12, 3.35e12, 450e9, 81559 * MiB)
H200 = Device("h200", 989e12, 4.8e12, 450e9, 143771 * MiB)

_DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2,
                "float8_e4m3fn": 1, "float8_e5m2": 1, "int8": 1}


@dataclass(frozen=True)
class ModelShape:
    name: str
    num_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    dtype_bytes: int = 2
    max_context: int | None = None

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def matmul_params(self) -> int:
        """Parameters touched by a token's matmuls (attention, MLP, LM head): the roofline's count."""
        attn = self.hidden * (self.heads + 2 * self.kv_heads) * self.head_dim + self.heads * self.head_dim * self.hidden
        return self.num_layers * (attn + 3 * self.hidden * self.intermediate) + self.vocab * self.hidden

    @property
    def weight_bytes(self) -> int:
        """Bytes of all weights: matmuls plus the (untied) input embedding and the RMSNorm scales."""
        params = self.matmul_params + self.vocab * self.hidden + (2 * self.num_layers + 1) * self.hidden
        return params * self.dtype_bytes

    @classmethod
    def from_config_dir(cls, path: str | Path) -> ModelShape:
        """Shape from a Hugging Face `config.json` (a checkpoint folder or the file itself)."""
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        cfg = json.loads(file.read_text())
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16").removeprefix("torch.")
        if dtype not in _DTYPE_BYTES:
            raise ValueError(f"{file}: unknown dtype {dtype!r}")
        return cls(name=(file.parent.name or "model"), num_layers=int(cfg["num_hidden_layers"]), hidden=hidden,
                   heads=heads, kv_heads=int(cfg.get("num_key_value_heads") or heads),
                   head_dim=int(cfg.get("head_dim") or hidden // heads),
                   intermediate=int(cfg["intermediate_size"]), vocab=int(cfg["vocab_size"]),
                   dtype_bytes=_DTYPE_BYTES[dtype], max_context=cfg.get("max_position_embeddings"))


LWM_7B = ModelShape("lwm7b", num_layers=32, hidden=4096, heads=32, kv_heads=32, head_dim=128,
                    intermediate=11008, vocab=32000, max_context=1 << 20)


def kv_tokens_per_instance(model: ModelShape, device: Device, tp: int = 1) -> int:
    """KV-cache capacity of one TP-`tp` instance, in tokens (see `KV_MEMORY_FRACTION`)."""
    free = device.memory_bytes * tp * KV_MEMORY_FRACTION - model.weight_bytes
    if free <= 0:
        raise ValueError(f"{model.name} does not fit on {tp} x {device.name}")
    return int(free // model.kv_bytes_per_token)


def roofline_profile(model: ModelShape, device: Device, tp: int = 1, max_dop: int = 8,
                     efficiency: float = 0.6, name: str | None = None) -> CostModel:
    """Roofline `CostModel` for instances of `tp` x `device` running `model`."""
    if tp < 1 or max_dop < 1:
        raise ValueError("tp and max_dop must be >= 1")
    kv_tokens = kv_tokens_per_instance(model, device, tp)
    cm = CostModel.roofline(num_layers=model.num_layers, hidden=model.hidden, heads=model.heads,
                            kv_heads=model.kv_heads, head_dim=model.head_dim, intermediate=model.intermediate,
                            vocab=model.vocab, dtype_bytes=model.dtype_bytes,
                            flops_per_s=device.bf16_flops_per_s * tp, mem_bytes_per_s=device.hbm_bytes_per_s * tp,
                            link_bytes_per_s=device.link_bytes_per_s * tp, max_dop=max_dop, efficiency=efficiency,
                            tp=tp, name=name or f"{device.name}-{model.name}-tp{tp}")
    meta = {"source": "roofline", "device": device.name, "model": model.name, "tp": tp, "efficiency": efficiency,
            "kv_tokens_per_instance": kv_tokens, "kv_memory_fraction": KV_MEMORY_FRACTION,
            "max_context": model.max_context}
    return replace(cm, meta=meta)


def calibrated_profile(tp: int, max_dop: int | None = None, name: str | None = None) -> CostModel:
    """LWM-7B on instances of `tp` A800s, calibrated to LoongServe's published step times
    (`esp.costs.calibration`); groups of up to `max_dop` instances (default one 8-GPU node)."""
    if tp < 1:
        raise ValueError("tp must be >= 1")
    max_dop = max_dop or max(1, GPUS_PER_NODE // tp)
    meta = {"source": "calibrated", "device": A800_80GB.name, "model": LWM_7B.name, "tp": tp,
            "calibration": "LoongServe (arXiv 2404.09526) published step times; docs/cost_model.md",
            "kv_tokens_per_instance": kv_tokens_per_instance(LWM_7B, A800_80GB, tp),
            "kv_memory_fraction": KV_MEMORY_FRACTION, "max_context": LWM_7B.max_context}
    return a800_lwm7b().cost_model(A800_80GB, tp, max_dop, name or f"a800-{LWM_7B.name}-tp{tp}", meta)


def _presets() -> dict[str, CostModel]:
    out = {}
    for tp in CALIBRATED_TP:
        out[f"a800-{LWM_7B.name}-tp{tp}"] = calibrated_profile(tp)
        roofline = roofline_profile(LWM_7B, A800_80GB, tp=tp, max_dop=GPUS_PER_NODE // tp,
                                    name=f"a800-{LWM_7B.name}-tp{tp}-roofline")
        out[roofline.name] = roofline
    for device in (H100_80GB, H200):
        for tp in (1, 2):
            profile = roofline_profile(LWM_7B, device, tp=tp, max_dop=GPUS_PER_NODE // tp)
            out[profile.name] = profile
    for device in (A800_80GB, H100_80GB, H200):
        out[f"{device.name}-{LWM_7B.name}"] = out[f"{device.name}-{LWM_7B.name}-tp{DEFAULT_TP}"]
    return dict(sorted(out.items()))


PRESETS: dict[str, CostModel] = _presets()  # shared instances: treat as read-only


def preset_names() -> list[str]:
    return sorted(PRESETS)


def load_profile(name_or_path: str | Path) -> CostModel:
    """A preset by name, or a JSON profile (as written by `CostModel.to_json`) by path."""
    key = str(name_or_path)
    if key in PRESETS:
        return PRESETS[key]
    path = Path(key).expanduser()
    if path.is_file():
        return CostModel.load(path)
    raise ValueError(f"unknown cost profile {key!r}: not a file, and not one of {', '.join(preset_names())}")
