"""Moved to `esp.costs.presets`; this name stays for plug-ins that import it."""
from __future__ import annotations

from esp.costs.presets import (A800_80GB, CALIBRATED_TP, DEFAULT_TP, GPUS_PER_NODE, H100_80GB, H200,
                               KV_MEMORY_FRACTION, LWM_7B, PRESETS, Device, ModelShape, calibrated_profile,
                               kv_tokens_per_instance, load_profile, preset_names, roofline_profile)

__all__ = ["A800_80GB", "CALIBRATED_TP", "DEFAULT_TP", "GPUS_PER_NODE", "H100_80GB", "H200", "KV_MEMORY_FRACTION",
           "LWM_7B", "PRESETS", "Device", "ModelShape", "calibrated_profile", "kv_tokens_per_instance",
           "load_profile", "preset_names", "roofline_profile"]
