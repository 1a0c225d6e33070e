"""One instance: a worker process holding a model replica and its KV pool (DESIGN 3).

Workers never decide. They execute the steps the main process sends, in order, and
answer each with a `StepDone` (or a `WorkerFailed`). The loop dispatches on message type.

With `--tp N` an instance is N of these processes (`esp.engine.tensor_parallel`): each gets
every step of its instance, holds the same slot lists for its own heads, and runs the same
code; collectives on the instance's subgroup keep them in step. All of them sample (from the
same all-gathered logits, with the same seeds, so they agree on every token a round feeds
back); only tp rank 0 reports tokens and failures, and only it hears `EndRound`.
"""
from __future__ import annotations

import os
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from functools import singledispatchmethod

import torch

from esp.engine.attention import DistributedDecode, StripedPrefill
from esp.engine.chunked import MixedStep
from esp.engine.comm import PeerComm
from esp.engine.kv_pool import KVPool, SlotList
from esp.engine.protocol import (DecodeBatch, DecodeTokens, EndRound, MigrateKV, MixedBatch, PrefillBatch, Ready,
                                 SampleSpec, Shutdown, StepDone, WorkerFailed)
from esp.engine.sampling_params import SamplingParams
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
    tp: int = 1
    tp_rank: int = 0

    @property
    def process_rank(self) -> int:
        """Rank in the torch.distributed job: `rank * tp + tp_rank` (`world_size` counts processes)."""
        return self.rank * self.tp + self.tp_rank


