"""How the main process describes its instances before starting them: the workers' specs,
with CPU KV pools sized from available memory (the engine and the profiler share this)."""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from esp.engine.config import EngineConfig, available_cpus, dtype_of
from esp.engine.kv_pool import KVPool
from esp.engine.model_config import ModelConfig
from esp.engine.worker import WorkerSpec

log = logging.getLogger("esp.engine")


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
    cpus = cpu_sets(config)
    return [WorkerSpec(rank, config.instances, str(config.model_dir), config.instance_device(rank), config.dtype,
                       slots, config.threads, init, cpus[rank]) for rank in range(config.instances)]


def cpu_sets(config: EngineConfig) -> list[tuple[int, ...]]:
    """The cores each instance's threads are pinned to: disjoint sets of `threads` cores when
    instances x threads fit in the cores available; no pinning (empty sets) when they do not,
    or off the CPU, where the cores only feed the GPUs."""
    cpus, t, n = available_cpus(), config.threads, config.instances
    if config.device != "cpu" or n * t > len(cpus):
        if config.device == "cpu":
            log.warning("%d instance(s) x %d thread(s) exceed the %d core(s) available: threads are not pinned "
                        "and will compete", n, t, len(cpus))
        return [()] * n
    return [tuple(cpus[r * t:(r + 1) * t]) for r in range(n)]


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
