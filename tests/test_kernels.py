"""Attention kernels (DESIGN 4.5) against independent oracles.

The torch references are checked in float64 against `scaled_dot_product_attention` with
masks built from positions; the Triton kernels are checked against the references.
`tests/conftest.py` sets TRITON_INTERPRET=1 (unless already set) before anything imports
triton, so the Triton kernels run on the CPU under the interpreter; with
TRITON_INTERPRET=0 on a CUDA host they are compiled and tested on the GPU instead.
"""
from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from esp.kernels import (decode_partial_attention, decode_partial_attention_ref, get_kernel_backend,
                         merge_attn_states, merge_attn_states_ref, resolve_backend,
                         set_kernel_backend, store_kv, store_kv_ref, striped_attention_step,
                         striped_attention_step_ref)

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
ON_GPU = not INTERPRET and torch.cuda.is_available()
DEV = torch.device("cuda" if ON_GPU else "cpu")
NEG_INF = float("-inf")
F64 = torch.float64


@pytest.fixture
def triton_env():
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    if not (INTERPRET or ON_GPU):
        pytest.skip("the Triton kernels need CUDA or TRITON_INTERPRET=1")


def cu_of(lengths: list[int], dtype=torch.int64) -> torch.Tensor:
    return torch.tensor([0] + [sum(lengths[: i + 1]) for i in range(len(lengths))], dtype=dtype)


def expand_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[T, KVH, D] -> [T, H, D] with query head h reading kv head h // (H // KVH)."""
    return x[:, torch.arange(heads) // (heads // x.shape[1])]


def dense_attention(q, k, v, visible, scale=None):
    """Oracle: SDPA with an explicit [Tq, Tk] boolean mask; lse = log(sum(exp(scores))) over
    visible keys. Rows with no visible key are (0, -inf) by contract."""
    h, d = q.shape[1], q.shape[2]
    scale = d ** -0.5 if scale is None else scale
    kx, vx = expand_kv(k, h), expand_kv(v, h)
    has = visible.any(dim=1)
    out = torch.zeros_like(q)
    lse = torch.full(q.shape[:2], NEG_INF, dtype=q.dtype)
    if has.any():
        qh = q[has].transpose(0, 1)
        o = F.scaled_dot_product_attention(qh, kx.transpose(0, 1), vx.transpose(0, 1),
                                           attn_mask=visible[has], scale=scale)
        out[has] = o.transpose(0, 1)
        scores = torch.einsum("qhd,khd->qhk", q[has], kx) * scale
        lse[has] = torch.log((scores.exp() * visible[has].unsqueeze(1)).sum(-1))
    return out, lse


def random_varlen(lens_q, lens_k, h, kvh, d, dtype=F64, max_pos=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    tq, tk = sum(lens_q), sum(lens_k)
    q = torch.randn(tq, h, d, generator=g, dtype=dtype)
    k = torch.randn(tk, kvh, d, generator=g, dtype=dtype)
    v = torch.randn(tk, kvh, d, generator=g, dtype=dtype)
    q_pos = torch.randint(0, max_pos, (tq,), generator=g)
    k_pos = torch.randint(0, max_pos, (tk,), generator=g)
    return q, k, v, q_pos, k_pos, cu_of(lens_q), cu_of(lens_k)


def varlen_mask(q_pos, k_pos, cu_q, cu_k):
    seq_q = torch.repeat_interleave(torch.arange(len(cu_q) - 1), cu_q.diff())
    seq_k = torch.repeat_interleave(torch.arange(len(cu_k) - 1), cu_k.diff())
    return (seq_q[:, None] == seq_k[None, :]) & (k_pos[None, :] <= q_pos[:, None])


def to_dev(*xs):
    return tuple(x.to(DEV) for x in xs)


def assert_attn_close(out, lse, ref_out, ref_lse, atol, rtol=0.0):
    out, lse = out.cpu(), lse.cpu()
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=rtol)
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[fin], ref_lse[fin], atol=atol, rtol=rtol)


# ---------------------------------------------------------------- references vs dense SDPA


