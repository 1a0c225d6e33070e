"""Cost-model fitting (relative-error NNLS) and the named roofline presets (the calibrated
A800 presets are checked against the paper in `test_cost_model.py`)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from esp.engine.config import bundled_model_dir
from esp.costs.cost_fit import (
    DecodeSample,
    PrefillSample,
    TransferSample,
    fit_cost_model,
    nnls_relative,
)
from esp.costs.cost_model import CostModel
from esp.costs.presets import (
    A800_80GB,
    H100_80GB,
    LWM_7B,
    PRESETS,
    ModelShape,
    load_profile,
    preset_names,
    roofline_profile,
)

KV_BYTES = 524288
TRUE_PREFILL = {1: (0.02, 1.6e-4, 1.1e-10), 2: (0.03, 8.5e-5, 5.6e-11), 4: (0.045, 4.4e-5, 2.9e-11)}
TRUE_DECODE = {1: (0.011, 2.0e-4, 4.0e-8), 2: (0.014, 1.1e-4, 2.1e-8), 4: (0.02, 6.0e-5, 1.1e-8)}
TRUE_TRANSFER = (2e-5, 1.5e11)  # latency_s, bytes_per_s


def synth(noise: float = 0.0, seed: int = 0, prefill=TRUE_PREFILL, decode=TRUE_DECODE, n: int = 40):
    rng = np.random.default_rng(seed)

    def jitter(t: float) -> float:
        return t * (1 + rng.uniform(-noise, noise)) if noise else t

    pre, dec = [], []
    for dop, (a, b, c) in prefill.items():
        for _ in range(n):
            lengths = tuple(int(x) for x in np.exp(rng.uniform(np.log(16), np.log(200_000), int(rng.integers(1, 5)))))
            pre.append(PrefillSample(dop, lengths, jitter(a + b * sum(lengths) + c * sum(x * x for x in lengths))))
    for dop, (d0, d1, d2) in decode.items():
        for _ in range(n):
            batch = int(rng.integers(1, 128))
            kv = int(np.exp(rng.uniform(np.log(batch * 16), np.log(2_000_000))))
            dec.append(DecodeSample(dop, batch, kv, jitter(d0 + d1 * batch + d2 * kv)))
    lat, bw = TRUE_TRANSFER
    moves = [TransferSample(nb, jitter(lat + nb / bw)) for nb in (int(x) for x in rng.integers(1 << 10, 1 << 33, n))]
    return pre, dec, moves


def test_exact_recovery_without_noise():
    model, report = fit_cost_model(*synth(), kv_bytes_per_token=KV_BYTES, meta={"gpu": "test"})
    for table, truth in ((model.prefill, TRUE_PREFILL), (model.decode, TRUE_DECODE)):
        assert sorted(table) == [1, 2, 4]
        for dop, coeffs in truth.items():
            np.testing.assert_allclose(table[dop], coeffs, rtol=1e-6)
    assert model.transfer_latency_s == pytest.approx(TRUE_TRANSFER[0], rel=1e-6)
    assert model.transfer_bytes_per_s == pytest.approx(TRUE_TRANSFER[1], rel=1e-6)
    assert model.kv_bytes_per_token == KV_BYTES and model.name == "fitted"
    assert model.meta["gpu"] == "test" and model.meta["source"] == "fit"
    for kind in ("prefill", "decode"):
        for dop in (1, 2, 4):
            part = report[kind][dop]
            assert part["samples"] == 40 and not part["rank_deficient"]
            assert part["rel_error"]["max"] < 1e-9
            np.testing.assert_allclose(part["coefficients"], (TRUE_PREFILL if kind == "prefill" else TRUE_DECODE)[dop],
                                       rtol=1e-6)
    assert report["transfer"]["rel_error"]["max"] < 1e-9
    assert report["transfer"]["bytes_per_s"] == pytest.approx(TRUE_TRANSFER[1], rel=1e-6)
    json.dumps(report)  # plain data
    assert CostModel.from_json(json.loads(json.dumps(model.to_json()))) == model


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_recovery_with_two_percent_noise(seed):
    model, report = fit_cost_model(*synth(noise=0.02, seed=seed, n=200), kv_bytes_per_token=KV_BYTES)
    # Over 50 seeds the worst errors are a 1%, b 0.4%, c 7% (the quadratic term is at most ~12%
    # of a prompt's time, so 2% noise moves it most), d0 1%, d1 3%, d2 2%.
    for dop in (1, 2, 4):
        np.testing.assert_allclose(model.prefill[dop][:2], TRUE_PREFILL[dop][:2], rtol=0.03)
        assert model.prefill[dop][2] == pytest.approx(TRUE_PREFILL[dop][2], rel=0.1)
        np.testing.assert_allclose(model.decode[dop], TRUE_DECODE[dop], rtol=0.05)
        for lengths in ([1000], [50_000, 20_000], [180_000]):
            a, b, c = TRUE_PREFILL[dop]
            truth = a + b * sum(lengths) + c * sum(x * x for x in lengths)
            assert model.prefill_time(lengths, dop) == pytest.approx(truth, rel=0.02)
        for kind in ("prefill", "decode"):
            err = report[kind][dop]["rel_error"]
            assert 0.005 < err["median"] < 0.015 and err["max"] <= 0.03
    assert model.transfer_bytes_per_s == pytest.approx(TRUE_TRANSFER[1], rel=0.03)


def test_too_few_samples_names_the_dop():
    pre, dec, moves = synth()
    pre = [s for s in pre if s.dop != 2] + [s for s in pre if s.dop == 2][:2]
    with pytest.raises(ValueError, match="prefill dop=2"):
        fit_cost_model(pre, dec, moves, KV_BYTES)
    pre, dec, moves = synth()
    with pytest.raises(ValueError, match="decode dop=4"):
        fit_cost_model(pre, [s for s in dec if s.dop != 4] + [DecodeSample(4, 1, 10, 0.01)], moves, KV_BYTES)
    with pytest.raises(ValueError, match="transfer"):
        fit_cost_model(pre, dec, moves[:1], KV_BYTES)
    with pytest.raises(ValueError, match="no decode samples"):
        fit_cost_model(pre, [], moves, KV_BYTES)


@pytest.mark.parametrize("seed", range(10))
def test_nnls_never_negative_when_truth_has_zero_term(seed):
    prefill = {1: (0.0, 1.6e-4, 1.1e-10), 2: (0.03, 8.5e-5, 0.0)}
    decode = {1: (0.011, 0.0, 4.0e-8), 2: (0.0, 1.1e-4, 2.1e-8)}
    model, _ = fit_cost_model(*synth(noise=0.02, seed=seed, prefill=prefill, decode=decode), KV_BYTES)
    for table in (model.prefill, model.decode):
        for coeffs in table.values():
            assert all(c >= 0 for c in coeffs), coeffs
    # and the directly constructed case where plain least squares goes negative
    x = np.array([[1, 1.0], [1, 2.0], [1, 3.0]])
    y = np.array([0.9, 2.1, 3.3])  # intercept -0.3 unconstrained
    coef = nnls_relative(x, y)
    assert coef[0] == 0.0 and coef[1] > 0


def test_nonpositive_seconds_rejected():
    with pytest.raises(ValueError, match="positive"):
        nnls_relative(np.ones((3, 1)), np.array([1.0, 0.0, 2.0]))


# -- presets -----------------------------------------------------------------------------

def test_a800_roofline_prefill_100k_by_hand():
    # LWM-7B matmul params: 32 * (4096*4096*4 + 3*4096*11008) + 32000*4096 = 6,607,077,376
    params = 32 * (4096 * 4096 * 4 + 3 * 4096 * 11008) + 32000 * 4096
    assert params == 6_607_077_376
    tokens = 100_000
    flops = 2 * 6_607_077_376 * tokens + 2 * 32 * 32 * 128 * tokens ** 2  # 1.3214e15 + 2.6214e15 = 3.943e15
    tp2_compute = flops / (0.6 * 2 * 312e12)  # ~10.53 s on one TP=2 instance of A800s
    assert tp2_compute == pytest.approx(10.53, rel=0.01)
    # TP=2: two all-reduces per layer of 4096 bf16 activations per token; a ring all-reduce of 2
    # members sends 2 * (2 - 1) / 2 = 1 message per member over one GPU's 200 GB/s link
    allreduce = tokens * 2 * 32 * 4096 * 2 * 1 / 200e9  # 0.262 s
    t = load_profile("a800-lwm7b-tp2-roofline").prefill_time([tokens], dop=1)
    assert t == pytest.approx(tp2_compute + allreduce, rel=0.01)
    t1 = load_profile("a800-lwm7b-tp1-roofline").prefill_time([tokens], dop=1)  # one A800 per instance
    assert t1 == pytest.approx(2 * tp2_compute, rel=0.01)
    # elastic SP over 4 instances: about 4x faster on a long prompt
    assert load_profile("a800-lwm7b-tp2-roofline").prefill_time([tokens], dop=4) == pytest.approx(t / 4, rel=0.05)


def test_h100_faster_by_peak_ratio():
    ratio = H100_80GB.bf16_flops_per_s / A800_80GB.bf16_flops_per_s  # 989 / 312 = 3.17
    for h100_name in ("h100-lwm7b", "h100-lwm7b-tp1"):
        a800, h100 = load_profile("a800-lwm7b-tp1-roofline"), load_profile(h100_name)
        speedup = a800.prefill_time([500_000]) / h100.prefill_time([500_000])
        assert speedup == pytest.approx(ratio, rel=0.02)
        assert 2.5 < speedup < 4
    assert load_profile("h200-lwm7b").prefill_time([500_000]) == pytest.approx(
        load_profile("h100-lwm7b").prefill_time([500_000]), rel=1e-9)
    assert load_profile("h200-lwm7b").decode_time(8, 400_000) < load_profile("h100-lwm7b").decode_time(8, 400_000)


def test_decode_grows_with_kv_tokens():
    for name in preset_names():
        p = load_profile(name)
        times = [p.decode_time(8, kv) for kv in (1_000, 100_000, 1_000_000)]
        assert times[0] < times[1] < times[2]
        assert 0.002 < times[0] < 0.2


def test_kv_capacity_a800_tp2():
    # (2 * 81920 MiB * 0.9 - 13.48 GB of weights) / 524288 B per token ~= 269K tokens
    assert LWM_7B.kv_bytes_per_token == 2 * 32 * 32 * 128 * 2 == 524288
    assert LWM_7B.weight_bytes == pytest.approx(13.48e9, rel=0.01)
    by_hand = (2 * 81920 * 2**20 * 0.9 - 13.48e9) / 524288
    kv = load_profile("a800-lwm7b-tp2").meta["kv_tokens_per_instance"]
    assert kv == pytest.approx(by_hand, rel=0.01)
    assert 230_000 < kv < 290_000
    assert 100_000 < load_profile("a800-lwm7b-tp1").meta["kv_tokens_per_instance"] < 140_000
    assert load_profile("a800-lwm7b") is load_profile("a800-lwm7b-tp1")
    for tp in (1, 2, 4, 8):  # calibrated and roofline presets hold the same KV
        assert load_profile(f"a800-lwm7b-tp{tp}").meta["kv_tokens_per_instance"] == \
            load_profile(f"a800-lwm7b-tp{tp}-roofline").meta["kv_tokens_per_instance"]


def test_load_profile_by_name_path_and_unknown(tmp_path):
    p = load_profile("h100-lwm7b-tp1")
    assert p.name == "h100-lwm7b-tp1" and p.meta["tp"] == 1 and max(p.prefill) == 8
    assert CostModel.load_profile("a800-lwm7b") is PRESETS["a800-lwm7b"]
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(p.to_json()))
    back = load_profile(str(path))
    assert back == p and CostModel.load_profile(path) == p
    assert back.prefill_time([30_000, 1000], 2) == p.prefill_time([30_000, 1000], 2)
    with pytest.raises(ValueError, match="a800-lwm7b"):
        load_profile("b200-lwm7b")


def test_roofline_profile_custom():
    p = roofline_profile(LWM_7B, H100_80GB, tp=4, max_dop=2)
    assert p.name == "h100-lwm7b-tp4" and sorted(p.prefill) == [1, 2]
    assert p.transfer_bytes_per_s == 4 * 450e9


def test_model_shape_from_bundled_config(tmp_path):
    shape = ModelShape.from_config_dir(bundled_model_dir())
    cfg = json.loads((bundled_model_dir() / "config.json").read_text())
    assert (shape.num_layers, shape.hidden, shape.heads, shape.kv_heads) == (
        cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"])
    assert (shape.head_dim, shape.intermediate, shape.vocab, shape.dtype_bytes) == (
        cfg.get("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"]), cfg["intermediate_size"],
        cfg["vocab_size"], 2)
    # defaults: no kv heads -> heads, no head_dim -> hidden/heads, torch_dtype float32 -> 4 bytes
    (tmp_path / "config.json").write_text(json.dumps({
        "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "intermediate_size": 11008,
        "vocab_size": 32000, "torch_dtype": "float32"}))
    llama = ModelShape.from_config_dir(tmp_path)
    assert (llama.kv_heads, llama.head_dim, llama.dtype_bytes) == (32, 128, 4)
    assert llama.matmul_params == LWM_7B.matmul_params
    tiny = roofline_profile(shape, A800_80GB)
    assert tiny.kv_bytes_per_token == shape.kv_bytes_per_token
    assert tiny.meta["kv_tokens_per_instance"] > 1_000_000
