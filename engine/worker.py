"""One instance: a worker process holding a model replica and its KV pool (DESIGN 3).

Workers never decide. They execute the steps the main process sends, in order, and
answer each with a `StepDone` (or a `WorkerFailed`). The loop dispatches on message type.
"""
from __future__ import annotations

import os
import signal
import threading
import time
import traceback
from dataclasses import dataclass, replace
from functools import singledispatchmethod

import torch

from esp.engine.attention import DistributedDecode, StripedPrefill
from esp.engine.chunked import MixedStep
from esp.engine.comm import PeerComm
from esp.engine.kv_pool import KVPool, SlotList
from esp.engine.protocol import (DecodeBatch, MigrateKV, PrefillBatch, Ready, Release, SampleSpec, Shutdown,
                                 StepDone, WorkerFailed)
from esp.engine.sampling import SamplingError, sample_tokens


@dataclass(frozen=True)
class WorkerSpec:
    """What one worker process needs to start (picklable, sent at spawn)."""

    rank: int
    world_size: int
    model_dir: str
    device: str
    dtype: str
    kv_slots: int | None
    threads: int
    dist_init: str
    cpus: tuple[int, ...] = ()


class Worker:
    def __init__(self, spec: WorkerSpec) -> None:
        from esp.engine.loader import load_model, resolve_dtype

        self.spec = spec
        self.rank = spec.rank
        self.device = torch.device(spec.device)
        self.model = load_model(spec.model_dir, resolve_dtype(spec.dtype, self.device), self.device)
        cfg = self.model.config
        dtype = next(self.model.parameters()).dtype
        slots = spec.kv_slots or self._slots_from_free_memory(cfg, dtype)
        self.pool = KVPool(cfg.num_hidden_layers, slots, cfg.num_key_value_heads, cfg.head_dim, dtype, self.device)
        self.local: dict[int, SlotList] = {}
        self.comm = PeerComm(self.rank)
        self.failed: dict[int, str] = {}

    def _slots_from_free_memory(self, cfg, dtype: torch.dtype, fraction: float = 0.85) -> int:
        """On a GPU: most of the memory left after loading the model."""
        free, _ = torch.cuda.mem_get_info(self.device)
        per_slot = KVPool.bytes_per_slot(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, dtype)
        return max(1, int(free * fraction) // per_slot)

    @singledispatchmethod
    def handle(self, msg: object) -> object:
        raise TypeError(f"worker {self.rank}: unknown message {type(msg).__name__}")

    @handle.register
    def _(self, msg: PrefillBatch) -> StepDone:
        if msg.mixed:
            return self._mixed(msg)
        t0 = time.perf_counter()
        ctx = StripedPrefill(msg, self.rank, self.pool, self.comm, self.device)
        ids = torch.tensor([t for s in msg.seqs for t in s.token_ids[ctx.index::len(msg.group)]],
                           dtype=torch.int64, device=self.device)
        for s in msg.seqs:
            for kr in s.keep:
                if kr.rank == self.rank:
                    self.local.setdefault(s.request_id, SlotList(self.device)).extend(kr.slots)
        with torch.inference_mode():
            hidden = self.model(ids, ctx.positions, ctx)
            owned = [s for s in msg.seqs if s.request_id in ctx.last_rows]
            rows = torch.tensor([ctx.last_rows[s.request_id] for s in owned], dtype=torch.int64,
                                device=self.device)
            sampled = self._sample(hidden[rows], [s.request_id for s in owned], [s.sample for s in owned])
        return self._done(msg.step_id, sampled, t0)

    def _mixed(self, msg: PrefillBatch) -> StepDone:
        t0 = time.perf_counter()
        ctx = MixedStep(msg, self.rank, self.pool, self.local, self.device)
        with torch.inference_mode():
            hidden = self.model(ctx.input_ids, ctx.positions, ctx)
            ids = list(ctx.last_rows) + [d.request_id for d in msg.decode]
            rows = list(ctx.last_rows.values()) + list(range(ctx.num_prefill, len(ctx.input_ids)))
            specs = [s.sample for s in msg.seqs if s.sample is not None] + [d.sample for d in msg.decode]
            sampled = self._sample(hidden[torch.tensor(rows, dtype=torch.int64, device=self.device)], ids, specs)
        return self._done(msg.step_id, sampled, t0)

    @handle.register
    def _(self, msg: DecodeBatch) -> StepDone:
        t0 = time.perf_counter()
        tokens: dict[int, list[int]] = {}
        batch = msg
        for k in range(msg.steps):
            if k:
                batch = replace(msg, seqs=tuple(s.advance(k, tokens[s.request_id][-1] if s.master == self.rank else 0)
                                                for s in msg.seqs))
            ctx = DistributedDecode(batch, self.rank, self.pool, self.local, self.comm, self.device)
            with torch.inference_mode():
                hidden = self.model(ctx.input_ids, ctx.positions, ctx)
                sampled = self._sample(hidden, [s.request_id for s in ctx.mine], [s.sample for s in ctx.mine])
            for rid, tok in sampled.items():
                tokens.setdefault(rid, []).append(tok)
        if msg.steps == 1:
            return self._done(msg.step_id, {rid: t[0] for rid, t in tokens.items()}, t0)
        return self._done(msg.step_id, tokens, t0)

    @handle.register
    def _(self, msg: MigrateKV) -> StepDone:
        t0 = time.perf_counter()
        local = self.local.setdefault(msg.request_id, SlotList(self.device))
        for start in range(0, len(msg.src_slots), msg.chunk):
            if self.rank == msg.src:
                idx = torch.tensor(msg.src_slots[start: start + msg.chunk], device=self.device)
                block = torch.stack((self.pool.k[:, idx], self.pool.v[:, idx]))
                self.comm.start([(msg.dst, block)], []).wait()
            else:
                idx = torch.tensor(msg.dst_slots[start: start + msg.chunk], device=self.device)
                block = self.pool.k.new_empty((2, self.pool.k.shape[0], len(idx)) + self.pool.k.shape[2:])
                self.comm.start([], [(msg.src, block)]).wait()
                self.pool.k[:, idx] = block[0]
                self.pool.v[:, idx] = block[1]
        if self.rank == msg.src:
            local.drop_last(len(msg.src_slots))
        else:
            local.extend(msg.dst_slots)
        return self._done(msg.step_id, {}, t0)

    @handle.register
    def _(self, msg: Release) -> None:
        for rid in msg.request_ids:
            self.local.pop(rid, None)

    def _sample(self, hidden: torch.Tensor, request_ids: list[int], specs: list[SampleSpec]) -> dict[int, int]:
        """Tokens by request; a request whose row cannot be sampled goes to `self.failed` and,
        in a multi-step round, is fed token 0 until the round ends (its peers keep the batch)."""
        if not request_ids:
            return {}
        tokens = sample_tokens(self.model.compute_logits(hidden), specs)
        out = {}
        for rid, tok in zip(request_ids, tokens):
            if isinstance(tok, SamplingError):
                self.failed.setdefault(rid, f"sampling failed: {tok}")
                tok = 0
            out[rid] = tok
        return out

    def _done(self, step_id: int, sampled: dict, t0: float) -> StepDone:
        comm_s = self.comm.end_step()
        failed, self.failed = self.failed, {}
        sampled = {rid: tok for rid, tok in sampled.items() if rid not in failed}
        return StepDone(step_id, self.rank, sampled, time.perf_counter() - t0 - comm_s, comm_s, failed)


def _die_with_parent() -> None:
    """The worker exits when the main process does, whatever killed it (SIGKILL included):
    Linux's parent-death signal, and a watchdog thread where that is not available."""
    parent = os.getppid()
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="esp-parent-watchdog").start()