@pytest.mark.parametrize("h,kvh", [(2, 2), (4, 2), (4, 1)])
@pytest.mark.parametrize("seed", [0, 1])
def test_striped_ref_matches_sdpa_with_position_mask(h, kvh, seed):
    lens_q, lens_k = [5, 0, 9, 3, 4], [7, 4, 0, 11, 6]
    q, k, v, q_pos, k_pos, cu_q, cu_k = random_varlen(lens_q, lens_k, h, kvh, 8, seed=seed)
    out, lse = striped_attention_step_ref(q, k, v, q_pos, k_pos, cu_q, cu_k)
    ref_out, ref_lse = dense_attention(q, k, v, varlen_mask(q_pos, k_pos, cu_q, cu_k))
    assert out.dtype == F64 and lse.dtype == F64 and lse.shape == (sum(lens_q), h)
    assert torch.isneginf(ref_lse).any(), "the case must include queries with no visible key"
    assert_attn_close(out, lse, ref_out, ref_lse, atol=1e-12)


def test_striped_ref_in_query_chunks_matches_sdpa(monkeypatch):
    import esp.kernels.prefill as prefill
    monkeypatch.setattr(prefill, "SCORE_BUDGET", 100)
    q, k, v, q_pos, k_pos, cu_q, cu_k = random_varlen([9, 14], [7, 12], 4, 2, 8, seed=4)
    out, lse = striped_attention_step_ref(q, k, v, q_pos, k_pos, cu_q, cu_k)
    ref_out, ref_lse = dense_attention(q, k, v, varlen_mask(q_pos, k_pos, cu_q, cu_k))
    assert_attn_close(out, lse, ref_out, ref_lse, atol=1e-12)


def test_striped_ref_softmax_scale_and_cpu_default_backend():
    q, k, v, q_pos, k_pos, cu_q, cu_k = random_varlen([6], [6], 2, 1, 8, seed=3)
    out, lse = striped_attention_step(q, k, v, q_pos, k_pos, cu_q, cu_k, softmax_scale=0.3)
    ref_out, ref_lse = dense_attention(q, k, v, varlen_mask(q_pos, k_pos, cu_q, cu_k), scale=0.3)
    assert_attn_close(out, lse, ref_out, ref_lse, atol=1e-12)


def test_ref_dtypes_follow_contract():
    q, k, v, q_pos, k_pos, cu_q, cu_k = random_varlen([4], [4], 2, 1, 8, dtype=torch.bfloat16)
    out, lse = striped_attention_step_ref(q, k, v, q_pos, k_pos, cu_q, cu_k)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    out, lse = decode_partial_attention_ref(q[:1], k, v, torch.arange(4), torch.tensor([0, 4]))
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32


def stripe_rows(lengths: list[int], n: int, j: int):
    """Rows of the packed batch in stripe j of n (positions g with g % n == j), their
    positions, and the per-sequence offsets of the stripe."""
    starts = cu_of(lengths).tolist()
    pos = [torch.arange(j, max(j, L), n) for L in lengths]
    rows = torch.cat([s + p for s, p in zip(starts, pos)])
    return rows, torch.cat(pos), cu_of([len(p) for p in pos])


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("h,kvh", [(2, 2), (4, 1)])
def test_ring_of_striped_steps_equals_causal_attention(n, h, kvh):
    lengths = [13, 1, 7, 2]
    g = torch.Generator().manual_seed(n)
    t = sum(lengths)
    q = torch.randn(t, h, 8, generator=g, dtype=F64)
    k = torch.randn(t, kvh, 8, generator=g, dtype=F64)
    v = torch.randn(t, kvh, 8, generator=g, dtype=F64)
    stripes = [stripe_rows(lengths, n, j) for j in range(n)]
    out = torch.empty_like(q)
    lse = torch.empty(t, h, dtype=F64)
    for i in range(n):
        rows_i, pos_i, cu_i = stripes[i]
        acc = None
        for p in range(n):
            rows_j, pos_j, cu_j = stripes[(i - p) % n]
            o, l = striped_attention_step(q[rows_i], k[rows_j], v[rows_j], pos_i, pos_j, cu_i, cu_j)
            acc = (o, l) if acc is None else merge_attn_states(*acc, o, l)
        out[rows_i], lse[rows_i] = acc
    starts = cu_of(lengths).tolist()
    for s, L in zip(starts, lengths):
        sl = slice(s, s + L)
        kx, vx = expand_kv(k[sl], h), expand_kv(v[sl], h)
        ref = F.scaled_dot_product_attention(q[sl].transpose(0, 1), kx.transpose(0, 1),
                                             vx.transpose(0, 1), is_causal=True).transpose(0, 1)
        torch.testing.assert_close(out[sl], ref, atol=1e-12, rtol=0)
        scores = torch.einsum("qhd,khd->hqk", q[sl], kx) * 8 ** -0.5
        causal = torch.ones(L, L, dtype=torch.bool).tril()
        ref_lse = torch.log((scores.exp() * causal).sum(-1)).T
        torch.testing.assert_close(lse[sl], ref_lse, atol=1e-12, rtol=0)


