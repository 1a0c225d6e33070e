"""The GPU check, in one command (a few minutes on one node):

    python scripts/gpu_check.py [--json OUT]            # on CUDA: every GPU it sees
    TRITON_INTERPRET=1 python scripts/gpu_check.py --device cpu --quick   # the same code paths, tiny shapes

1. kernels: each Triton kernel against its torch reference. bf16: its error against the float32
   reference is at most 2x that of torch's own bf16 attention (`scaled_dot_product_attention`)
   against the same reference; float32: within 1e-4. (CPU mode: float32 only, since the
   Triton interpreter has no bf16.)
2. equivalence over NCCL (gloo on the CPU): greedy float64 tokens of the real engine on every
   GPU (`static-sp`: each prefill striped over all, each decode multi-master) and, with
   `--tp 2` where the engine has it and there are 2+ GPUs, equal those of one instance.
3. speed, printed as ratios: striped prefill of a 32K causal prompt against
   `scaled_dot_product_attention` (FlashAttention on CUDA) at the same shape; decode partial
   attention's KV read rate against the device's copy bandwidth.

Exit status 0 when every check passes. On CPU the timings mean nothing; the suite runs this
mode to keep the script working (tests/test_gpu_check.py).
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from esp.kernels import decode_partial_attention, striped_attention_step


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """torch's attention on `[L, H, D]` rows (GQA by `enable_gqa`) -> `[L, H, D]`."""
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                         v.transpose(0, 1)[None], is_causal=causal, enable_gqa=True)
    return out[0].transpose(0, 1)


def prefill_inputs(n: int, h: int, kvh: int, d: int, dtype, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(n, x, d, generator=g).to(device=device, dtype=dtype) for x in (h, kvh, kvh))
    pos = torch.arange(n, device=device)
    cu = torch.tensor([0, n], device=device)
    return q, k, v, pos, cu


