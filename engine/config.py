"""Engine configuration: one frozen dataclass, filled from flags or by the Python API."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

from esp.engine.slo import ServiceSLO


def dtype_name(name: str, device: str = "cpu") -> str:
    """The dtype `--dtype` means on a device (auto: bfloat16 on CUDA, float32 on CPU)."""
    if name == "auto":
        return "bfloat16" if device == "cuda" else "float32"
    return name if name in ("float64", "bfloat16", "float16") else "float32"


def dtype_of(name: str, device: str = "cpu"):
    """The torch dtype of `--dtype` on a device."""
    import torch
    return getattr(torch, dtype_name(name, device))


def available_cpus() -> list[int]:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:
        return list(range(os.cpu_count() or 1))


def bundled_model_dir() -> Path:
    """The `esp-tiny` checkpoint shipped inside the package."""
    return Path(str(files("esp.engine") / "models" / "esp-tiny"))


@dataclass(frozen=True)
class EngineConfig:
    """`kv_tokens_per_instance=None` sizes each pool from free memory (under the simulator: from
    the profile); `threads_per_instance=None` splits the CPU cores evenly over the worker
    processes (at least one each). `tp`: tensor-parallel processes (devices) per instance
    (`esp.engine.tensor_parallel`); `threads_per_instance` then counts each process's threads.
    `backend="sim"` replaces the worker processes by the simulator (`esp.engine.sim`); `profile`
    names the cost model (a preset or a JSON file) that policies read and the simulator runs on.
    `decode_steps`: the most decode iterations per scheduling round (16; the simulator runs the
    same rounds, so that it models the engine as it runs). A round streams each iteration's
    tokens and ends after the iteration in progress when a request arrives, is aborted or ends,
    so the control plane runs once per round instead of once per token without holding anything
    back.
    `max_waiting_requests` / `max_waiting_tokens` bound the waiting queue (a full queue refuses
    new requests with `Overloaded`): None means unbounded requests, and for tokens 4x the
    cluster's KV slots. `max_restarts`: attempts to restart failed workers before the engine is
    down. `log_requests`: one INFO line per finished request on the `esp.requests` logger.
    `charge_scheduler` (simulator): each step starts after the wall time its `schedule()` took,
    so the virtual clock pays for the scheduler as a real engine does. `slo`: the latency
    targets of the service (`esp.engine.slo.ServiceSLO`), for requests that bring no `slo` of
    their own: schedulers aim for them, and every response reports whether they were met."""

    model: str | None = None
    instances: int = 1
    tp: int = 1
    device: str = "cpu"
    dtype: str = "auto"
    kv_tokens_per_instance: int | None = None
    threads_per_instance: int | None = None
    policy: str = "loong"
    scheduling: str | None = None
    batching: str | None = None
    scaling: str | None = None
    max_prefill_tokens: int = 16384
    max_batch_size: int = 256
    policy_options: dict = field(default_factory=dict)
    backend: str = "real"
    profile: str | None = None
    decode_steps: int = 16
    max_waiting_requests: int | None = 512
    max_waiting_tokens: int | None = None
    max_restarts: int = 3
    log_requests: bool = True
    charge_scheduler: bool = False
    slo: ServiceSLO | None = None

    def __post_init__(self) -> None:
        if self.instances < 1:
            raise ValueError(f"instances must be at least 1, got {self.instances}")
        if self.tp < 1:
            raise ValueError(f"tp must be at least 1, got {self.tp}")
        if self.backend not in ("real", "sim"):
            raise ValueError(f"backend must be real or sim, got {self.backend!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")
        if self.dtype not in ("auto", "float32", "float64", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, float64, bfloat16 or float16, got {self.dtype!r}")
        if self.kv_tokens_per_instance is not None and self.kv_tokens_per_instance < 1:
            raise ValueError("kv-tokens-per-instance must be positive")
        if not isinstance(self.decode_steps, int) or self.decode_steps < 1:
            raise ValueError(f"decode-steps must be a positive integer, got {self.decode_steps!r}")
        if self.threads_per_instance is not None and self.threads_per_instance < 1:
            raise ValueError("threads-per-instance must be positive")
        for name in ("max_waiting_requests", "max_waiting_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name.replace('_', '-')} must be positive")
        if self.charge_scheduler and self.backend != "sim":
            raise ValueError("charge-scheduler needs the sim backend (a real engine's steps already wait for it)")
        if self.max_restarts < 0:
            raise ValueError("max-restarts must be at least 0")

    @property
    def model_dir(self) -> Path:
        return Path(self.model) if self.model else bundled_model_dir()

    @property
    def threads(self) -> int:
        """Threads per worker process: by default the cores this process may use, split evenly,
        so instances x tp x threads never exceeds them (at least one each)."""
        return self.threads_per_instance or max(1, len(available_cpus()) // (self.instances * self.tp))

    def instance_device(self, rank: int, tp_rank: int = 0) -> str:
        """The device of tp rank `tp_rank` of instance `rank`: GPU `rank * tp + tp_rank`."""
        return f"cuda:{rank * self.tp + tp_rank}" if self.device == "cuda" else "cpu"