def split_decode_batch(lengths, instances, pool_size, h, kvh, d, seed=0):
    """Each request's keys scattered over `instances` pools at random slots; returns the
    query, the per-request key/value lists, and per-instance (k_cache, v_cache, slots, cu)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(len(lengths), h, d, generator=g, dtype=F64)
    keys = [torch.randn(L, kvh, d, generator=g, dtype=F64) for L in lengths]
    vals = [torch.randn(L, kvh, d, generator=g, dtype=F64) for L in lengths]
    owner = [torch.randint(0, instances, (L,), generator=g) for L in lengths]
    parts = []
    for i in range(instances):
        kc = torch.randn(pool_size, kvh, d, generator=g, dtype=F64)
        vc = torch.randn(pool_size, kvh, d, generator=g, dtype=F64)
        free = torch.randperm(pool_size, generator=g)
        slots, counts, used = [], [], 0
        for r in range(len(lengths)):
            mine = (owner[r] == i).nonzero().flatten()
            s = free[used: used + len(mine)]
            used += len(mine)
            kc[s], vc[s] = keys[r][mine], vals[r][mine]
            slots.append(s)
            counts.append(len(mine))
        parts.append((kc, vc, torch.cat(slots), cu_of(counts)))
    return q, keys, vals, parts


@pytest.mark.parametrize("instances", [1, 2, 3])
@pytest.mark.parametrize("h,kvh", [(2, 2), (4, 1)])
def test_decode_partials_merged_equal_dense_attention(instances, h, kvh):
    lengths = [9, 1, 17, 4]
    q, keys, vals, parts = split_decode_batch(lengths, instances, 48, h, kvh, 8, seed=instances)
    acc = None
    for kc, vc, slots, cu in parts:
        o, l = decode_partial_attention(q, kc, vc, slots, cu)
        acc = (o, l) if acc is None else merge_attn_states(*acc, o, l)
    out, lse = acc
    for r in range(len(lengths)):
        visible = torch.ones(1, lengths[r], dtype=torch.bool)
        ref_out, ref_lse = dense_attention(q[r: r + 1], keys[r], vals[r], visible)
        torch.testing.assert_close(out[r: r + 1], ref_out, atol=1e-12, rtol=0)
        torch.testing.assert_close(lse[r: r + 1], ref_lse, atol=1e-12, rtol=0)


def test_decode_empty_range_gives_zero_and_neg_inf():
    q = torch.randn(3, 2, 8, dtype=F64)
    kc = vc = torch.randn(10, 2, 8, dtype=F64)
    out, lse = decode_partial_attention(q, kc, vc, torch.tensor([4, 2]), torch.tensor([0, 0, 2, 2]))
    assert torch.equal(out[[0, 2]], torch.zeros(2, 2, 8, dtype=F64))
    assert torch.isneginf(lse[[0, 2]]).all() and torch.isfinite(lse[1]).all()


# ---------------------------------------------------------------- merge and store


def test_merge_closed_form_at_large_lse():
    oa, ob = torch.randn(2, 3, 2, 4, dtype=F64)
    la = torch.full((3, 2), 1000.0, dtype=F64)
    lb = la - math.log(3.0)
    out, lse = merge_attn_states(oa, la, ob, lb)
    torch.testing.assert_close(out, 0.75 * oa + 0.25 * ob, atol=1e-12, rtol=0)
    torch.testing.assert_close(lse, la + math.log(4.0 / 3.0), atol=1e-12, rtol=0)


def test_merge_with_neg_inf_sides():
    oa, ob = torch.randn(2, 4, 3, 5, dtype=F64)
    ob[2:] = 0
    la = torch.randn(4, 3, dtype=F64)
    lb = torch.randn(4, 3, dtype=F64)
    la[1], lb[2:], la[3] = NEG_INF, NEG_INF, NEG_INF
    oa[1] = oa[3] = 0
    out, lse = merge_attn_states(oa, la, ob, lb)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out[1], ob[1], atol=0, rtol=0)
    torch.testing.assert_close(lse[1], lb[1], atol=0, rtol=0)
    torch.testing.assert_close(out[2], oa[2], atol=0, rtol=0)
    torch.testing.assert_close(lse[2], la[2], atol=0, rtol=0)
    assert torch.equal(out[3], torch.zeros(3, 5, dtype=F64)) and torch.isneginf(lse[3]).all()


def test_merge_is_symmetric():
    oa, ob = torch.randn(2, 6, 2, 4, dtype=F64)
    la, lb = torch.randn(2, 6, 2, dtype=F64) * 5
    out_ab, lse_ab = merge_attn_states(oa, la, ob, lb)
    out_ba, lse_ba = merge_attn_states(ob, lb, oa, la)
    torch.testing.assert_close(out_ab, out_ba, atol=1e-14, rtol=0)
    torch.testing.assert_close(lse_ab, lse_ba, atol=1e-14, rtol=0)


def test_store_kv_ref_matches_index_assignment():
    kc, vc = torch.randn(2, 20, 2, 4, dtype=F64)
    k, v = torch.randn(2, 7, 2, 4, dtype=F64)
    slots = torch.tensor([19, 0, 5, 6, 11, 3, 2])
    ek, ev = kc.clone(), vc.clone()
    for t, s in enumerate(slots.tolist()):
        ek[s], ev[s] = k[t], v[t]
    store_kv(kc, vc, slots, k, v)
    assert torch.equal(kc, ek) and torch.equal(vc, ev)


# ---------------------------------------------------------------- backend selection


def test_backend_resolution(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv("ESP_KERNELS", raising=False)
    assert get_kernel_backend() == "auto" and resolve_backend(None, cpu) == "cpu"
    assert resolve_backend(None, cpu.double()) == "cpu"
    monkeypatch.setenv("ESP_KERNELS", "torch")
    assert resolve_backend(None, cpu) == "torch"
    monkeypatch.setenv("ESP_KERNELS", "triton")
    assert resolve_backend(None, cpu) == "triton"
    assert resolve_backend("torch", cpu) == "torch"
    set_kernel_backend("torch")
    try:
        assert resolve_backend(None, cpu) == "torch" and resolve_backend("triton", cpu) == "triton"
    finally:
        set_kernel_backend(None)
    monkeypatch.setenv("ESP_KERNELS", "cuda")
    with pytest.raises(ValueError, match="unknown kernel backend"):
        resolve_backend(None, cpu)
    with pytest.raises(ValueError):
        set_kernel_backend("numpy")


def test_compiled_triton_kernels_refuse_cpu_tensors(monkeypatch):
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    from esp.kernels import triton_util
    monkeypatch.setattr(triton_util, "interpreted", lambda kernel: False)
    q, k, v, q_pos, k_pos, cu_q, cu_k = random_varlen([3], [3], 2, 1, 16, dtype=torch.float32)
    with pytest.raises(ValueError, match="CUDA"):
        striped_attention_step(q, k, v, q_pos, k_pos, cu_q, cu_k, backend="triton")


# ---------------------------------------------------------------- Triton vs reference

PREFILL_CASES = {
    "gqa4-empty-seqs-unsorted": ([5, 0, 19, 3], [7, 4, 0, 30], 4, 1, 24, 0),
    "gqa1-tq37": ([37], [37], 2, 2, 16, 1),
    "gqa2-many": ([1, 17, 2, 16], [3, 33, 0, 16], 4, 2, 32, 2),
    "all-empty": ([0, 0], [0, 5], 2, 1, 16, 3),
}


@pytest.mark.parametrize("blocks", [(16, 16), (None, None)], ids=["blocks16", "default-blocks"])
@pytest.mark.parametrize("case", PREFILL_CASES.values(), ids=PREFILL_CASES.keys())
def test_striped_triton_matches_ref(triton_env, case, blocks):
    from esp.kernels.prefill_triton import striped_attention_step_triton
    lens_q, lens_k, h, kvh, d, seed = case
    args = random_varlen(lens_q, lens_k, h, kvh, d, dtype=torch.float32, seed=seed)
    ref_out, ref_lse = striped_attention_step_ref(*args)
    out, lse = striped_attention_step_triton(*to_dev(*args), block_m=blocks[0], block_n=blocks[1])
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert_attn_close(out, lse, ref_out, ref_lse, atol=1e-5, rtol=1e-4)


def test_striped_triton_no_visible_key_and_strided_positions(triton_env):
    q, k, v, _, _, cu_q, cu_k = random_varlen([6, 20], [5, 20], 4, 4, 16, dtype=torch.float32)
    q_pos = torch.cat([torch.arange(6), torch.arange(1, 80, 4)])
    k_pos = torch.cat([torch.arange(10, 15), torch.arange(3, 80, 4)])
    args = (q, k, v, q_pos, k_pos, cu_q, cu_k)
    ref_out, ref_lse = striped_attention_step_ref(*args)
    assert torch.isneginf(ref_lse[:6]).all()
    out, lse = striped_attention_step(*to_dev(*args), backend="triton")
    assert_attn_close(out, lse, ref_out, ref_lse, atol=1e-5, rtol=1e-4)


def test_striped_triton_key_block_skip_is_exact_at_the_boundary(triton_env):
    from esp.kernels.prefill_triton import striped_attention_step_triton
    q, k, v, _, _, cu_q, cu_k = random_varlen([16], [32], 2, 1, 16, dtype=torch.float32)
    q_pos = torch.arange(16)
    k_pos = torch.cat([torch.arange(100, 116), torch.arange(15, 31)])
    args = (q, k, v, q_pos, k_pos, cu_q, cu_k)
    ref_out, ref_lse = striped_attention_step_ref(*args)
    assert torch.isfinite(ref_lse[15]).all() and torch.isneginf(ref_lse[:15]).all()
    out, lse = striped_attention_step_triton(*to_dev(*args), block_m=16, block_n=16)
    assert_attn_close(out, lse, ref_out, ref_lse, atol=1e-5, rtol=1e-4)


def test_striped_triton_float64(triton_env):
    args = random_varlen([9, 4], [12, 4], 4, 2, 16, seed=5)
    ref_out, ref_lse = striped_attention_step_ref(*args, softmax_scale=0.2)
    out, lse = striped_attention_step(*to_dev(*args), softmax_scale=0.2, backend="triton")
    assert lse.dtype == F64
    assert_attn_close(out, lse, ref_out, ref_lse, atol=1e-10)


DECODE_CASES = {
    "gqa1": ([9, 0, 40, 1], 2, 2, 16),
    "gqa4-d24": ([70, 3, 0], 4, 1, 24),
    "all-empty": ([0, 0], 2, 1, 16),
}


@pytest.mark.parametrize("splits", [None, 1, 3])
@pytest.mark.parametrize("case", DECODE_CASES.values(), ids=DECODE_CASES.keys())
def test_decode_triton_matches_ref(triton_env, case, splits):
    from esp.kernels.decode_triton import decode_partial_attention_triton
    lengths, h, kvh, d = case
    g = torch.Generator().manual_seed(len(lengths))
    pool = 128
    q = torch.randn(len(lengths), h, d, generator=g)
    kc, vc = torch.randn(2, pool, kvh, d, generator=g)
    slots = torch.randperm(pool, generator=g)[: sum(lengths)]
    args = (q, kc, vc, slots, cu_of(lengths))
    ref_out, ref_lse = decode_partial_attention_ref(*args)
    out, lse = decode_partial_attention_triton(*to_dev(*args), num_splits=splits, block_n=16)
    assert_attn_close(out, lse, ref_out, ref_lse, atol=1e-5, rtol=1e-4)
    out, lse = decode_partial_attention(*to_dev(*args), backend="triton")
    assert_attn_close(out, lse, ref_out, ref_lse, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_merge_triton_matches_ref(triton_env, dtype):
    g = torch.Generator().manual_seed(0)
    oa, ob = torch.randn(2, 7, 3, 24, generator=g, dtype=dtype)
    la, lb = torch.randn(2, 7, 3, generator=g, dtype=dtype) * 4
    la[0], lb[1], la[2, 1], lb[2, 1] = NEG_INF, NEG_INF, NEG_INF, NEG_INF
    oa[0] = ob[1] = 0
    ref_out, ref_lse = merge_attn_states_ref(oa, la, ob, lb)
    out, lse = merge_attn_states(*to_dev(oa, la, ob, lb), backend="triton")
    assert lse.dtype == dtype
    assert_attn_close(out, lse, ref_out, ref_lse, atol=1e-6 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("kvh,d", [(2, 24), (3, 400)])
def test_store_kv_triton_matches_ref(triton_env, kvh, d):
    g = torch.Generator().manual_seed(d)
    kc, vc = torch.randn(2, 30, kvh, d, generator=g)
    k, v = torch.randn(2, 9, kvh, d, generator=g)
    slots = torch.randperm(30, generator=g)[:9]
    ek, ev = kc.clone(), vc.clone()
    store_kv_ref(ek, ev, slots, k, v)
    kc, vc = to_dev(kc, vc)
    store_kv(kc, vc, *to_dev(slots, k, v), backend="triton")
    assert torch.equal(kc.cpu(), ek) and torch.equal(vc.cpu(), ev)


COMPILE_SCRIPT = """
import triton, triton.language as tl, torch
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from esp.kernels.decode_triton import _decode_reduce_kernel, _decode_split_kernel, default_block_n
from esp.kernels.merge_triton import _merge_kernel
from esp.kernels.prefill_triton import _striped_kernel, default_blocks
from esp.kernels.store_triton import _store_kernel

