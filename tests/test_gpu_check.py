"""`scripts/gpu_check.py` in its CPU mode (the Triton interpreter, gloo, tiny shapes): the
script the GPU machines run keeps working, and its checks pass here."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


def test_gpu_check_cpu_mode_passes(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "check.json"
    res = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--json", str(out)],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["ok"] and set(report["kernels"]) == {"prefill_float32", "decode_float32"}
    assert report["equivalence"] and all(c["ok"] for c in report["equivalence"].values())
    assert report["speed"]["prefill_speed_over_sdpa"] > 0


def test_gpu_check_without_cuda_says_so():
    res = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    if res.returncode != 2:
        pytest.skip("this machine has CUDA")
    assert "no CUDA device" in res.stderr and len(res.stderr.strip().splitlines()) == 1