def worker_main(spec: WorkerSpec, conn) -> None:
    """Entry point of a worker process: set up, announce `Ready`, then serve messages until `Shutdown`.
    Ctrl-C reaches the whole process group: the main process shuts the workers down, so they
    ignore SIGINT themselves. Peer sockets bind to loopback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    if spec.cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, spec.cpus)
    torch.set_num_threads(spec.threads)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    try:
        if spec.world_size > 1:
            import torch.distributed as dist
            backend = "nccl" if spec.device.startswith("cuda") else "gloo"
            if spec.device.startswith("cuda"):
                torch.cuda.set_device(torch.device(spec.device))
            dist.init_process_group(backend, init_method=spec.dist_init, rank=spec.rank,
                                    world_size=spec.world_size)
        worker = Worker(spec)
    except Exception as exc:
        conn.send(WorkerFailed(spec.rank, None, f"worker {spec.rank} failed to start: {exc}",
                               traceback.format_exc()))
        return
    conn.send(Ready(spec.rank, worker.pool.num_slots, spec.device, str(worker.pool.k.dtype)))
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            break
        if isinstance(msg, Shutdown):
            break
        try:
            reply = worker.handle(msg)
        except Exception as exc:
            reply = WorkerFailed(spec.rank, getattr(msg, "step_id", None),
                                 f"worker {spec.rank}: {type(exc).__name__}: {exc}", traceback.format_exc())
        if reply is not None:
            conn.send(reply)
    if spec.world_size > 1:
        import torch.distributed as dist
        dist.destroy_process_group()