def build(fn, types, consts):
    sig = {name: "constexpr" if name in consts else types[name] for name in fn.arg_names}
    triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32))

p, f, i = "*bf16", "*fp32", "i32"
bm, bn = default_blocks(torch.bfloat16, 128)
build(_striped_kernel, dict(q=p, k=p, v=p, q_pos="*i64", k_pos="*i64", cu_q="*i64", cu_k="*i64",
      out=p, lse=f, scale="fp32", H=i, KVH=i, D=i),
      dict(GROUP=4, ACC=tl.float32, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=128))
build(_decode_split_kernel, dict(q=p, k_cache=p, v_cache=p, slots="*i64", cu="*i64", part_out=f,
      part_lse=f, scale="fp32", H=i, KVH=i, D=i, split_len=i, num_splits=i),
      dict(GROUP=4, ACC=tl.float32, BLOCK_G=16, BLOCK_N=default_block_n(torch.bfloat16, 128), BLOCK_D=128))
build(_decode_reduce_kernel, dict(part_out=f, part_lse=f, out=p, lse=f, D=i, num_splits=i),
      dict(BLOCK_S=8, BLOCK_D=128))
build(_merge_kernel, dict(out_a=p, lse_a=f, out_b=p, lse_b=f, out=p, lse=f, rows=i, D=i),
      dict(ACC=tl.float32, BLOCK_R=16, BLOCK_D=128))
