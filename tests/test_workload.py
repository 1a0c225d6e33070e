"""Shipped traces (esp.traces) and the bench workload generator (esp.cli.bench.workload)."""

from __future__ import annotations

import importlib.util
import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from esp import traces
from esp.cli.bench.workload import (
    TraceRequest,
    dataset_names,
    load_dataset,
    load_trace,
    make_workload,
    save_trace,
)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "traces"

EXPECTED_COUNTS = {
    "sharegpt": 1000, "leval": 2346, "lveval": 4115, "longbench-v2": 480, "mixed": 4500,
    "zipf-1.0": 2000, "zipf-1.2": 2000, "zipf-1.4": 2000,
    "mooncake-conversation": 1750, "mooncake-synthetic": 2254,
    "azure-code": 1482, "azure-conv": 2867,
}
PRODUCTION = ["sharegpt", "mooncake-conversation", "mooncake-synthetic", "azure-code", "azure-conv"]


def _pct(xs, p):
    s = sorted(xs)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def _raw(name):
    return [json.loads(line) for line in traces.path(name).read_text().splitlines()]


def _readme_table():
    rows = {}
    for line in (REPO / "traces" / "README.md").read_text().splitlines():
        m = re.match(r"\| `([\w.\-]+)` \| (\d+) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \| ([\d.]+) \|", line)
        if m:
            rows[m.group(1)] = [int(x) for x in m.groups()[1:7]] + [float(m.group(8))]
    return rows


