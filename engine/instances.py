"""How the main process describes its instances before starting them: the workers' specs,
with CPU KV pools sized from available memory (the engine and the profiler share this)."""
from __future__ import annotations

import tempfile
from pathlib import Path

from esp.engine.config import EngineConfig, dtype_of
from esp.engine.kv_pool import KVPool
from esp.engine.model_config import ModelConfig
from esp.engine.worker import WorkerSpec


def kv_bytes_per_token(config: EngineConfig, model: ModelConfig) -> int:
    return KVPool.bytes_per_slot(model.num_hidden_layers, model.num_key_value_heads, model.head_dim,
                                 dtype_of(config.dtype, config.device))


def auto_kv_slots(config: EngineConfig, model: ModelConfig) -> int:
    """On CPU: 30% of available memory split over the instances, at most 4x the context."""
    budget = _available_memory() * 0.3 / config.instances
    return max(1024, min(int(budget // kv_bytes_per_token(config, model)), 4 * model.max_position_embeddings))


def worker_specs(config: EngineConfig, model: ModelConfig) -> list[WorkerSpec]:
    """One spec per instance; `kv_slots=None` on CUDA lets each worker size its pool from free memory."""
    slots = config.kv_tokens_per_instance or (auto_kv_slots(config, model) if config.device == "cpu" else None)
    init = rendezvous()
    return [WorkerSpec(rank, config.instances, str(config.model_dir), config.instance_device(rank), config.dtype,
                       slots, config.threads, init) for rank in range(config.instances)]


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def rendezvous() -> str:
    """A fresh torch.distributed rendezvous for one worker group: a file store in a new temporary
    directory, so no rendezvous socket listens anywhere (the workers' own gloo sockets bind to
    loopback, see `worker.py`)."""
    return (Path(tempfile.mkdtemp(prefix="esp-rdzv-")) / "store").as_uri()
