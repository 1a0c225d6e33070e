"""The production CPU kernels (`esp.kernels.*_cpu`) against the torch references, the oracle.

float64 with a tight tolerance (the two differ only by summation order), float32 against the
float64 reference with float32 tolerances. Prefill: every stripe pair (r, s) of groups of
1..4 with uneven and empty stripes, chunks over cached prefixes, general shifted progressions,
GQA with 1, 2 and 4 query heads per kv head, varlen batches with length-1 sequences. Decode:
contiguous, scattered and mixed slot lists, several runs per request, empty ranges. Backend:
CPU tensors run the fast path by default and `ESP_KERNELS=torch` the reference.
"""
from __future__ import annotations

import pytest
import torch

import esp.kernels.decode as decode_mod
import esp.kernels.prefill as prefill_mod
import esp.kernels.prefill_cpu as prefill_cpu
from esp.kernels import (SlotRuns, StripeLayout, append_slots, decode_partial_attention,
                         decode_partial_attention_ref, merge_attn_states, resolve_backend, set_kernel_backend,
                         slot_runs, striped_attention_step, striped_attention_step_ref)
from esp.kernels.decode_cpu import MIN_RUN

F64, F32 = torch.float64, torch.float32
HEADS = [(2, 2), (4, 2), (4, 1)]  # H / KVH = 1, 2, 4
TOL = {F64: dict(atol=1e-12, rtol=0), F32: dict(atol=2e-5, rtol=2e-5)}


def cu_of(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0] + torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0).tolist(), dtype=torch.int64)


def assert_matches_ref(out, lse, ref_out, ref_lse, dtype):
    """`(out, lse)` of `dtype` against a float64 reference."""
    assert out.dtype == dtype and lse.dtype == (F64 if dtype == F64 else F32)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    torch.testing.assert_close(out.double(), ref_out, **TOL[dtype])
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse.double()[fin], ref_lse[fin], **TOL[dtype])
    assert torch.equal(out.double()[~fin], torch.zeros_like(ref_out[~fin]))


def progressions(lengths: list[int], firsts: list[int], step: int) -> torch.Tensor:
    parts = [f + step * torch.arange(n) for f, n in zip(firsts, lengths)]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)


