"""How the main process describes its instances before starting them: the workers' specs,
with CPU KV pools sized from available memory (the engine and the profiler share this).
With `--tp N` an instance is N processes, `instance * N + tp_rank` in the job."""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from esp.engine.config import EngineConfig, available_cpus, dtype_of
from esp.engine.kv_pool import KVPool
from esp.engine.model_config import ModelConfig
from esp.engine.tensor_parallel import local_kv_heads
from esp.engine.worker import WorkerSpec

log = logging.getLogger("esp.engine")


def kv_bytes_per_token(config: EngineConfig, model: ModelConfig) -> int:
    """One token's KV in one instance: all its tp ranks' heads (replicated KV heads counted
    on every rank that holds them)."""
    return KVPool.bytes_per_slot(model.num_hidden_layers, config.tp * local_kv_heads(model, config.tp), model.head_dim,
                                 dtype_of(config.dtype, config.device))


def auto_kv_slots(config: EngineConfig, model: ModelConfig) -> int:
    """On CPU: 30% of available memory split over the instances, at most 4x the context."""
    budget = _available_memory() * 0.3 / config.instances
    return max(1024, min(int(budget // kv_bytes_per_token(config, model)), 4 * model.max_position_embeddings))


def worker_specs(config: EngineConfig, model: ModelConfig) -> list[WorkerSpec]:
    """One spec per process (instance by instance, tp rank by tp rank); `kv_slots=None` on CUDA
    lets each worker size its pool from free memory."""
    slots = config.kv_tokens_per_instance or (auto_kv_slots(config, model) if config.device == "cpu" else None)
    init = rendezvous()
    cpus = cpu_sets(config)
    tp = config.tp
    return [WorkerSpec(rank, config.instances * tp, str(config.model_dir), config.instance_device(rank, t),
                       config.dtype, slots, config.threads, init, cpus[rank * tp + t], tp, t)
            for rank in range(config.instances) for t in range(tp)]


def cpu_sets(config: EngineConfig) -> list[tuple[int, ...]]:
    """The cores each process's threads are pinned to: disjoint sets of `threads` cores when
    processes (instances x tp) x threads fit in the cores available; no pinning (empty sets)
    when they do not, or off the CPU, where the cores only feed the GPUs."""
    cpus, t, n = available_cpus(), config.threads, config.instances * config.tp
    if config.device != "cpu" or n * t > len(cpus):
        if config.device == "cpu":
            log.warning("%d worker process(es) x %d thread(s) exceed the %d core(s) available: threads are not "
                        "pinned and will compete", n, t, len(cpus))
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