def _build_module():
    spec = importlib.util.spec_from_file_location("build_traces", REPO / "scripts" / "build_traces.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------ shipped data
def test_dataset_names():
    assert dataset_names() == sorted(EXPECTED_COUNTS)
    assert traces.names() == sorted(EXPECTED_COUNTS)
    with pytest.raises(ValueError, match="sharegpt"):
        load_dataset("no-such-set")


def test_datasets_match_readme_statistics():
    table = _readme_table()
    assert set(table) == set(EXPECTED_COUNTS)
    for name, count in EXPECTED_COUNTS.items():
        reqs = load_dataset(name)
        ins = [r.input_len for r in reqs]
        outs = [r.output_len for r in reqs]
        got = [len(reqs), _pct(ins, 50), _pct(ins, 99), max(ins), _pct(outs, 50), max(outs)]
        assert len(reqs) == count, name
        assert got == table[name][:6], name
        assert max(r.arrival_s for r in reqs) == pytest.approx(table[name][6], abs=1e-3), name
        assert min(ins) >= 1 and min(outs) >= 1, name


def test_known_source_statistics():
    # values from the source READMEs under ../shared/traces
    sg = load_dataset("sharegpt")
    assert _pct([r.input_len for r in sg], 50) == 822 and max(r.input_len for r in sg) == 2238
    assert max(r.output_len for r in sg) == 993
    le = _raw("leval")
    measured = [d["input_len"] for d in le if not d.get("synthetic")]
    assert min(measured) == 2749 and max(measured) == 68624 and len(measured) == 2074
    # the paper's range 2.7K-210.5K, its tail from the 272 synthesized narrative_qa/codeU rows
    assert min(d["input_len"] for d in le) == 2749 and max(d["input_len"] for d in le) == 210_500
    assert sum(1 for d in le if d.get("synthetic")) == 272
    lb = [r.input_len for r in load_dataset("longbench-v2")]
    assert min(lb) == 11867 and max(lb) == 1915804 and sum(x >= 100_000 for x in lb) == 264
    assert {r.output_len for r in load_dataset("longbench-v2")} == {128}


def test_production_traces_have_real_sorted_arrivals():
    for name in PRODUCTION:
        t = [r.arrival_s for r in load_dataset(name)]
        assert t[0] == 0.0 and t == sorted(t), name
        limit = 1000.0 if name == "sharegpt" else 600.0
        assert 0.9 * limit < t[-1] < limit + 0.01, name
    sg = [r.arrival_s for r in load_dataset("sharegpt")]
    gaps = np.diff(sg)
    assert np.std(gaps) / np.mean(gaps) == pytest.approx(1.03, abs=0.05)  # the README's CV


def test_lveval_is_marked_synthetic_and_in_range():
    raw = _raw("lveval")
    assert all(d["synthetic"] is True for d in raw)
    assert all(15_100 <= d["input_len"] <= 497_300 and 5 <= d["output_len"] <= 60 for d in raw)
    ins = [d["input_len"] for d in raw]
    assert min(ins) < 17_000 and max(ins) > 450_000  # spans the paper's 15.1K-497.3K
    # LV-Eval's published mean, 102,380 words, at 1.28 tokens/word
    assert np.mean(ins) == pytest.approx(102_380 * 1.28, rel=0.03)
    # five balanced levels: 823 requests around each nominal size (x1.28 tokens/word)
    for words in (16_000, 32_000, 64_000, 128_000, 256_000):
        lo, hi = words * 1.28 * 0.74, words * 1.28 * 1.52
        assert sum(lo - 1 <= d["input_len"] <= hi + 1 for d in raw) >= 823


def test_mixed_equal_shares_and_filters():
    raw = _raw("mixed")
    assert len(raw) == 4500
    assert Counter(d["source"] for d in raw) == {"sharegpt": 1500, "leval": 1500, "lveval": 1500}
    assert all(d["input_len"] >= 16 and d["output_len"] >= 4 for d in raw)
    assert all(d.get("synthetic", False) for d in raw if d["source"] == "lveval")
    assert not any(d.get("synthetic", False) for d in raw if d["source"] == "sharegpt")
    for src in ("sharegpt", "leval", "lveval"):
        pairs = {(r.input_len, r.output_len) for r in load_dataset(src)}
        assert all((d["input_len"], d["output_len"]) in pairs for d in raw if d["source"] == src)
    # shuffled: the sources are interleaved, not in blocks
    assert len({d["source"] for d in raw[:100]}) == 3


def test_zipf_support_and_skew():
    # LoongServe's recipe: Zipf targets over 10..200K snapped to real requests of the pooled sets
    pool = {(r.input_len, r.output_len) for name in ("sharegpt", "leval", "lveval") for r in load_dataset(name)}
    medians = []
    for a in ("1.0", "1.2", "1.4"):
        reqs = load_dataset(f"zipf-{a}")
        ins = [r.input_len for r in reqs]
        assert min(ins) == 10 and 190_000 < max(ins) <= 200_000
        assert all((r.input_len, r.output_len) in pool for r in reqs)
        medians.append(_pct(ins, 50))
    assert medians[0] > medians[1] > medians[2]


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/traces")
def test_build_is_deterministic_and_matches_shipped(tmp_path):
    mod = _build_module()
    mod.build(SHARED, tmp_path / "a")
    mod.build(SHARED, tmp_path / "b")
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted([f"{n}.jsonl" for n in EXPECTED_COUNTS] + ["README.md"])
    for f in files:
        a = (tmp_path / "a" / f).read_bytes()
        assert a == (tmp_path / "b" / f).read_bytes(), f
        assert a == (REPO / "traces" / f).read_bytes(), f"traces/{f} is stale; rerun the build"
    total = sum((REPO / "traces" / f).stat().st_size for f in files)
    assert total < 2_100_000


# ------------------------------------------------------------------ trace I/O
def test_save_load_roundtrip(tmp_path):
    reqs = [TraceRequest(0.0, 10, 2), TraceRequest(1.5, 1, 1), TraceRequest(2.25, 300000, 7)]
    save_trace(tmp_path / "t.jsonl", reqs)
    assert load_trace(tmp_path / "t.jsonl") == reqs


@pytest.mark.parametrize("bad", [
    "{not json",
    '{"arrival_s": 0.0, "input_len": 5}',
    '{"arrival_s": 0.0, "input_len": -1, "output_len": 3}',
    '{"arrival_s": 0.0, "input_len": 2.5, "output_len": 3}',
    '{"arrival_s": "soon", "input_len": 2, "output_len": 3}',
    "[1, 2, 3]",
])
def test_bad_jsonl_names_file_and_line(tmp_path, bad):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"arrival_s": 0.0, "input_len": 5, "output_len": 1}\n\n' + bad + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:3:"):
        load_trace(p)


# ------------------------------------------------------------------ make_workload
def _gaps(reqs):
    return np.diff([r.arrival_s for r in reqs])