def run_case(q_lens, k_lens, q_first, k_first, step, h, kvh, dtype, d=16, seed=0, scale=None):
    """Fast path with `StripeLayout(step, q_first, k_first)` vs the float64 reference."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(q_lens), h, d, generator=g, dtype=F64)
    k = torch.randn(sum(k_lens), kvh, d, generator=g, dtype=F64)
    v = torch.randn(sum(k_lens), kvh, d, generator=g, dtype=F64)
    q_pos, k_pos = progressions(q_lens, q_first, step), progressions(k_lens, k_first, step)
    cu_q, cu_k = cu_of(q_lens), cu_of(k_lens)
    layout = StripeLayout(step, tuple(q_first), tuple(k_first))
    out, lse = striped_attention_step(q.to(dtype), k.to(dtype), v.to(dtype), q_pos, k_pos, cu_q, cu_k,
                                      softmax_scale=scale, layout=layout)
    ref_out, ref_lse = striped_attention_step_ref(q, k, v, q_pos, k_pos, cu_q, cu_k, scale)
    assert_matches_ref(out, lse, ref_out, ref_lse, dtype)
    return ref_lse


def stripe_len(length: int, n: int, j: int) -> int:
    return len(range(j, length, n))


# ---------------------------------------------------------------- prefill


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("h,kvh", HEADS)
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_every_stripe_pair_matches_reference(n, h, kvh, dtype):
    lengths = [13, 1, 7, 2, 0, 5, 3, 30]  # uneven stripes, length-1 sequences, empty stripes
    for r in range(n):
        for s in range(n):
            run_case([stripe_len(L, n, r) for L in lengths], [stripe_len(L, n, s) for L in lengths],
                     [r] * len(lengths), [s] * len(lengths), n, h, kvh, dtype, seed=10 * r + s)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("h,kvh", HEADS)
def test_ring_of_fast_steps_equals_causal_attention(n, h, kvh):
    """Ring passes with layouts, merged, equal one causal pass of the reference per sequence."""
    lengths = [17, 1, 6, 9]
    g = torch.Generator().manual_seed(n)
    t = sum(lengths)
    q = torch.randn(t, h, 8, generator=g, dtype=F64)
    k = torch.randn(t, kvh, 8, generator=g, dtype=F64)
    v = torch.randn(t, kvh, 8, generator=g, dtype=F64)
    starts = cu_of(lengths).tolist()
    stripes = []
    for j in range(n):
        pos = [torch.arange(j, max(j, L), n) for L in lengths]
        rows = torch.cat([s + p for s, p in zip(starts, pos)])
        stripes.append((rows, torch.cat(pos), cu_of([len(p) for p in pos])))
    out = torch.empty_like(q)
    for i in range(n):
        rows_i, pos_i, cu_i = stripes[i]
        acc = None
        for p in range(n):
            j = (i - p) % n
            rows_j, pos_j, cu_j = stripes[j]
            o, l = striped_attention_step(q[rows_i], k[rows_j], v[rows_j], pos_i, pos_j, cu_i, cu_j,
                                          layout=StripeLayout.stripes(n, i, j, len(lengths)))
            acc = (o, l) if acc is None else merge_attn_states(*acc, o, l)
        out[rows_i] = acc[0]
    pos = torch.cat([torch.arange(L) for L in lengths])
    cu = cu_of(lengths)
    ref, _ = striped_attention_step_ref(q, k, v, pos, pos, cu, cu)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("h,kvh", HEADS)
def test_chunks_over_cached_prefixes(h, kvh, dtype):
    """Chunk at positions P..P+C-1 over keys 0..P+C-1: prefix unmasked + causal chunk."""
    prefixes, chunks = [0, 1, 5, 33, 64, 2], [7, 1, 40, 3, 64, 1]
    run_case(chunks, [p + c for p, c in zip(prefixes, chunks)], prefixes, [0] * len(chunks), 1, h, kvh, dtype)
    for p, c in zip(prefixes, chunks):  # one sequence per call, like the engine's mixed step
        run_case([c], [p + c], [p], [0], 1, h, kvh, dtype, seed=p)


@pytest.mark.parametrize("dtype", [F64, F32])
def test_general_shifted_progressions(dtype):
    """Any common step and firsts: shifts from -5 to +4, more keys than queries and fewer."""
    cases = [  # (q_len, k_len, q_first, k_first)
        (9, 12, 7, 2), (9, 4, 2, 10), (5, 20, 30, 0), (3, 3, 0, 17), (11, 2, 4, 4), (1, 6, 9, 1), (6, 1, 1, 9),
    ]
    for step in (1, 3):
        q_lens, k_lens, qf, kf = zip(*cases)
        ref_lse = run_case(list(q_lens), list(k_lens), list(qf), list(kf), step, 4, 2, dtype, seed=step)
        assert torch.isneginf(ref_lse).any() and torch.isfinite(ref_lse).any()


def test_softmax_scale_and_bfloat16_on_fast_path():
    run_case([5, 9], [5, 9], [1, 1], [0, 0], 2, 4, 2, F64, scale=0.37)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(8, 4, 16, generator=g, dtype=torch.bfloat16)
    k = torch.randn(8, 2, 16, generator=g, dtype=torch.bfloat16)
    pos, cu = torch.arange(8), cu_of([8])
    out, lse = striped_attention_step(q, k, k, pos, pos, cu, cu, layout=StripeLayout(1, (0,), (0,)))
    ref_out, ref_lse = striped_attention_step_ref(q.double(), k.double(), k.double(), pos, pos, cu, cu)
    assert out.dtype == torch.bfloat16 and lse.dtype == F32
    torch.testing.assert_close(out.double(), ref_out, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(lse.double(), ref_lse, atol=3e-2, rtol=3e-2)


def test_layout_is_checked_against_positions():
    q = torch.randn(6, 2, 8, dtype=F64)
    k = torch.randn(6, 1, 8, dtype=F64)
    pos, cu = torch.arange(6), cu_of([6])
    with pytest.raises(ValueError, match="arithmetic progressions"):
        striped_attention_step(q, k, k, pos, pos, cu, cu, layout=StripeLayout(2, (0,), (0,)))
    with pytest.raises(ValueError, match="arithmetic progressions"):
        striped_attention_step(q, k, k, pos + 1, pos, cu, cu, layout=StripeLayout(1, (0,), (0,)))
    with pytest.raises(ValueError, match="entries for 1 sequences"):
        striped_attention_step(q, k, k, pos, pos, cu, cu, layout=StripeLayout(1, (0, 0), (0, 0)))
    with pytest.raises(ValueError, match="positive int"):
        striped_attention_step(q, k, k, pos, pos, cu, cu, layout=StripeLayout(0, (0,), (0,)))
    with pytest.raises(ValueError, match="StripeLayout"):
        striped_attention_step(q, k, k, pos, pos, cu, cu, layout=(1, (0,), (0,)))


def test_positions_without_layout_run_the_reference(monkeypatch):
    calls = []
    monkeypatch.setattr(prefill_cpu, "striped_attention_step_cpu", lambda *a: calls.append(a))
    q = torch.randn(5, 2, 8, dtype=F64)
    k = torch.randn(5, 2, 8, dtype=F64)
    pos, cu = torch.tensor([4, 0, 3, 1, 2]), cu_of([5])
    out, lse = striped_attention_step(q, k, k, pos, pos, cu, cu)
    ref_out, ref_lse = striped_attention_step_ref(q, k, k, pos, pos, cu, cu)
    assert not calls and torch.equal(out, ref_out) and torch.equal(lse, ref_lse)


# ---------------------------------------------------------------- decode


def decode_case(slot_lists: list[list[int]], h, kvh, dtype, pool=300, d=16, seed=0, precompute=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(len(slot_lists), h, d, generator=g, dtype=F64)
    kc = torch.randn(pool, kvh, d, generator=g, dtype=F64)
    vc = torch.randn(pool, kvh, d, generator=g, dtype=F64)
    slots = torch.tensor([s for lst in slot_lists for s in lst], dtype=torch.int64)
    cu = cu_of([len(lst) for lst in slot_lists])
    runs = slot_runs(slots, cu) if precompute else None
    out, lse = decode_partial_attention(q.to(dtype), kc.to(dtype), vc.to(dtype), slots, cu, runs=runs)
    ref_out, ref_lse = decode_partial_attention_ref(q, kc, vc, slots, cu)
    assert_matches_ref(out, lse, ref_out, ref_lse, dtype)
    return slot_runs(slots, cu)


def r(a: int, b: int) -> list[int]:
    return list(range(a, b))


MIXED = [
    r(10, 90),                          # one contiguous run
    [],                                 # empty range
    r(100, 140) + [3, 250, 7],          # prompt run + scattered decode tail
    [5],                                # one token
    r(150, 190) + [1] + r(200, 240),    # two runs, one scattered slot between them
    [299, 2, 298, 4, 297],              # scattered, shorter than a run
    r(260, 270),                        # contiguous but below MIN_RUN: gathered
    r(90, 100) + r(190, 200) + r(240, 250),  # short runs only
    r(30, 40) + list(range(41, 60, 2)),  # a run of 10, then stride 2
]


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("h,kvh", HEADS)
@pytest.mark.parametrize("precompute", [True, False])
def test_decode_mixed_slot_lists(h, kvh, dtype, precompute):
    runs = decode_case(MIXED, h, kvh, dtype, precompute=precompute)
    assert len(runs.runs) >= 4 and len(runs.rest_slots) > 0


@pytest.mark.parametrize("dtype", [F64, F32])
def test_decode_all_contiguous_and_all_scattered(dtype):
    contiguous = [r(0, 70), r(70, 71), r(100, 260), r(71, 100)]
    runs = decode_case(contiguous, 4, 2, dtype)
    assert len(runs.rest_slots) == 1 + 29 and [x[0] for x in runs.runs] == [0, 2]
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(3)).tolist()
    scattered = [perm[:70], perm[70:71], perm[71:230], perm[230:235]]
    decode_case(scattered, 4, 1, dtype, seed=1)


def test_decode_all_empty_and_long_runs_mixed_with_empties():
    decode_case([[], [], []], 4, 2, F64)
    decode_case([[], r(0, 200), [], r(200, 260)], 2, 2, F64)


def test_slot_runs_split():
    m = MIN_RUN
    slots = torch.tensor([7, 8] + r(50, 50 + m) + r(50 + m, 55 + m) + r(100, 110 + 2 * m))
    cu = torch.tensor([0, m + 2, m + 7, len(slots)])
    runs = slot_runs(slots, cu)
    # request 1 continues request 0's run in the pool, but a run never crosses a request boundary
    assert runs.runs == ((0, 50, m), (2, 100, 2 * m + 10))
    assert runs.rest_slots.tolist() == [7, 8] + r(50 + m, 55 + m) and runs.rest_cu == (0, 2, 7, 7)
    empty = slot_runs(torch.empty(0, dtype=torch.int64), torch.zeros(3, dtype=torch.int64))
    assert empty.runs == () and empty.rest_cu == (0, 0, 0)


@pytest.mark.parametrize("dtype", [F64, F32])
def test_appended_slots_extend_the_runs_as_a_fresh_split_would_attend(dtype):
    """Three decode iterations: each appends one slot to the first 5 requests of MIXED (the
    rows this instance masters); the runs carried forward by `append_slots` give the
    reference's attention, and describe exactly the slots of each request."""
    g = torch.Generator().manual_seed(9)
    lists = [list(x) for x in MIXED]
    q = torch.randn(len(lists), 4, 16, generator=g, dtype=F64)
    kc, vc = torch.randn(2, 320, 2, 16, generator=g, dtype=F64)
    runs = None
    for k, new in enumerate(([300, 301, 302, 303, 304], [305, 306, 307, 308, 309], [310, 11, 312, 313, 314])):
        for lst, slot in zip(lists, new):
            lst.append(slot)
        slots = torch.tensor([s for lst in lists for s in lst], dtype=torch.int64)
        cu = cu_of([len(lst) for lst in lists])
        runs = slot_runs(slots, cu) if runs is None else append_slots(runs, slots, cu, torch.tensor(new))
        got = [sorted(runs.rest_slots[a:b].tolist() + [s + i for rq, s, n in runs.runs if rq == j for i in range(n)])
               for j, (a, b) in enumerate(zip(runs.rest_cu, runs.rest_cu[1:]))]
        assert got == [sorted(lst) for lst in lists]
        out, lse = decode_partial_attention(q.to(dtype), kc.to(dtype), vc.to(dtype), slots, cu, runs=runs)
        ref_out, ref_lse = decode_partial_attention_ref(q, kc, vc, slots, cu)
        assert_matches_ref(out, lse, ref_out, ref_lse, dtype)