def decode_inputs(batch: int, ctx: int, h: int, kvh: int, d: int, dtype, device, seed: int = 0):
    """Requests of `ctx` keys each, their slots a shuffled pool (no run is contiguous)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, h, d, generator=g).to(device=device, dtype=dtype)
    kc, vc = (torch.randn(batch * ctx, kvh, d, generator=g).to(device=device, dtype=dtype) for _ in range(2))
    slots = torch.randperm(batch * ctx, generator=g).to(device)
    cu = torch.arange(0, batch * ctx + 1, ctx, device=device)
    return q, kc, vc, slots, cu


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def check_kernels(device: str, quick: bool) -> dict:
    n, h, kvh, d = (48, 4, 2, 16) if quick else (2048, 32, 8, 128)
    out = {}
    # the Triton interpreter computes bf16 through numpy, which has no bf16: only float32 on the CPU
    for dtype in (torch.bfloat16, torch.float32) if device == "cuda" else (torch.float32,):
        q, k, v, pos, cu = prefill_inputs(n, h, kvh, d, dtype, device)
        ref, _ = striped_attention_step(q.float(), k.float(), v.float(), pos, pos, cu, cu, backend="torch")
        ours, _ = striped_attention_step(q, k, v, pos, pos, cu, cu, backend="triton")
        out[f"prefill_{dtype}".replace("torch.", "")] = _verdict(ours, ref, sdpa(q, k, v, True), dtype)
        b, ctx = (3, 40) if quick else (16, 4096)
        q, kc, vc, slots, cu = decode_inputs(b, ctx, h, kvh, d, dtype, device)
        ref, _ = decode_partial_attention(q.float(), kc.float(), vc.float(), slots, cu, backend="torch")
        ours, _ = decode_partial_attention(q, kc, vc, slots, cu, backend="triton")
        torch_bf16 = torch.stack([sdpa(q[i:i + 1], kc[slots[i * ctx:(i + 1) * ctx]], vc[slots[i * ctx:(i + 1) * ctx]],
                                       False)[0] for i in range(b)])
        out[f"decode_{dtype}".replace("torch.", "")] = _verdict(ours, ref, torch_bf16, dtype)
    return out


def _verdict(ours: torch.Tensor, ref: torch.Tensor, torch_same_dtype: torch.Tensor, dtype) -> dict:
    mine, theirs = err(ours, ref), err(torch_same_dtype, ref)
    ok = mine <= 2 * theirs + 1e-6 if dtype == torch.bfloat16 else mine <= 1e-4
    return {"error": mine, "torch_error": theirs, "ok": ok}


async def _tokens(config, prompt: list[int], n: int) -> list[int]:
    from esp.engine import SamplingParams
    from esp.engine.engine import Engine
    async with Engine(config) as engine:
        outs = [o async for o in engine.generate(prompt, SamplingParams(max_tokens=n, temperature=0,
                                                                          ignore_eos=True))]
    return outs[-1].token_ids


def check_equivalence(device: str, quick: bool) -> dict:
    from esp.engine import EngineConfig
    gpus = torch.cuda.device_count() if device == "cuda" else 2
    base = EngineConfig(device=device, dtype="float64", instances=1, policy="static-sp", threads_per_instance=1,
                        kv_tokens_per_instance=4096, log_requests=False)
    prompt = [1] + [(37 * j) % 3000 + 3 for j in range(200 if quick else 1500)]
    steps = 8 if quick else 32
    reference = asyncio.run(_tokens(base, prompt, steps))
    runs = {f"esp_{gpus}_instances": dataclasses.replace(base, instances=gpus)}
    if "tp" in {f.name for f in dataclasses.fields(EngineConfig)} and gpus >= 2:
        runs["tp2_1_instance"] = dataclasses.replace(base, tp=2)
        if gpus >= 4:
            runs[f"tp2_{gpus // 2}_instances"] = dataclasses.replace(base, tp=2, instances=gpus // 2)
    return {name: {"ok": asyncio.run(_tokens(cfg, prompt, steps)) == reference} for name, cfg in runs.items()}


def timed(fn, repeats: int) -> float:
    """Median seconds of `fn()` (CUDA events on the GPU)."""
    fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def check_speed(device: str, quick: bool) -> dict:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    n, h, kvh, d = (64, 4, 2, 16) if quick else (32768, 32, 8, 128)
    repeats = 2 if quick else 5
    q, k, v, pos, cu = prefill_inputs(n, h, kvh, d, dtype, device)
    ours = timed(lambda: striped_attention_step(q, k, v, pos, pos, cu, cu, backend="triton"), repeats)
    theirs = timed(lambda: sdpa(q, k, v, True), repeats)
    b, ctx = (4, 64) if quick else (64, 8192)
    q, kc, vc, slots, cu = decode_inputs(b, ctx, h, kvh, d, dtype, device)
    dec = timed(lambda: decode_partial_attention(q, kc, vc, slots, cu, backend="triton"), repeats)
    kv_bytes = 2 * b * ctx * kvh * d * kc.element_size()
    big = torch.empty(kv_bytes // 2 if quick else 1 << 30, dtype=torch.uint8, device=device)
    copy = timed(lambda: big.clone(), repeats)
    copy_bw = 2 * big.numel() / copy
    return {"prefill_tokens": n, "prefill_s": ours, "sdpa_s": theirs, "prefill_speed_over_sdpa": theirs / ours,
            "decode_batch": b, "decode_context": ctx, "decode_s": dec, "decode_gb_per_s": kv_bytes / dec / 1e9,
            "copy_gb_per_s": copy_bw / 1e9, "decode_bandwidth_fraction": kv_bytes / dec / copy_bw}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (the CPU mode's default)")
    ap.add_argument("--json", metavar="OUT", help="write the results here")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: error: no CUDA device (torch {torch.__version__}); use --device cpu with "
              f"TRITON_INTERPRET=1 for the CPU mode", file=sys.stderr)
        return 2
    quick = args.quick or args.device == "cpu"
    report = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "gpus": torch.cuda.device_count() if args.device == "cuda" else 0, "torch": torch.__version__}
    report["kernels"] = check_kernels(args.device, quick)
    report["equivalence"] = check_equivalence(args.device, quick)
    report["speed"] = check_speed(args.device, quick)
    ok = all(c["ok"] for part in ("kernels", "equivalence") for c in report[part].values())
    report["ok"] = ok
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
