"""Moved to `esp.costs.cost_model`; this name stays for plug-ins that import it."""
from __future__ import annotations

from esp.costs.cost_model import DECODE_BASES, Coefficients, CostModel

__all__ = ["DECODE_BASES", "Coefficients", "CostModel"]
