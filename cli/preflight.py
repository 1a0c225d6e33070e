"""Checks `esp-run` makes before anything loads, so the commonest startup mistakes end in one
line that says what to do instead of a worker's traceback minutes later."""
from __future__ import annotations

import sys
from pathlib import Path

MODEL_FILES = ("config.json, model.safetensors (or model.safetensors.index.json and its shards) and tokenizer.json "
               "(or tokenizer.model)")


class PreflightError(Exception):
    """A setting that cannot work on this machine; the message is one line."""


def check_model_dir(model: str | None, weights: bool = True) -> None:
    """`--model` must be a Hugging Face style directory. `weights=False` (the simulator) needs
    only its `config.json`. The bundled model (`model=None`) is trusted."""
    if model is None:
        return
    path = Path(model).expanduser()
    if not path.exists():
        raise PreflightError(f"--model {model}: no such directory; a model directory holds {MODEL_FILES}")
    if not path.is_dir():
        raise PreflightError(f"--model {model}: not a directory; a model directory holds {MODEL_FILES}")
    missing = [] if (path / "config.json").is_file() else ["config.json"]
    if weights:
        if not any(path.glob("*.safetensors")) and not (path / "model.safetensors.index.json").is_file():
            missing.append("*.safetensors weights")
        if not (path / "tokenizer.json").is_file() and not (path / "tokenizer.model").is_file():
            missing.append("tokenizer.json or tokenizer.model")
    if missing:
        raise PreflightError(f"--model {model}: missing {', '.join(missing)}; a model directory holds {MODEL_FILES}")


def check_device(device: str, instances: int) -> None:
    """`--device cuda` needs a torch built with CUDA that sees at least `instances` GPUs."""
    if device != "cuda":
        return
    import torch

    pip = f"{sys.prefix}/bin/pip"
    if torch.version.cuda is None:
        raise PreflightError(
            f"--device cuda: this torch ({torch.__version__}) is a CPU-only build; install a CUDA build of torch "
            f"into this environment (`{pip} install --force-reinstall torch --index-url <the CUDA wheel index for "
            f"your driver>`, as the PyTorch install guide shows), or run with --device cpu")
    if not torch.cuda.is_available():
        raise PreflightError(
            f"--device cuda: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU; check the NVIDIA "
            f"driver (`nvidia-smi`) and CUDA_VISIBLE_DEVICES, or run with --device cpu")
    count = torch.cuda.device_count()
    if instances > count:
        raise PreflightError(f"--instances {instances} needs {instances} GPUs with --device cuda, but torch sees "
                             f"{count}; pass --instances {count} or fewer")
