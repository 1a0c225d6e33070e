"""Moved to `esp.costs.cost_fit`; this name stays for plug-ins that import it."""
from __future__ import annotations

from esp.costs.cost_fit import (DecodeSample, PrefillSample, TransferSample, decode_features, fit_cost_model,
                                nnls_relative, prefill_features)

__all__ = ["DecodeSample", "PrefillSample", "TransferSample", "decode_features", "fit_cost_model",
           "nnls_relative", "prefill_features"]
