"""Bench metrics on hand-made request timelines; expected numbers are computed by hand."""
from __future__ import annotations

import json
import warnings

import pytest
from esp.cli.bench.metrics import SLO, RequestRecord, capacity, summarize, sweep_summary

approx = pytest.approx


def rec(input_len, output_len, arrival, token_times, end=None, success=True, error="", first=None):
    token_times = tuple(token_times)
    if first is None and token_times:
        first = token_times[0]
    if end is None and token_times:
        end = token_times[-1]
    return RequestRecord(input_len=input_len, output_len=output_len, arrival_s=arrival,
                         first_token_s=first, token_times=token_times, end_s=end,
                         success=success, error=error)


# input 100, 5 tokens: arrival 1.0, tokens at 1.5 1.6 1.8 1.9 2.3
# TTFT 0.5, E2E 1.3, TPOT (1.3-0.5)/4 = 0.2, ITL gaps 0.1 0.2 0.1 0.4
SINGLE = rec(100, 5, 1.0, [1.5, 1.6, 1.8, 1.9, 2.3])


def test_single_request_exact_latencies_and_throughput():
    s = summarize([SINGLE], duration_s=2.0, slo=SLO())
    assert s["completed"] == 1 and s["failed"] == 0 and s["num_requests"] == 1
    assert s["ttft_s"] == approx({"mean": 0.5, "median": 0.5, "p90": 0.5, "p99": 0.5})
    assert s["e2e_s"]["mean"] == approx(1.3)
    assert s["tpot_s"]["mean"] == approx(0.2)
    # ITL sorted: 0.1 0.1 0.2 0.4 -> mean 0.2, median 0.15, p90 at index 2.7 -> 0.34, p99 at 2.97 -> 0.394
    assert s["itl_s"] == approx({"mean": 0.2, "median": 0.15, "p90": 0.34, "p99": 0.394})
    assert s["per_token_latency_s"]["mean"] == approx(1.3 / 105)
    assert s["input_token_latency_s"]["mean"] == approx(0.005)
    assert s["output_token_latency_s"]["mean"] == approx(0.2)
    assert s["total_input_tokens"] == 100 and s["total_output_tokens"] == 5
    assert s["request_throughput"] == approx(0.5)
    assert s["input_token_throughput"] == approx(50.0)
    assert s["output_token_throughput"] == approx(2.5)
    assert s["total_token_throughput"] == approx(52.5)
    # TTFT 0.5 > floor 0.25 and TPOT 0.2 > 0.1: a miss twice over
    assert s["slo_met"] == 0 and s["slo_attainment"] == 0.0 and s["goodput"] == 0.0
    json.dumps(s, allow_nan=False)


def test_chunked_stream_uses_chunk_gaps_for_itl_but_output_len_for_tpot():
    # 5 tokens in 3 chunks: first at 1.5, then 2 tokens at 1.9 and 2 at 2.3
    r = rec(100, 5, 1.0, [1.5, 1.9, 2.3])
    s = summarize([r], 2.0, SLO())
    assert s["itl_s"]["mean"] == approx(0.4) and s["itl_s"]["p99"] == approx(0.4)
    assert s["tpot_s"]["mean"] == approx(0.2)
    assert s["output_token_throughput"] == approx(2.5)


def test_first_token_s_overrides_token_times_and_missing_token_times():
    r = rec(10, 3, 0.0, [], first=0.2, end=0.6)  # server reported no per-token times
    s = summarize([r], 1.0, SLO())
    assert s["ttft_s"]["mean"] == approx(0.2) and s["tpot_s"]["mean"] == approx(0.2)
    assert s["itl_s"]["mean"] is None


def test_one_token_output_has_no_tpot_and_no_itl():
    one = rec(10, 1, 0.0, [0.1])  # TTFT 0.1, E2E 0.1
    s = summarize([one], 1.0, SLO())
    assert s["tpot_s"] == {"mean": None, "median": None, "p90": None, "p99": None}
    assert s["itl_s"]["mean"] is None and s["output_token_latency_s"]["mean"] is None
    assert s["per_token_latency_s"]["mean"] == approx(0.1 / 11)
    assert s["slo_met"] == 1 and s["slo_attainment"] == 1.0  # only TTFT counts, 0.1 <= 0.25
    both = summarize([one, SINGLE], 2.0, SLO())
    assert both["tpot_s"]["mean"] == approx(0.2)  # only SINGLE contributes
    assert both["itl_s"]["mean"] == approx(0.2)  # only SINGLE's 4 gaps
    assert both["ttft_s"]["mean"] == approx(0.3)