def test_poisson_mean_and_determinism():
    src = load_dataset("sharegpt")
    w = make_workload(src, 20_000, rate=5.0, seed=1)
    assert len(w) == 20_000 and w[0].arrival_s == 0.0
    g = _gaps(w)
    assert np.all(g >= 0)
    assert g.mean() == pytest.approx(0.2, rel=0.03)
    assert g.std() / g.mean() == pytest.approx(1.0, abs=0.05)
    assert make_workload(src, 20_000, rate=5.0, seed=1) == w
    other = make_workload(src, 20_000, rate=5.0, seed=2)
    assert other != w and [r.arrival_s for r in other] != [r.arrival_s for r in w]
    pairs = {(r.input_len, r.output_len) for r in src}
    assert all((r.input_len, r.output_len) in pairs for r in w)  # resampled with replacement


def test_sampling_without_replacement_when_possible():
    src = [TraceRequest(0.0, i + 1, 1) for i in range(50)]
    w = make_workload(src, 50, rate=1.0, seed=0)
    assert sorted(r.input_len for r in w) == list(range(1, 51))
    assert [r.input_len for r in w] != list(range(1, 51))  # shuffled


@pytest.mark.parametrize("shape", [0.25, 0.5, 2.0, 4.0])
def test_burstiness_sets_cv(shape):
    g = _gaps(make_workload(load_dataset("leval"), 20_000, rate=2.0, seed=3, burstiness=shape))
    assert g.mean() == pytest.approx(0.5, rel=0.05)
    assert g.std() / g.mean() == pytest.approx(1 / math.sqrt(shape), rel=0.1)


def test_infinite_rate_sends_all_at_once():
    assert {r.arrival_s for r in make_workload(load_dataset("leval"), 100, math.inf, 0)} == {0.0}


def test_replay_keeps_trace_times():
    src = load_dataset("azure-conv")
    w = make_workload(src, 500, rate=None, seed=0)
    assert w == src[:500]
    with pytest.raises(ValueError, match="replay"):
        make_workload(src, len(src) + 1, rate=None, seed=0)


def test_max_context_scale_fits_and_preserves_order():
    src = load_dataset("longbench-v2")
    base = make_workload(src, 300, rate=1.0, seed=7)
    w = make_workload(src, 300, rate=1.0, seed=7, max_context=131_072)
    assert [r.arrival_s for r in w] == [r.arrival_s for r in base]
    assert all(r.input_len + r.output_len <= 131_072 for r in w)
    assert all(r.input_len >= 1 and r.output_len >= 1 for r in w)
    assert max(r.input_len + r.output_len for r in w) > 0.99 * 131_072 * max(
        r.input_len + r.output_len for r in base) / max(s.input_len + s.output_len for s in src)
    order = np.argsort([r.input_len for r in base], kind="stable")
    scaled = np.array([r.input_len for r in w])[order]
    assert np.all(np.diff(scaled) >= 0)
    ratio = np.array([r.input_len / b.input_len for r, b in zip(w, base)])
    assert ratio.max() - ratio.min() < 0.01  # one common factor


def test_max_context_clip_truncates_only_long_requests():
    src = load_dataset("mixed")
    base = make_workload(src, 1000, rate=1.0, seed=4)
    w = make_workload(src, 1000, rate=1.0, seed=4, max_context=32_768, fit="clip")
    for b, r in zip(base, w):
        assert r.input_len + r.output_len <= 32_768
        if b.input_len + b.output_len <= 32_768:
            assert r == b
        else:
            assert r.output_len == b.output_len and r.input_len == 32_768 - b.output_len
    with pytest.raises(ValueError, match="fit"):
        make_workload(src, 10, rate=1.0, seed=0, max_context=1000, fit="squash")


def test_min_output_and_minimum_lengths():
    src = [TraceRequest(0.0, 0, 0), TraceRequest(1.0, 5, 2)]
    w = make_workload(src, 2, rate=None, seed=0, min_output=4)
    assert [(r.input_len, r.output_len) for r in w] == [(1, 4), (5, 4)]
    tiny = make_workload(load_dataset("lveval"), 200, rate=1.0, seed=0, max_context=2)
    assert all(r.input_len == 1 and r.output_len == 1 for r in tiny)


def test_scale_input_keeps_outputs_up_to_a_cap_and_shrinks_inputs_by_one_factor():
    src = [TraceRequest(0.0, n, o) for n, o in ((100_000, 40), (10_000, 500), (1_000, 3))]
    w = make_workload(src, 3, None, seed=0, max_context=1024, fit="scale-input")
    # cap 128; factor (1024 - 128) / 100000 = 0.00896: inputs 896, 89, 8
    assert [(r.input_len, r.output_len) for r in w] == [(896, 40), (89, 128), (8, 3)]
