"""Load a Hugging Face style Llama, Mistral, Qwen2 or Qwen3 directory into `esp.engine.model.LlamaForCausalLM`.

The model's parameter names are the checkpoint's own for every family (Qwen3's
`self_attn.q_norm` / `k_norm`, the q/k/v `.bias` tensors of Qwen2), so a tensor maps to the
parameter of the same name; which ones exist follows the `ModelConfig`.

The directory holds `config.json` and either `model.safetensors` or shards listed in
`model.safetensors.index.json` (`weight_map`: tensor name -> shard file). Tensors are read one
at a time with `safetensors.safe_open` and copied (converted to the requested dtype) straight
into the model's parameters, so the checkpoint is never held in memory twice. Under tensor
parallelism (a `TPShard`) each rank reads only its slice of a sharded tensor
(`esp.engine.tensor_parallel.checkpoint_slice`), after checking the tensor's full shape.
"""
from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from esp.engine.model import LlamaForCausalLM
from esp.engine.model_config import CheckpointError, ModelConfig
from esp.engine.tensor_parallel import TPShard, checkpoint_slice

__all__ = ["CheckpointError", "load_model", "resolve_dtype", "weight_files"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """`auto` is float32 on CPU and bfloat16 on CUDA (float16 before compute capability 8.0)."""
    if name == "auto":
        device = torch.device(device)
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
    if name not in DTYPES:
        raise ValueError(f"dtype must be auto, {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]


def weight_files(model_dir: str | Path) -> tuple[Path, dict[str, Path]]:
    """The file that lists the tensors (index or single file) and where each tensor lives."""
    model_dir = Path(model_dir)
    index_path, single = model_dir / INDEX_FILE, model_dir / SINGLE_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError("weight_map must map tensor names to file names")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: invalid index ({type(e).__name__}: {e})") from e
        where = {name: model_dir / file for name, file in weight_map.items()}
        for name, file in where.items():
            if not file.is_file():
                raise CheckpointError(f"{index_path}: tensor {name!r} is in shard {file.name!r}, which is missing")
        return index_path, where
    if single.is_file():
        with _open(single) as f:
            return single, {name: single for name in f.keys()}
    others = sorted(p.name for p in model_dir.glob("*") if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
    raise CheckpointError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE}"
                          + (f" (found {', '.join(others)}; only Hugging Face safetensors layouts are supported)"
                             if others else ""))


def load_model(model_dir: str | Path, dtype: torch.dtype, device: torch.device | str,
               tp: TPShard | None = None) -> LlamaForCausalLM:
    """Build the model on `device` in `dtype` and fill every parameter from the checkpoint
    (`tp`: one tensor-parallel rank's part of it). Raises `CheckpointError` for a
    missing/invalid config, missing safetensors, and a missing, unexpected or mis-shaped tensor,
    naming the file and the tensor."""
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    config = ModelConfig.from_dir(model_dir)
    listing, where = weight_files(model_dir)
    model = LlamaForCausalLM(config, dtype, torch.device(device), tp).requires_grad_(False).eval()
    params = dict(model.named_parameters())
    full = params if tp is None else dict(LlamaForCausalLM(config, dtype, torch.device("meta")).named_parameters())
    for name in where:
        if name not in params and not _ignorable(name, config):
            raise CheckpointError(f"{where[name]}: unexpected tensor {name!r} (not a parameter of a "
                                  f"{config.num_hidden_layers}-layer {config.model_type} model"
                                  f"{' with tied embeddings' if config.tie_word_embeddings else ''})")
    missing = [name for name in params if name not in where]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{listing}: missing tensor {missing[0]!r}{more}")
    by_file: dict[Path, list[str]] = defaultdict(list)
    for name in params:
        by_file[where[name]].append(name)
    with torch.no_grad():
        for file, names in by_file.items():
            with _open(file) as f:
                present = set(f.keys())
                for name in names:
                    if name not in present:
                        raise CheckpointError(f"{file}: missing tensor {name!r} (listed in {listing.name})")
                    got = tuple(f.get_slice(name).get_shape())
                    want = tuple(full[name].shape)
                    if got != want:
                        raise CheckpointError(f"{file}: tensor {name!r} has shape {list(got)}, "
                                              f"expected {list(want)}")
                    part = None if tp is None else checkpoint_slice(tp, name, config.head_dim)
                    if part is None:
                        params[name].copy_(f.get_tensor(name))
                    else:
                        _copy_slice(params[name], f.get_slice(name), *part)
    return model


def _copy_slice(param: torch.Tensor, tensor_slice, dim: int, start: int, stop: int) -> None:
    """Rows (`dim` 0) or columns (`dim` 1) `[start, stop)` of a checkpoint tensor into `param`;
    rows `param` has beyond them (the padding of the last vocabulary shard) are zeroed."""
    if dim == 0:
        part = tensor_slice[start:stop]
        param[: stop - start].copy_(part)
        param[stop - start:].zero_()
    else:
        param.copy_(tensor_slice[:, start:stop])


def _ignorable(name: str, config: ModelConfig) -> bool:
    return name.endswith("rotary_emb.inv_freq") or (config.tie_word_embeddings and name == "lm_head.weight")


@contextmanager
def _open(file: Path) -> Iterator:
    """`safe_open` on CPU, with a broken file reported as a `CheckpointError` naming it."""
    try:
        handle = safe_open(str(file), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from e
    with handle as f:
        yield f