def test_failed_requests_excluded_from_latency_but_count_as_misses():
    ok = rec(10, 1, 0.0, [0.1])
    failed = [rec(5000, 0, 0.0, [], success=False, error="timeout"),
              rec(20, 0, 0.0, [], success=False, error="timeout"),
              RequestRecord(20, 3, 0.0, 0.05, (0.05,), None, True)]  # success, never ended -> failed
    s = summarize([ok] + failed, 4.0, SLO())
    assert s["completed"] == 1 and s["failed"] == 3
    assert s["errors"] == {"timeout": 2, "incomplete": 1}
    assert s["ttft_s"]["mean"] == approx(0.1) and s["e2e_s"]["mean"] == approx(0.1)
    assert s["total_input_tokens"] == 10 and s["total_output_tokens"] == 1
    assert s["request_throughput"] == approx(0.25)
    assert s["slo_attainment"] == approx(0.25) and s["goodput"] == approx(0.25)


def test_goodput_and_attainment_with_length_aware_slo():
    slo = SLO(ttft_scale=5.0, ttft_floor_s=0.25, tpot_s=0.1, predict_prefill=lambda n: n * 1e-3)
    assert slo.ttft_limit(10) == approx(0.25)  # 5 * 0.01 = 0.05 < floor
    assert slo.ttft_limit(100) == approx(0.5)
    assert slo.ttft_limit(1000) == approx(5.0)
    assert SLO().ttft_limit(10**6) == 0.25
    records = [
        rec(100, 3, 0.0, [0.4, 0.45, 0.5]),     # TTFT 0.4 <= 0.5, TPOT 0.05: met
        rec(100, 3, 0.0, [0.6, 0.65, 0.7]),     # TTFT 0.6 > 0.5: miss
        rec(1000, 3, 0.0, [4.0, 4.05, 4.1]),    # TTFT 4.0 <= 5.0, TPOT 0.05: met
        rec(1000, 3, 0.0, [1.0, 1.2, 1.4]),     # TPOT 0.2 > 0.1: miss
        rec(100, 1, 0.0, [0.5]),                # TTFT exactly at limit, no TPOT: met
        rec(100, 0, 0.0, [], success=False, error="boom"),  # miss
    ]
    s = summarize(records, 10.0, slo)
    assert s["slo_met"] == 3
    assert s["goodput"] == approx(0.3)
    assert s["slo_attainment"] == approx(0.5)
    assert s["request_throughput"] == approx(0.5)
    assert s["slo"] == {"ttft_scale": 5.0, "ttft_floor_s": 0.25, "tpot_s": 0.1, "length_aware": True}


def test_percentiles_on_one_to_hundred():
    records = [rec(10, 1, 0.0, [float(i)]) for i in range(1, 101)]  # TTFT = E2E = i seconds
    s = summarize(records, 100.0, SLO(), percentiles=(50, 90, 99, 99.9))
    # numpy linear interpolation: p = 1 + (p/100) * 99
    assert s["ttft_s"] == approx({"mean": 50.5, "median": 50.5, "p90": 90.1, "p99": 99.01,
                                  "p99.9": 99.901})
    assert s["input_token_latency_s"]["median"] == approx(5.05)


def test_bucket_split_default_and_custom():
    records = [rec(500, 1, 0.0, [0.1]), rec(2000, 1, 0.0, [0.2]), rec(2500, 1, 0.0, [0.4]),
               rec(9000, 1, 0.0, [1.0]), rec(200_000, 1, 0.0, [30.0]),
               rec(700, 0, 0.0, [], success=False)]
    s = summarize(records, 10.0, SLO())
    b = s["by_bucket"]
    assert list(b) == ["[0,1K)", "[1K,8K)", "[8K,32K)", "[128K,inf)"]  # [32K,128K) empty
    assert b["[0,1K)"]["completed"] == 1 and b["[0,1K)"]["failed"] == 1
    assert b["[0,1K)"]["slo_attainment"] == approx(0.5)
    assert b["[1K,8K)"]["ttft_s"]["mean"] == approx(0.3)
    assert b["[1K,8K)"]["request_throughput"] == approx(0.2)  # over the whole run's duration
    assert b["[1K,8K)"]["bucket"] == [1024, 8192] and b["[128K,inf)"]["bucket"] == [131072, None]
    assert "by_bucket" not in b["[8K,32K)"]
    assert sum(x["completed"] for x in b.values()) == s["completed"] == 5
    c = summarize(records, 10.0, SLO(), buckets=(0, 1000))["by_bucket"]
    assert list(c) == ["[0,1000)", "[1000,inf)"]
    assert c["[1000,inf)"]["completed"] == 4
    with pytest.raises(ValueError):
        summarize(records, 10.0, SLO(), buckets=(0, 8192, 1024))


