"""`esp-run profile`: measure step times on the real workers and fit a `CostModel` (DESIGN 7).

The profiler is the only user of the workers while it runs, so it sends hand-built steps
straight to a `WorkerGroup` and picks the KV slots itself: a bump allocator per instance,
reset (the next step releases every request it created) between measurements, so pools
never overflow. KV contents are irrelevant; only the shapes of the work matter. Times are the
main process's wall time from sending a step to the last `StepDone`: what the scheduler sees.
Progress (each phase and measured point, with the elapsed time) goes to the `esp.profiler`
logger at INFO, which `esp-run profile` shows on stderr.
"""
from __future__ import annotations

import itertools
import json
import logging
import random
import statistics
import time
from dataclasses import dataclass, replace

from esp.engine import protocol as msg
from esp.engine.workers import WorkerGroup
from esp.engine.instances import kv_bytes_per_token, worker_specs
from esp.engine.config import EngineConfig
from esp.engine.model_config import ModelConfig
from esp.engine.sampling_params import SamplingParams
from esp.costs import cost_fit as fit

log = logging.getLogger("esp.profiler")
GREEDY = SamplingParams(temperature=0.0)
DEFAULT_BYTES_PER_S = 1e12  # with one instance: latency 0, this bandwidth


@dataclass(frozen=True)
class ProfileOptions:
    quick: bool = False
    max_len: int | None = None
    repeats: int | None = None

    def __post_init__(self) -> None:
        if self.max_len is not None and self.max_len < 16:
            raise ValueError(f"--max-len must be at least 16, got {self.max_len}")
        if self.repeats is not None and self.repeats < 1:
            raise ValueError(f"--repeats must be at least 1, got {self.repeats}")


def log_grid(lo: int, hi: int, per_octave: int = 1) -> list[int]:
    """Integers from `lo` to `hi` (both included), `per_octave` points per doubling."""
    out, k = [], 0
    while (v := round(lo * 2 ** (k / per_octave))) < hi:
        out.append(v)
        k += 1
    return sorted(set(out + [hi]))


def dops_of(instances: int) -> list[int]:
    return sorted({d for d in (2 ** k for k in range(instances.bit_length())) if d <= instances} | {instances})


