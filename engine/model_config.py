"""The shape and hyper-parameters of a decoder checkpoint, read from its `config.json`.

Four Hugging Face families run on the one model in `esp.engine.model`; what tells them apart
is a few fields here (`qkv_bias`, `o_bias`, `qk_norm`), set as `transformers` builds each:

| model_type | q/k/v bias | o bias | per-head q/k RMSNorm |
|---|---|---|---|
| `llama` | `attention_bias` | `attention_bias` | no |
| `mistral` | no | no | no |
| `qwen2` | yes | no | no |
| `qwen3` | `attention_bias` | `attention_bias` | yes (`q_norm`, `k_norm`) |

RoPE types `default`, `linear`, `llama3`, `yarn` and `dynamic` (formulas in `esp.engine.rope`).
Both layouts that `transformers` writes are accepted: 4.x (`rope_theta` at the top level,
`rope_scaling` with `type` or `rope_type`, `torch_dtype`) and 5.x (`rope_parameters` holding
`rope_type` and `rope_theta`, `dtype`). Anything the model would compute differently from the
checkpoint's reference implementation (sliding-window layers, mixture-of-experts layers,
per-layer RoPE, other model types) is refused with an error that names the file and the field;
the defaults `transformers` writes (Qwen's disabled `sliding_window`, `layer_types` of all
`full_attention`) are accepted.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                         "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic")
MOE_FIELDS = ("num_experts", "num_local_experts", "num_experts_per_tok", "n_routed_experts", "n_shared_experts",
              "moe_intermediate_size", "shared_expert_intermediate_size", "decoder_sparse_step", "moe_layer_freq",
              "first_k_dense_replace")
QWEN_MAX_WINDOW_LAYERS = 28  # `Qwen2Config` / `Qwen3Config` default for a config.json without the field


class CheckpointError(ValueError):
    """A model directory we cannot load; the message names the file and the tensor or field."""


class ConfigError(CheckpointError):
    """A `config.json` that is missing, malformed, or describes a model we do not run."""


@dataclass(frozen=True)
class RopeScaling:
    """Non-default RoPE frequencies. `linear` and `dynamic` use `factor`; `llama3` adds the
    low/high frequency factors and `original_max_position_embeddings`; `yarn` adds
    `original_max_position_embeddings` and the optional `attention_factor`, `beta_fast`,
    `beta_slow`, `mscale`, `mscale_all_dim` (None: HF's default) and `truncate`."""

    rope_type: str
    factor: float
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None
    attention_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    torch_dtype: str | None = None
    model_type: str = "llama"
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ConfigError(f"field {name!r} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"field 'num_attention_heads' ({self.num_attention_heads}) must be a multiple of "
                              f"field 'num_key_value_heads' ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"field 'head_dim' must be even for RoPE, got {self.head_dim}")

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        file = Path(path) / "config.json"
        if not file.is_file():
            raise ConfigError(f"{file}: not found (a model directory needs a config.json)")
        try:
            d = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{file}: not valid JSON: {e}") from e
        if not isinstance(d, dict):
            raise ConfigError(f"{file}: expected a JSON object, got {type(d).__name__}")
        return cls.from_dict(d, source=file)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str | Path = "config.json") -> ModelConfig:
        r = _Reader(d, str(source))
        model_type = r.get("model_type", str)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise r.error("model_type", f"unsupported model_type {model_type!r} "
                                        f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        archs = r.get("architectures", list, None)
        if archs is not None and any(a != SUPPORTED_MODEL_TYPES[model_type] for a in archs):
            raise r.error("architectures", f"unsupported architectures {archs} "
                                           f"(expected [{SUPPORTED_MODEL_TYPES[model_type]!r}])")
        r.refuse_if("hidden_act", lambda v: v != "silu", "only silu (SwiGLU) is supported", "silu")
        r.refuse_if("mlp_bias", bool, "biased MLP projections are not supported", False)
        r.refuse_if("quantization_config", lambda v: v is not None, "quantized checkpoints are not supported", None)
        for field in MOE_FIELDS:
            r.refuse_if(field, lambda v: v not in (None, 0, False, []), "mixture-of-experts layers are not supported",
                        None)
        max_pos, layers = r.get("max_position_embeddings", int), r.get("num_hidden_layers", int)
        _refuse_sliding_window(r, model_type, layers, max_pos)
        bias = model_type == "qwen2" or (model_type != "mistral" and r.get("attention_bias", bool, False))
        hidden, heads = r.get("hidden_size", int), r.get("num_attention_heads", int)
        head_dim = r.get("head_dim", int, None) or (hidden // heads if heads > 0 else 0)
        rope_theta, rope_scaling = _rope(r, max_pos)
        eos = r.get("eos_token_id", (int, list), None)
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in eos_ids):
            raise r.error("eos_token_id", f"expected an int or a list of ints, got {eos!r}")
        fields = dict(
            vocab_size=r.get("vocab_size", int),
            hidden_size=hidden,
            intermediate_size=r.get("intermediate_size", int),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=r.get("num_key_value_heads", int, None) or heads,
            head_dim=head_dim,
            rms_norm_eps=float(r.get("rms_norm_eps", (int, float), 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=max_pos,
            tie_word_embeddings=r.get("tie_word_embeddings", bool, False),
            bos_token_id=r.get("bos_token_id", int, None),
            eos_token_ids=eos_ids,
            torch_dtype=r.get("dtype", str, None) or r.get("torch_dtype", str, None),
            model_type=model_type,
            qkv_bias=bias,
            o_bias=bias and model_type != "qwen2",
            qk_norm=model_type == "qwen3",
        )
        try:
            return cls(**fields)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None


def _refuse_sliding_window(r: _Reader, model_type: str, layers: int, max_pos: int) -> None:
    """Sliding-window layers, as `transformers` decides them. Mistral: `sliding_window` on every
    layer (Llama has no such field; one there is refused the same way). Qwen2/3: `sliding_window` only with `use_sliding_window`, on the layers `layer_types`
    marks `sliding_attention` (by default those from `max_window_layers` on). A window of at least
    `max_position_embeddings` never slides."""
    layer_types = r.get("layer_types", list, None)
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        others = sorted({str(t) for t in layer_types} - {"full_attention"})
        raise r.error("layer_types", f"only full attention in every layer is supported, got {', '.join(others)} "
                                     f"layers")
    window = r.get("sliding_window", int, None)
    if window is None or window >= max_pos:
        return
    if model_type not in ("qwen2", "qwen3"):
        raise r.error("sliding_window", f"sliding-window attention is not supported (needs null or >= "
                                        f"max_position_embeddings = {max_pos}), got {window}")
    first = r.get("max_window_layers", int, QWEN_MAX_WINDOW_LAYERS)
    if r.get("use_sliding_window", bool, False) and layer_types is None and first < layers:
        raise r.error("use_sliding_window", f"sliding-window attention is not supported (sliding_window={window} "
                                            f"on layers {first}..{layers - 1}), got True")


def _rope(r: _Reader, max_pos: int) -> tuple[float, RopeScaling | None]:
    """RoPE base and scaling from `rope_parameters` (5.x) or `rope_theta` + `rope_scaling` (4.x)."""
    field = "rope_parameters" if r.d.get("rope_parameters") is not None else "rope_scaling"
    p = r.get(field, dict, None) or {}
    if any(isinstance(v, dict) for v in p.values()):
        raise r.error(field, "per-layer-type RoPE parameters are not supported")
    theta = p.get("rope_theta", r.get("rope_theta", (int, float), 10000.0))
    rope_type = p.get("rope_type", p.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise r.error(field, f"unsupported rope type {rope_type!r} (supported: {', '.join(ROPE_TYPES)})")
    partial = p.get("partial_rotary_factor", r.d.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise r.error(field, f"partial_rotary_factor={partial} is not supported")

    def num(key: str, default: Any = None) -> Any:
        v = p.get(key, default)
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise r.error(f"{field}.{key}", f"must be a number for rope type {rope_type!r}, got {v!r}")
        return v

    def optional(key: str) -> float | None:
        return None if p.get(key) is None else float(num(key))

    def original_max() -> int:
        # HF's `standardize_rope_params` lets a top-level field win over the one in the RoPE dict
        top = r.d.get("original_max_position_embeddings")
        v = top if top is not None else p.get("original_max_position_embeddings", max_pos)
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            name = "original_max_position_embeddings"
            raise r.error(name if top is not None else f"{field}.{name}", f"must be a positive integer for rope type {rope_type!r}, got {v!r}")
        return v

    if not isinstance(theta, (int, float)) or theta <= 0:
        raise r.error(f"{field}.rope_theta", f"must be a positive number, got {theta!r}")
    if rope_type == "default":
        return float(theta), None
    if rope_type == "yarn":
        original = original_max()
        truncate = p.get("truncate", True)
        if truncate is not None and not isinstance(truncate, bool):
            raise r.error(f"{field}.truncate", f"must be true or false, got {truncate!r}")
        factor = max_pos / original if p.get("factor") is None else float(num("factor"))
        return float(theta), RopeScaling("yarn", factor, original_max_position_embeddings=original,
                                         attention_factor=optional("attention_factor"),
                                         beta_fast=optional("beta_fast"), beta_slow=optional("beta_slow"),
                                         mscale=optional("mscale"), mscale_all_dim=optional("mscale_all_dim"),
                                         truncate=bool(truncate))
    factor = float(num("factor"))
    if rope_type in ("linear", "dynamic"):
        return float(theta), RopeScaling(rope_type, factor)
    low, high = float(num("low_freq_factor")), float(num("high_freq_factor"))
    if high <= low:
        raise r.error(field, f"high_freq_factor ({high}) must be greater than low_freq_factor ({low})")
    return float(theta), RopeScaling("llama3", factor, low, high, original_max())


class _Reader:
    """Typed access to one config dict; every error names the file and the field."""

    _MISSING = object()

    def __init__(self, d: dict[str, Any], source: str) -> None:
        self.d, self.source = d, source

    def error(self, field: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: field {field!r}: {message}")

    def get(self, field: str, types: type | tuple[type, ...], default: Any = _MISSING) -> Any:
        v = self.d.get(field)
        if v is None:
            if default is self._MISSING:
                raise self.error(field, "missing")
            return default
        types = types if isinstance(types, tuple) else (types,)
        if isinstance(v, bool) and bool not in types or not isinstance(v, types):
            raise self.error(field, f"expected {' or '.join(t.__name__ for t in types)}, got {v!r}")
        return v

    def refuse_if(self, field: str, bad: Any, message: str, default: Any) -> None:
        v = self.d.get(field, default)
        if bad(v):
            raise self.error(field, f"{message}, got {v!r}")
