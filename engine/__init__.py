"""esp.engine: the serving engine (control plane, backends, model, data plane)."""
from __future__ import annotations

from esp.engine.config import EngineConfig
from esp.engine.outputs import RequestOutput, Timing
from esp.engine.sampling_params import SamplingParams


def __getattr__(name: str):
    if name == "Engine":
        from esp.engine.engine import Engine
        return Engine
    raise AttributeError(name)


__all__ = ["Engine", "EngineConfig", "RequestOutput", "SamplingParams", "Timing"]
