"""A service's latency targets (`ServiceSLO`) against hand-computed ones, and the bench's SLO as the
same rule."""
from __future__ import annotations

import pytest

from esp.cli.bench.metrics import SLO
from esp.engine.slo import LatencySLO, ServiceSLO


def prefill(n: int) -> float:
    return 0.001 * n  # 1 ms per token


def test_the_ttft_target_is_the_larger_of_the_floor_and_the_scaled_prefill():
    slo = ServiceSLO(ttft_scale=5.0, ttft_floor_s=0.25, tpot_s=0.1)
    assert slo.for_request(10, prefill) == LatencySLO(0.25, 0.1)  # 5 x 10 ms < 250 ms
    assert slo.for_request(1000, prefill) == LatencySLO(5.0, 0.1)
    assert ServiceSLO(ttft_floor_s=0.5).for_request(1000, prefill) == LatencySLO(0.5, None)
    assert ServiceSLO(ttft_scale=2.0).for_request(1000, prefill) == LatencySLO(2.0, None)
    assert ServiceSLO(tpot_s=0.05).for_request(1000, prefill) == LatencySLO(None, 0.05)
    assert ServiceSLO().for_request(1000, prefill) is None


def test_a_requests_own_targets_replace_the_services_field_by_field():
    slo = ServiceSLO(ttft_scale=5.0, ttft_floor_s=0.25, tpot_s=0.1)
    assert slo.for_request(1000, prefill, LatencySLO(ttft_s=1.0)) == LatencySLO(1.0, 0.1)
    assert slo.for_request(1000, prefill, LatencySLO(tpot_s=0.02)) == LatencySLO(5.0, 0.02)
    assert slo.for_request(1000, prefill, LatencySLO(2.0, 0.03)) == LatencySLO(2.0, 0.03)


@pytest.mark.parametrize("fields, message", [
    ({"ttft_scale": 0.0}, "ttft_scale must be a positive number"),
    ({"tpot_s": -0.1}, "tpot_s must be a positive number"),
    ({"tpot_s": float("inf")}, "tpot_s must be a positive number"),
    ({"ttft_floor_s": -1.0}, "ttft_floor_s must be at least 0"),
    ({"ttft_floor_s": float("nan")}, "ttft_floor_s must be at least 0"),
])
def test_bad_service_targets_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        ServiceSLO(**fields)


def test_the_bench_slo_served_by_an_engine_sets_the_same_targets_it_measures():
    bench = SLO(ttft_scale=5.0, ttft_floor_s=0.25, tpot_s=0.1, predict_prefill=prefill)
    for n in (1, 50, 49, 51, 4000):
        target = bench.service().for_request(n, prefill)
        assert target == LatencySLO(bench.ttft_limit(n), 0.1)
        assert target.ttft_s == max(0.25, 0.005 * n)
