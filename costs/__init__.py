"""Step-time cost models (DESIGN 7), one package for the engine, the simulator, the profiler
and the policies: `CostModel` (`cost_model`), fitting measured step times (`cost_fit`), the
calibration to LoongServe's published measurements (`calibration`, also
`python -m esp.costs.calibration`) and named presets (`presets`). See `docs/cost_model.md`."""
from __future__ import annotations

__all__ = ["CostModel", "load_profile", "preset_names"]


def __getattr__(name: str):
    # lazy, so that `python -m esp.costs.calibration` does not import its own module first
    if name == "CostModel":
        from esp.costs.cost_model import CostModel
        return CostModel
    if name in ("load_profile", "preset_names"):
        from esp.costs import presets
        return getattr(presets, name)
    raise AttributeError(f"module 'esp.costs' has no attribute {name!r}")