class Worker:
    """Executes steps. Per request it keeps its local slot list and, once told, its sampling
    parameters; both are forgotten when a step lists the request in `released`."""

    def __init__(self, spec: WorkerSpec, conn=None, tp_group=None) -> None:
        from esp.engine.loader import load_model, resolve_dtype

        self.spec = spec
        self.rank = spec.rank
        self.conn = conn
        self.device = torch.device(spec.device)
        shard = None
        if spec.tp > 1:
            from esp.engine.model_config import ModelConfig
            from esp.engine.tensor_parallel import TPShard
            shard = TPShard.of(ModelConfig.from_dir(spec.model_dir), spec.tp, spec.tp_rank, tp_group)
        self.tp_group = tp_group
        self.reports = spec.tp_rank == 0  # the one process of the instance that reports tokens
        self.model = load_model(spec.model_dir, resolve_dtype(spec.dtype, self.device), self.device, shard)
        cfg = self.model.config
        kv_heads = cfg.num_key_value_heads if shard is None else shard.kv_heads
        dtype = next(self.model.parameters()).dtype
        slots = spec.kv_slots or self._slots_from_free_memory(cfg, kv_heads, dtype)
        self.pool = KVPool(cfg.num_hidden_layers, slots, kv_heads, cfg.head_dim, dtype, self.device)
        self.local: dict[int, SlotList] = {}
        self.sampling: dict[int, tuple[SamplingParams, int]] = {}
        self.comm = PeerComm(self.rank, spec.tp, spec.tp_rank)
        self.failed: dict[int, str] = {}
        self.backlog: list[object] = []

    def _slots_from_free_memory(self, cfg, kv_heads: int, dtype: torch.dtype, fraction: float = 0.85) -> int:
        """On a GPU: most of the memory left after loading the model (the least any tp rank of
        the instance has, so that all of them hold the same slots)."""
        free, _ = torch.cuda.mem_get_info(self.device)
        per_slot = KVPool.bytes_per_slot(cfg.num_hidden_layers, kv_heads, cfg.head_dim, dtype)
        slots = max(1, int(free * fraction) // per_slot)
        if self.spec.tp > 1:
            import torch.distributed as dist
            least = torch.tensor([slots], dtype=torch.int64, device=self.device)
            dist.all_reduce(least, op=dist.ReduceOp.MIN, group=self.tp_group)
            slots = int(least)
        return slots

    def run(self, msg: object) -> object:
        """Forget what the step releases, then execute it."""
        for rid in getattr(msg, "released", {}).get(self.rank, ()):
            self.local.pop(rid, None)
            self.sampling.pop(rid, None)
        return self.handle(msg)

    @singledispatchmethod
    def handle(self, msg: object) -> object:
        raise TypeError(f"worker {self.rank}: unknown message {type(msg).__name__}")

    @handle.register
    def _(self, msg: EndRound) -> None:
        """The round it names already ended."""

    @handle.register
    def _(self, msg: PrefillBatch) -> StepDone:
        t0 = time.perf_counter()
        ctx = StripedPrefill(msg, self.rank, self.pool, self.comm, self.device)
        ids = torch.tensor([t for s in msg.seqs for t in s.token_ids[ctx.index::len(msg.group)]],
                           dtype=torch.int64, device=self.device)
        for s in msg.seqs:
            self.sampling[s.request_id] = (s.sample.params, s.sample.seed)
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

    @handle.register
    def _(self, msg: MixedBatch) -> StepDone:
        t0 = time.perf_counter()
        self.sampling.update(msg.sampling)
        for s in msg.seqs:
            if s.sample is not None:
                self.sampling[s.request_id] = (s.sample.params, s.sample.seed)
        ctx = MixedStep(msg, self.rank, self.pool, self.local, self.device)
        rows = msg.decode
        with torch.inference_mode():
            hidden = self.model(ctx.input_ids, ctx.positions, ctx)
            ids = list(ctx.last_rows) + list(rows.request_ids)
            idx = list(ctx.last_rows.values()) + list(range(ctx.num_prefill, len(ctx.input_ids)))
            specs = [s.sample for s in msg.seqs if s.sample is not None] + \
                [self._spec(rid, index) for rid, index in zip(rows.request_ids, rows.indices)]
            sampled = self._sample(hidden[torch.tensor(idx, dtype=torch.int64, device=self.device)], ids, specs)
        return self._done(msg.step_id, sampled, t0)

    @handle.register
    def _(self, msg: DecodeBatch) -> StepDone:
        """A round: up to `steps` iterations, each master feeding back what it sampled; the
        tokens of every iteration but the last are streamed as they come."""
        t0 = time.perf_counter()
        self.sampling.update(msg.sampling)
        rows = msg.rows
        mine = [i for i, m in enumerate(rows.masters) if m == self.rank]
        tokens = [rows.token_ids[i] for i in mine]
        ran = 0
        round_ = DistributedDecode(msg, self.rank, self.pool, self.local, self.comm, self.device)
        while True:
            ctx = round_.iteration(ran, tokens)
            with torch.inference_mode():
                hidden = self.model(ctx.input_ids, ctx.positions, ctx)
                specs = [self._spec(rows.request_ids[i], rows.indices[i] + ran) for i in mine]
                sampled = self._sample(hidden, ctx.mine_ids, specs)
            ran += 1
            if ran == msg.steps or not self._round_goes_on(msg):
                return self._done(msg.step_id, sampled, t0, ran)
            tokens = [sampled.get(rid, 0) for rid in ctx.mine_ids]
            if sampled and self.conn is not None and self.reports:
                self.conn.send(DecodeTokens(msg.step_id, self.rank,
                                            {rid: t for rid, t in sampled.items() if rid not in self.failed}))

    def _round_goes_on(self, msg: DecodeBatch) -> bool:
        """The leader (tp rank 0 of the group's first instance) ends the round when the main
        process asked it to (`EndRound`) or sent anything else; it tells every other process
        of the group, who follow its word."""
        if len(msg.group) == 1 and self.comm.tp == 1:  # a lone process needs no flag on the wire
            return not self._end_requested(msg.step_id)
        flag = torch.zeros(1, dtype=torch.int64, device=self.device)  # NCCL sends device tensors only
        comm, leader = self.comm, self.comm.process(msg.group[0], 0)
        if comm.process(self.rank) == leader:
            flag[0] = int(not self._end_requested(msg.step_id))
            others = [comm.process(r, t) for r in msg.group for t in range(comm.tp)]
            comm.start([(p, flag) for p in others if p != leader], [], processes=True).wait()
        else:
            comm.start([], [(leader, flag)], processes=True).wait()
        return bool(flag[0])

    def _end_requested(self, step_id: int) -> bool:
        while self.conn is not None and self.conn.poll():
            msg = self.conn.recv()
            if isinstance(msg, EndRound) and msg.step_id != step_id:
                continue  # a round that already ended
            if not isinstance(msg, EndRound):
                self.backlog.append(msg)
            return True
        return False

    @handle.register
    def _(self, msg: MigrateKV) -> StepDone:
        t0 = time.perf_counter()
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
        local = self.local.get(msg.request_id)
        if self.rank == msg.dst:
            self.local.setdefault(msg.request_id, SlotList(self.device)).extend(msg.dst_slots)
        elif local is not None:  # (the profiler moves KV no request holds)
            local.drop_last(min(len(local), len(msg.src_slots)))
            if not len(local) and msg.request_id not in self.sampling:
                del self.local[msg.request_id]  # nothing of it is left here to release later
        return self._done(msg.step_id, {}, t0)

    def _spec(self, request_id: int, index: int) -> SampleSpec:
        params, seed = self.sampling[request_id]
        return SampleSpec(params, seed, index)

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

    def _done(self, step_id: int, sampled: dict, t0: float, iterations: int = 1) -> StepDone:
        comm_s = self.comm.end_step()
        failed, self.failed = self.failed, {}
        if not self.reports:  # tp rank 0 of the instance reports the tokens all its ranks sampled
            sampled, failed = {}, {}
        sampled = {rid: tok for rid, tok in sampled.items() if rid not in failed}
        return StepDone(step_id, self.rank, sampled, time.perf_counter() - t0 - comm_s, comm_s, failed,
                        iterations)


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


def worker_name(spec: WorkerSpec) -> str:
    """How logs and errors name a worker process."""
    return f"worker {spec.rank}" if spec.tp == 1 else f"worker {spec.rank} (tp rank {spec.tp_rank})"


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
    tp_group = None
    try:
        if spec.world_size > 1:
            import torch.distributed as dist
            backend = "nccl" if spec.device.startswith("cuda") else "gloo"
            if spec.device.startswith("cuda"):
                torch.cuda.set_device(torch.device(spec.device))
            dist.init_process_group(backend, init_method=spec.dist_init, rank=spec.process_rank,
                                    world_size=spec.world_size)
            if spec.tp > 1:
                from esp.engine.tensor_parallel import new_instance_groups
                tp_group = new_instance_groups(spec.world_size // spec.tp, spec.tp, spec.process_rank)
        worker = Worker(spec, conn, tp_group)
    except Exception as exc:
        conn.send(WorkerFailed(spec.rank, None, f"{worker_name(spec)} failed to start: {exc}",
                               traceback.format_exc()))
        return
    conn.send(Ready(spec.rank, worker.pool.num_slots, spec.device, str(worker.pool.k.dtype)))
    while True:
        try:
            msg = worker.backlog.pop(0) if worker.backlog else conn.recv()
        except EOFError:
            break
        if isinstance(msg, Shutdown):
            break
        try:
            reply = worker.run(msg)
        except Exception as exc:
            reply = WorkerFailed(spec.rank, getattr(msg, "step_id", None),
                                 f"{worker_name(spec)}: {type(exc).__name__}: {exc}", traceback.format_exc())
        if reply is not None:
            conn.send(reply)
    if spec.world_size > 1:
        import torch.distributed as dist
        dist.destroy_process_group()