build(_store_kernel, dict(k_cache=p, v_cache=p, slots="*i64", k=p, v=p, W=i), dict(BLOCK=1024))
print("compiled")
"""


@pytest.mark.slow
def test_triton_kernels_compile_for_sm90_in_bf16():
    """The interpreter accepts code the GPU compiler rejects: compile each kernel ahead of
    time for an H100 (no GPU needed) with the tile sizes the wrappers pick for bf16, D=128."""
    if not HAS_TRITON or importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("triton with the NVIDIA backend is not installed")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    done = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]


# ---------------------------------------------------------------- input checks


def _prefill_args(**over):
    q, k, v, q_pos, k_pos, cu_q, cu_k = random_varlen([3, 2], [4, 1], 4, 2, 8, dtype=torch.float32)
    args = dict(q=q, k=k, v=v, q_pos=q_pos, k_pos=k_pos, cu_q=cu_q, cu_k=cu_k)
    args.update(over)
    return args


PREFILL_BAD = {
    "q-2d": dict(q=torch.zeros(5, 32)),
    "q-noncontiguous": dict(q=torch.zeros(4, 5, 8).transpose(0, 1)),
    "q-int": dict(q=torch.zeros(5, 4, 8, dtype=torch.int32)),
    "k-dtype-differs": dict(k=torch.zeros(5, 2, 8, dtype=F64)),
    "head-dim-differs": dict(k=torch.zeros(5, 2, 4), v=torch.zeros(5, 2, 4)),
    "heads-not-multiple": dict(k=torch.zeros(5, 3, 8), v=torch.zeros(5, 3, 8)),
    "v-shape": dict(v=torch.zeros(4, 2, 8)),
    "q_pos-float": dict(q_pos=torch.zeros(5)),
    "q_pos-length": dict(q_pos=torch.zeros(4, dtype=torch.int64)),
    "cu_q-wrong-total": dict(cu_q=torch.tensor([0, 3, 4])),
    "cu_q-decreasing": dict(cu_q=torch.tensor([0, 6, 5])),
    "cu_k-batch-differs": dict(cu_k=torch.tensor([0, 5])),
    "k-on-meta": dict(k=torch.zeros(5, 2, 8, device="meta")),
    "scale-negative": dict(softmax_scale=-1.0),
}


@pytest.mark.parametrize("over", PREFILL_BAD.values(), ids=PREFILL_BAD.keys())
def test_striped_wrapper_rejects_bad_inputs(over):
    with pytest.raises(ValueError):
        striped_attention_step(**_prefill_args(**over))


def test_other_wrappers_reject_bad_inputs():
    q = torch.zeros(2, 4, 8)
    kc = torch.zeros(10, 2, 8)
    slots, cu = torch.tensor([1, 2, 3]), torch.tensor([0, 1, 3])
    decode_partial_attention(q, kc, kc, slots, cu)
    with pytest.raises(ValueError, match="cu_slots"):
        decode_partial_attention(q, kc, kc, slots, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="cu_slots"):
        decode_partial_attention(q, kc, kc, slots, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="slots"):
        decode_partial_attention(q, kc, kc, slots.float(), cu)
    with pytest.raises(ValueError, match="multiple"):
        decode_partial_attention(q, torch.zeros(10, 3, 8), torch.zeros(10, 3, 8), slots, cu)
    out, lse = torch.zeros(3, 2, 8), torch.zeros(3, 2)
    merge_attn_states(out, lse, out, lse)
    with pytest.raises(ValueError, match="lse_b"):
        merge_attn_states(out, lse, out, torch.zeros(3, 3))
    with pytest.raises(ValueError, match="lse_a"):
        merge_attn_states(out, lse.half(), out, lse)
    with pytest.raises(ValueError, match="out_b"):
        merge_attn_states(out, lse, torch.zeros(3, 2, 4), lse)
    k = torch.zeros(3, 2, 8)
    with pytest.raises(ValueError, match="dtype"):
        store_kv(kc, kc, slots, k.double(), k.double())
    with pytest.raises(ValueError, match="slots"):
        store_kv(kc, kc, slots[:2], k, k)
    with pytest.raises(ValueError, match="cache rows"):
        store_kv(kc, kc, slots, torch.zeros(3, 1, 8), torch.zeros(3, 1, 8))
    with pytest.raises(ValueError, match="contiguous"):
        store_kv(kc, kc, slots, torch.zeros(8, 2, 3).transpose(0, 2), k)
