"""Turn a batch of logits into tokens, each row with its own `SampleSpec`."""
from __future__ import annotations

import torch

from esp.engine.protocol import SampleSpec

_MIX = 0x9E3779B97F4A7C15
_MASK = (1 << 63) - 1


def token_generator(seed: int, index: int, device: torch.device) -> torch.Generator:
    """The generator for output token `index` of a request: a pure function of (seed, index)."""
    g = torch.Generator(device=device)
    g.manual_seed(((seed * _MIX) ^ (index + 1) * 0xBF58476D1CE4E5B9) & _MASK)
    return g


def filtered_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Softmax of `logits [V] / temperature`, keeping the top-k and the top-p nucleus."""
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs / sorted_probs.sum())
    return probs


class SamplingError(ValueError):
    """One row could not be sampled; its request fails, the rest of the batch does not."""


def sample_tokens(logits: torch.Tensor, specs: list[SampleSpec]) -> list[int | SamplingError]:
    """`logits [N, V]` (one row per spec) -> N token ids, or a `SamplingError` in the place of
    a row whose logits or distribution are not finite."""
    if not specs:
        return []
    tokens: list[int | SamplingError] = torch.argmax(logits, dim=-1).tolist()
    finite = torch.isfinite(logits).all(dim=-1).tolist()
    for row, spec in enumerate(specs):
        if not finite[row]:
            tokens[row] = SamplingError("the model produced non-finite logits")
        elif not spec.params.greedy:
            tokens[row] = _draw(logits[row], spec)
    return tokens


def _draw(logits: torch.Tensor, spec: SampleSpec) -> int | SamplingError:
    p = spec.params
    probs = filtered_probs(logits.double(), p.temperature, p.top_k, p.top_p)
    if not bool(torch.isfinite(probs).all()) or not float(probs.sum()) > 0:
        return SamplingError(f"temperature={p.temperature}, top_p={p.top_p}, top_k={p.top_k} give no "
                             f"valid distribution")
    return int(torch.multinomial(probs, 1, generator=token_generator(spec.seed, spec.index, logits.device)))
