"""Attention kernels (DESIGN 4.5): every attention routine returns `(out, lse)`, and
`merge_attn_states` combines partials over disjoint key sets.

Each public function checks its inputs (ValueError on a mismatch) and runs the torch
reference, the fused CPU path (`esp.kernels.*_cpu`, the default on CPU tensors) or the
Triton kernel (the default on CUDA), chosen in one place, `esp.kernels.backend`, from
`backend=`, `set_kernel_backend()` or `ESP_KERNELS`. The Triton modules
(`esp.kernels.*_triton`) are imported only when that backend runs.
"""
from __future__ import annotations

from esp.kernels.backend import get_kernel_backend, resolve_backend, set_kernel_backend
from esp.kernels.decode import (SlotRuns, append_slots, decode_partial_attention, decode_partial_attention_ref,
                                slot_runs)
from esp.kernels.merge import merge_attn_states, merge_attn_states_ref
from esp.kernels.prefill import StripeLayout, striped_attention_step, striped_attention_step_ref
from esp.kernels.store import store_kv, store_kv_ref

__all__ = [
    "SlotRuns",
    "StripeLayout",
    "append_slots",
    "decode_partial_attention",
    "decode_partial_attention_ref",
    "get_kernel_backend",
    "merge_attn_states",
    "merge_attn_states_ref",
    "resolve_backend",
    "set_kernel_backend",
    "slot_runs",
    "store_kv",
    "store_kv_ref",
    "striped_attention_step",
    "striped_attention_step_ref",
]