def test_decode_runs_must_belong_to_the_slots():
    q = torch.randn(1, 2, 8, dtype=F64)
    kc = torch.randn(10, 2, 8, dtype=F64)
    slots, cu = torch.arange(4), torch.tensor([0, 4])
    other = slot_runs(slots.clone(), cu)
    with pytest.raises(ValueError, match="runs must be"):
        decode_partial_attention(q, kc, kc, slots, cu, runs=other)
    with pytest.raises(ValueError, match="runs must be"):
        decode_partial_attention(q, kc, kc, slots, cu, runs=(0, 4))
    assert isinstance(slot_runs(slots, cu), SlotRuns)


# ---------------------------------------------------------------- backend choice


def test_cpu_default_is_the_fast_path_and_env_selects_the_reference(monkeypatch):
    monkeypatch.delenv("ESP_KERNELS", raising=False)
    cpu = torch.zeros(1, dtype=F64)
    assert resolve_backend(None, cpu) == "cpu" and resolve_backend(None, cpu.float()) == "cpu"
    calls = []
    fast_prefill = prefill_cpu.striped_attention_step_cpu
    fast_decode = decode_mod.decode_partial_attention_cpu
    ref_prefill = prefill_mod.striped_attention_step_ref
    ref_decode = decode_mod.decode_partial_attention_ref
    monkeypatch.setattr(prefill_cpu, "striped_attention_step_cpu",
                        lambda *a: calls.append("fast prefill") or fast_prefill(*a))
    monkeypatch.setattr(decode_mod, "decode_partial_attention_cpu",
                        lambda *a: calls.append("fast decode") or fast_decode(*a))
    monkeypatch.setattr(prefill_mod, "striped_attention_step_ref",
                        lambda *a: calls.append("ref prefill") or ref_prefill(*a))
    monkeypatch.setattr(decode_mod, "decode_partial_attention_ref",
                        lambda *a: calls.append("ref decode") or ref_decode(*a))
    q = torch.randn(4, 2, 8, dtype=F64)
    pos, cu = torch.arange(4), cu_of([4])
    layout = StripeLayout(1, (0,), (0,))

    def both():
        striped_attention_step(q, q, q, pos, pos, cu, cu, layout=layout)
        decode_partial_attention(q, q, q, pos, torch.tensor([0, 1, 2, 3, 4]))

    both()
    assert calls == ["fast prefill", "fast decode"]
    calls.clear()
    monkeypatch.setenv("ESP_KERNELS", "torch")
    both()
    assert calls == ["ref prefill", "ref decode"]
    calls.clear()
    monkeypatch.delenv("ESP_KERNELS")
    set_kernel_backend("torch")
    try:
        both()
    finally:
        set_kernel_backend(None)
    assert calls == ["ref prefill", "ref decode"]