def test_empty_inputs_give_zeros_and_none_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = summarize([], 0.0, SLO())
        f = summarize([rec(10, 0, 0.0, [], success=False)], 0.0, SLO())
    assert s["completed"] == 0 and s["failed"] == 0 and s["request_throughput"] == 0.0
    assert s["goodput"] == 0.0 and s["slo_attainment"] is None and s["by_bucket"] == {}
    assert s["ttft_s"]["mean"] is None and s["itl_s"]["p99"] is None
    assert f["failed"] == 1 and f["slo_attainment"] == 0.0 and f["e2e_s"]["median"] is None
    json.dumps(s, allow_nan=False)
    json.dumps(f, allow_nan=False)


def test_capacity_interpolation():
    # between (2, 0.95) and (3, 0.85): 2 + 0.05 / 0.10 = 2.5
    assert capacity([1, 2, 3, 4], [1.0, 0.95, 0.85, 0.5]) == approx(2.5)
    # every point meets the target -> the max rate
    assert capacity([1, 2], [0.99, 0.91]) == 2.0
    # none does -> None
    assert capacity([1, 2], [0.5, 0.2]) is None
    assert capacity([], []) is None
    # non-monotone: last point at/above is (3, 0.92), next (4, 0.5): 3 + 0.02 / 0.42 = 64/21
    assert capacity([1, 2, 3, 4], [0.95, 0.85, 0.92, 0.5]) == approx(64 / 21)
    # unsorted input, a point exactly at target
    assert capacity([3, 1, 2], [0.7, 1.0, 0.9]) == approx(2.0)
    # other target; None attainments are dropped
    assert capacity([1, 2, 3], [0.8, None, 0.4], target=0.5) == approx(1 + 0.3 / 0.4 * 2)
    with pytest.raises(ValueError):
        capacity([1, 2], [0.9])


def _fake(att, lat):
    return {"slo_attainment": att, "goodput": att, "per_token_latency_s": {"mean": lat},
            "ttft_s": {"mean": lat}, "tpot_s": {"mean": None},
            "by_bucket": {"[0,1K)": {"slo_attainment": att}}}


SWEEP = {
    "loong": {4.0: _fake(0.5, 0.03), 1.0: _fake(1.0, 0.01), 2.0: _fake(0.95, 0.015)},
    "static-sp": {"1.0": _fake(0.92, 0.02), "2.0": _fake(0.6, 0.04)},  # JSON-style string keys
}


def test_sweep_summary():
    s = sweep_summary(SWEEP)
    lo = s["loong"]
    assert lo["rates"] == [1.0, 2.0, 4.0]
    assert lo["slo_attainment"] == [1.0, 0.95, 0.5]
    assert lo["mean_per_token_latency_s"] == [0.01, 0.015, 0.03]
    assert lo["capacity"] == approx(2 + 0.05 / 0.45 * 2)
    assert lo["by_bucket"]["[0,1K)"]["capacity"] == approx(lo["capacity"])
    st = s["static-sp"]
    assert st["rates"] == [1.0, 2.0] and st["capacity"] == approx(1 + 0.02 / 0.32)
    json.dumps(s, allow_nan=False)


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    from esp.cli.bench.plot import plot_sweep

    sweep = dict(SWEEP, empty={1.0: {"slo_attainment": None, "per_token_latency_s": {"mean": None}}})
    out = tmp_path / "sweep.png"
    assert plot_sweep(sweep, str(out), title="test sweep") == str(out)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_errors_that_differ_only_in_numbers_are_counted_as_one_cause():
    failed = [RequestRecord(n, 0, 0.0, None, (), None, False, f"cannot place a request of {n} tokens")
              for n in (1200, 4500)]
    out = summarize(failed + [RequestRecord(5, 0, 0.0, None, (), None, False, "timeout")], 1.0, SLO())
    assert out["errors"] == {"cannot place a request of N tokens": 2, "timeout": 1}