class Profiler:
    def __init__(self, config: EngineConfig, options: ProfileOptions) -> None:
        self.config, self.options = config, options
        self.model_config = ModelConfig.from_dir(config.model_dir)
        self.repeats = options.repeats or (1 if options.quick else 2)
        self.cheap_repeats = max(3, self.repeats)  # decode steps and transfers take milliseconds
        self.group: WorkerGroup | None = None
        self._step = itertools.count(1)
        self._rid = itertools.count(1)
        self._next: list[int] = [0] * config.instances
        self._live: list[set[int]] = [set() for _ in range(config.instances)]
        self._released: dict[int, set[int]] = {}
        self._rng = random.Random(0)
        self._t0 = time.perf_counter()

    def progress(self, text: str, *args) -> None:
        log.info("[%6.1f s] " + text, time.perf_counter() - self._t0, *args)

    async def start(self) -> None:
        cfg = self.config
        self.progress("starting %d worker(s): %s, %s, dtype %s", cfg.instances, cfg.model_dir.name, cfg.device,
                      cfg.dtype)
        self.group = WorkerGroup(lambda: worker_specs(self.config, self.model_config))
        await self.group.start()
        self.pool = min(self.group.kv_slots)
        cap = min(8192, self.pool, self.model_config.max_position_embeddings)
        self.max_len = min(self.options.max_len or (1024 if self.options.quick else cap), cap)
        self.progress("workers ready: %d KV slots per instance; prompts up to %d tokens, %d repeat(s) per point",
                      self.pool, self.max_len, self.repeats)

    def kv_bytes_per_token(self) -> int:
        return kv_bytes_per_token(self.config, self.model_config)

    def alloc(self, rank: int, n: int, rid: int) -> list[int]:
        start = self._next[rank]
        if start + n > self.pool:
            raise RuntimeError(f"profiler: instance {rank} pool of {self.pool} slots overflows")
        self._next[rank] = start + n
        self._live[rank].add(rid)
        return list(range(start, start + n))

    def reset(self) -> None:
        for rank, ids in enumerate(self._live):
            if ids:
                self._released.setdefault(rank, set()).update(ids)
            ids.clear()
        self._next = [0] * self.config.instances

    async def timed(self, step) -> float:
        released = {r: tuple(sorted(self._released.pop(r))) for r in step.group if r in self._released}
        step = replace(step, released=released)
        t0 = time.perf_counter()
        await self.group.run(step)
        return time.perf_counter() - t0

    def prefill_step(self, lengths: list[int], group: tuple[int, ...]) -> tuple[msg.PrefillBatch, list[int]]:
        seqs, rids = [], []
        vocab = self.model_config.vocab_size
        for n in lengths:
            rid = next(self._rid)
            bounds = [n * i // len(group) for i in range(len(group) + 1)]
            keep = tuple(msg.KeepRange(r, bounds[i], bounds[i + 1], self.alloc(r, bounds[i + 1] - bounds[i], rid))
                         for i, r in enumerate(group) if bounds[i + 1] > bounds[i])
            ids = [self._rng.randrange(3, vocab) for _ in range(n)]
            seqs.append(msg.PrefillSeq(rid, ids, keep, msg.SampleSpec(GREEDY, 0, 0)))
            rids.append(rid)
        return msg.PrefillBatch(next(self._step), group, tuple(seqs)), rids

    async def prefill_time(self, lengths: list[int], group: tuple[int, ...]) -> float:
        times = []
        for _ in range(self.repeats):
            step, _ = self.prefill_step(lengths, group)
            times.append(await self.timed(step))
            self.reset()
        return statistics.median(times)

    async def decode_time(self, rids: list[int], kv_len: int, group: tuple[int, ...], grown: dict) -> float:
        times = []
        for _ in range(self.cheap_repeats):
            seqs = []
            for i, rid in enumerate(rids):
                master = group[i % len(group)]
                pos = kv_len + grown[rid]
                seqs.append(msg.DecodeSeq(rid, 5, pos, master, self.alloc(master, 1, rid)[0], group, 1))
                grown[rid] += 1
            step = msg.DecodeBatch(next(self._step), group, msg.DecodeRows.of(seqs),
                                   sampling={rid: (GREEDY, 0) for rid in rids})
            times.append(await self.timed(step))
        return statistics.median(times)

    async def profile_prefill(self) -> list[fit.PrefillSample]:
        top = self.max_len
        # half-octave points where prompts are cheap, whole octaves above top/4 (attention is quadratic)
        lengths = [n for n in log_grid(16, top, 1 if self.options.quick else 2) if n <= top // 4 or n == top
                   or (n & (n - 1)) == 0]
        multi = sorted({top, top // 2} if self.options.quick else {top, top // 4, min(top, 1024)})
        shapes = [[n] for n in lengths] + [[n // 4] * 4 for n in multi] + [[n // 16] * 16 for n in multi[-1:]]
        out = []
        dops = dops_of(self.config.instances)
        self.progress("prefill: %d shapes on %s instance(s)", len(shapes), "/".join(map(str, dops)))
        for dop in dops:
            group = tuple(range(dop))
            await self.prefill_time([16], group)  # warm up (discarded)
            await self.prefill_time([max(16, top // 4)], group)
            for i, lens in enumerate(shapes, 1):
                out.append(fit.PrefillSample(dop, tuple(lens), await self.prefill_time(lens, group)))
                shape = f"{len(lens)}x{lens[0]}" if len(lens) > 1 else str(lens[0])
                self.progress("prefill dop=%d [%d/%d] %s tokens: %.3f s", dop, i, len(shapes), shape,
                              out[-1].seconds)
        return out

    async def profile_decode(self) -> list[fit.DecodeSample]:
        quick = self.options.quick
        # KV per request 128, 512, 2048 (capped by max-len); the decode model only sees batch and KV total,
        # so many moderate requests stand in for a few long ones without paying for long prefills
        kv_lens = sorted({min(n, self.max_len) for n in ((128, 512, 1024) if quick else (128, 512, 2048))})
        tokens, work = (16384, 1 << 22) if quick else (65536, 1 << 24)  # bound the setup prefills
        out = []
        dops = [1] + ([2] if self.config.instances >= 2 else [])
        self.progress("decode: KV of %s tokens per request on %s instance(s)", "/".join(map(str, kv_lens)),
                      "/".join(map(str, dops)))
        for dop in dops:
            group = tuple(range(dop))
            for kv_len in kv_lens:
                bmax = max(1, min(64, (self.pool * dop - 128 * (self.cheap_repeats + 1)) // kv_len, tokens // kv_len,
                                   work // kv_len ** 2))
                batches = [b for b in (1, 2, 4, 8, 16, 32, 64) if b <= bmax]
                rids: list[int] = []
                while len(rids) < batches[-1]:  # create the KV, a few requests per prefill step
                    k = min(batches[-1] - len(rids), max(1, 8192 // kv_len))
                    step, new = self.prefill_step([kv_len] * k, group)
                    await self.group.run(step)
                    rids += new
                grown = dict.fromkeys(rids, 0)
                await self.decode_time(rids[:1], kv_len, group, grown)  # warm up (discarded)
                for b in batches:
                    seconds = await self.decode_time(rids[:b], kv_len, group, grown)
                    out.append(fit.DecodeSample(dop, b, sum(kv_len + grown[r] for r in rids[:b]), seconds))
                self.progress("decode dop=%d kv=%d per request: batch %s: %s s", dop, kv_len,
                              ",".join(map(str, batches)), ",".join(f"{s.seconds:.4f}" for s in out[-len(batches):]))
                self.reset()
        return out

    async def profile_transfer(self) -> list[fit.TransferSample]:
        if self.config.instances < 2:
            return []
        sizes = log_grid(64, min(self.max_len, self.pool), 1)
        self.progress("transfer: KV of %d sizes from instance 0 to 1", len(sizes))
        out = []
        for i, n in enumerate([sizes[0]] + sizes):
            times = []
            for _ in range(self.cheap_repeats):
                rid = next(self._rid)
                step = msg.MigrateKV(next(self._step), rid, 0, 1, self.alloc(0, n, rid), self.alloc(1, n, rid))
                times.append(await self.timed(step))
                self.reset()
            if i:  # the first is a warm-up
                out.append(fit.TransferSample(n * self.kv_bytes_per_token(), statistics.median(times)))
                self.progress("transfer [%d/%d] %d tokens: %.4f s", i, len(sizes), n, out[-1].seconds)
        return out

    async def run(self) -> tuple[dict, dict]:
        t0 = self._t0 = time.perf_counter()
        await self.start()
        try:
            prefill = await self.profile_prefill()
            decode = await self.profile_decode()
            transfer = await self.profile_transfer()
        finally:
            await self.group.shutdown()
        self.progress("measured; fitting the cost model")
        kv_bytes = self.kv_bytes_per_token()
        measured = bool(transfer)
        if not measured:  # one instance, nothing to migrate: an exact line through the default
            transfer = [fit.TransferSample(n, n / DEFAULT_BYTES_PER_S) for n in (1 << 20, 1 << 30)]
        cfg = self.config
        meta = {"model": str(cfg.model_dir), "device": cfg.device, "dtype": cfg.dtype, "instances": cfg.instances,
                "threads_per_instance": cfg.threads, "kv_slots": self.pool, "max_len": self.max_len,
                "repeats": self.repeats, "quick": self.options.quick, "transfer_measured": measured}
        model, report = fit.fit_cost_model(prefill, decode, transfer, kv_bytes, f"profile-{cfg.model_dir.name}", meta)
        report["transfer"]["measured"] = measured
        report["wall_s"] = time.perf_counter() - t0
        report["samples"] = {"prefill": [[s.dop, list(s.lengths), s.seconds] for s in prefill],
                             "decode": [[s.dop, s.batch_size, s.kv_tokens, s.seconds] for s in decode],
                             "transfer": [[s.nbytes, s.seconds] for s in transfer if measured]}
        data = model.to_json()
        data["meta"]["report"] = json.loads(json.dumps(report))  # str keys, as in the file
        return data, report


def summary_lines(report: dict) -> list[str]:
    def errors(part: dict) -> str:
        e = part["rel_error"]
        return (f"{part['samples']:3d} samples, rel. error median {e['median']:.1%} p90 {e['p90']:.1%} "
                f"max {e['max']:.1%}" + ("  (rank deficient)" if part["rank_deficient"] else ""))
    lines = [f"{kind:<8} dop={dop}: {errors(part)}" for kind in ("prefill", "decode")
             for dop, part in report[kind].items()]
    t = report["transfer"]
    link = f"latency {t['latency_s'] * 1e6:.0f} us, {t['bytes_per_s'] / 1e9:.2f} GB/s"
    lines.append(f"transfer: {errors(t)}; {link}" if t["measured"] else
                 f"transfer: one instance, not measured; default {link}")
    return lines + [f"wall time {report['wall_s']:.1f} s"]
