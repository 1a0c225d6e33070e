"""Sampling filters against hand-computed distributions; per-token seeds."""
from __future__ import annotations

import math

import pytest
import torch

from esp.engine.protocol import SampleSpec
from esp.engine.sampling import filtered_probs, sample_tokens
from esp.engine.sampling_params import SamplingParams

LOGITS = torch.log(torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15], dtype=torch.float64))


def test_temperature_one_is_softmax():
    torch.testing.assert_close(filtered_probs(LOGITS, 1.0, 0, 1.0), torch.softmax(LOGITS, -1))


def test_top_k_keeps_the_k_largest_renormalized():
    expected = torch.tensor([0, 0.4, 0, 0.3, 0], dtype=torch.float64) / 0.7
    torch.testing.assert_close(filtered_probs(LOGITS, 1.0, 2, 1.0), expected)


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    # sorted: 0.4, 0.3, 0.15, 0.1, 0.05; 0.4 + 0.3 = 0.7 < 0.75, so 0.15 joins the nucleus
    expected = torch.tensor([0, 0.4, 0, 0.3, 0.15], dtype=torch.float64) / 0.85
    torch.testing.assert_close(filtered_probs(LOGITS, 1.0, 0, 0.75), expected)


def test_temperature_sharpens():
    p = filtered_probs(LOGITS, 0.5, 0, 1.0)
    q = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15], dtype=torch.float64) ** 2
    torch.testing.assert_close(p, q / q.sum())


def spec(seed, index, **kw):
    return SampleSpec(SamplingParams(temperature=1.0, **kw), seed, index)


def test_seeded_tokens_depend_only_on_seed_and_index():
    logits = LOGITS.repeat(3, 1)
    a = sample_tokens(logits, [spec(7, 0), spec(7, 1), spec(8, 0)])
    b = sample_tokens(logits, [spec(8, 0), spec(7, 1), spec(7, 0)])
    assert a == b[::-1]


def test_empirical_frequencies_follow_top_p():
    logits = LOGITS.repeat(2000, 1)
    tokens = sample_tokens(logits, [spec(i, 0, top_p=0.75) for i in range(2000)])
    freq = torch.bincount(torch.tensor(tokens), minlength=5).double() / 2000
    assert freq[0] == freq[2] == 0
    assert math.isclose(float(freq[1]), 0.4 / 0.85, abs_tol=0.05)


def test_greedy_is_argmax():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    greedy = SampleSpec(SamplingParams(temperature=0), 0, 0)
    assert sample_tokens(logits, [greedy] * 4) == logits.argmax(-1).tolist()


@pytest.mark.parametrize("kw", [dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_p=1.5),
                                dict(max_tokens=True), dict(stop=[""]), dict(seed=1.5)])
def test_invalid_params_raise(kw):
    with pytest.raises(ValueError):
        SamplingParams(**kw)
