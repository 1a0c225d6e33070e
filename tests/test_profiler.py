"""`esp-run profile`: real workers, a fitted profile that `CostModel.load` reads and that predicts."""
from __future__ import annotations

import asyncio
import itertools
import statistics
import subprocess
import sys
import time

import pytest
from esp.costs.cost_model import CostModel
from esp.engine.instances import rendezvous
from esp.engine.workers import WorkerGroup
from esp.engine.config import bundled_model_dir
from esp.engine.profiler import dops_of, log_grid
from esp.engine.protocol import KeepRange, PrefillBatch, PrefillSeq, SampleSpec
from esp.engine.sampling_params import SamplingParams
from esp.engine.worker import WorkerSpec

FLAGS = ["--instances", "2", "--threads-per-instance", "1", "--kv-tokens-per-instance", "4096"]


def esp_run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "esp.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_grids():
    assert log_grid(16, 1024) == [16, 32, 64, 128, 256, 512, 1024]
    assert log_grid(16, 100)[-1] == 100 and log_grid(16, 16) == [16]
    assert dops_of(1) == [1] and dops_of(2) == [1, 2] and dops_of(6) == [1, 2, 4, 6]


@pytest.mark.parametrize("args, message", [
    (["--repeats", "0"], "positive integer"),
    (["--max-len", "8"], "--max-len must be at least 16"),
    ([], "the following arguments are required: --out"),
])
def test_profile_bad_flags_give_one_line(tmp_path, args, message):
    if "--out" not in message:
        args = args + ["--out", str(tmp_path / "p.json")]
    res = esp_run("profile", *args, timeout=120)
    assert res.returncode != 0 and res.returncode in (1, 2)
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1


async def measure_prefill(n: int, repeats: int = 3) -> float:
    """A fresh 1024-token prefill on instance 0 of a new 2-instance group, wall time as the scheduler sees it."""
    init = rendezvous()
    group = WorkerGroup(lambda: [WorkerSpec(r, 2, str(bundled_model_dir()), "cpu", "auto", 4096, 1, init)
                                 for r in (0, 1)])
    await group.start()
    try:
        times = []
        for i in range(repeats + 1):
            seq = PrefillSeq(i + 1, [(7 * j) % 4000 + 3 for j in range(n)], (KeepRange(0, 0, n, list(range(n))),),
                             SampleSpec(SamplingParams(temperature=0.0), 0, 0))
            t0 = time.perf_counter()
            await group.run(PrefillBatch(i + 1, (0,), (seq,), released={0: (i,)} if i else {}))
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:])
    finally:
        await group.shutdown()


@pytest.mark.slow
def test_quick_profile_fits_and_predicts(tmp_path):
    out = tmp_path / "p.json"
    t0 = time.perf_counter()
    res = esp_run("profile", *FLAGS, "--quick", "--out", str(out), timeout=300)
    assert res.returncode == 0, res.stderr
    assert time.perf_counter() - t0 < 150
    assert "prefill  dop=1" in res.stdout and "wall time" in res.stdout
    model = CostModel.load(out)
    assert set(model.prefill) == {1, 2} and set(model.decode) == {1, 2}
    assert model.kv_bytes_per_token == 2 * 4 * 2 * 32 * 4  # esp-tiny, float32 on CPU
    assert model.transfer_bytes_per_s > 0 and model.meta["transfer_measured"] is True
    for dop in (1, 2):
        times = [model.prefill_time([n], dop) for n in (16, 64, 256, 1024)]
        assert all(a < b for a, b in itertools.pairwise(times)), times
        assert model.decode_time(8, 8 * 1024, dop) > 0
    report = model.meta["report"]
    assert report["prefill"]["1"]["rel_error"]["median"] < 0.3
    assert report["prefill"]["2"]["rel_error"]["median"] < 0.4
    measured = asyncio.run(measure_prefill(1024))
    predicted = model.prefill_time([1024], 1)
    assert measured / 2 < predicted < measured * 2, (predicted, measured)