def test_cpu_backend_refuses_other_devices():
    meta = torch.zeros(1, device="meta")
    with pytest.raises(ValueError, match="CPU tensors"):
        resolve_backend("cpu", meta)


# ---------------------------------------------------------------- the engine's mixed step


def test_mixed_step_fast_path_equals_reference():
    """Chunks over cached prefixes held in one run (read in place) or scattered (gathered), plus
    decode riders, through `MixedStep` on the default backend and on the reference."""
    from esp.engine.chunked import MixedStep
    from esp.engine.kv_pool import KVPool, SlotList
    from esp.engine.protocol import DecodeRows, DecodeSeq, KeepRange, MixedBatch, PrefillSeq

    g = torch.Generator().manual_seed(5)
    perm = torch.randperm(200, generator=g).add(200).tolist()  # scattered slots 200..399
    cached = {1: r(0, 40), 2: perm[:30], 3: [], 4: r(100, 150), 5: perm[30:35]}
    chunks = {1: (40, r(40, 60)), 2: (30, perm[35:45]), 3: (0, r(160, 175))}
    riders = {4: 150, 5: perm[45]}
    batch = MixedBatch(1, (0,), tuple(
        PrefillSeq(rid, list(range(3, 3 + len(s))), (KeepRange(0, start, start + len(s), s),), None, start)
        for rid, (start, s) in chunks.items()), DecodeRows.of(
        [DecodeSeq(rid, 7, len(cached[rid]), 0, slot, (0,)) for rid, slot in riders.items()]))
    t = sum(len(s) for _, s in chunks.values()) + len(riders)
    q = torch.randn(t, 4, 16, generator=g, dtype=F64)
    k = torch.randn(t, 2, 16, generator=g, dtype=F64)
    v = torch.randn(t, 2, 16, generator=g, dtype=F64)
    pool0 = torch.randn(2, 1, 400, 2, 16, generator=g, dtype=F64)

    def run(backend):
        pool = KVPool(1, 400, 2, 16, F64, torch.device("cpu"))
        pool.k.copy_(pool0[0]), pool.v.copy_(pool0[1])
        local = {}
        for rid, slots in cached.items():
            local[rid] = SlotList(torch.device("cpu"))
            local[rid].extend(slots)
        step = MixedStep(batch, 0, pool, local, torch.device("cpu"))
        assert [c.run for c in step.chunks] == [0, None, 160]
        set_kernel_backend(backend)
        try:
            return step(0, q, k, v)
        finally:
            set_kernel_backend(None)

    fast, ref = run(None), run("torch")
    torch.testing.assert_close(fast, ref, atol=1e-12, rtol=0)
