"""Real backend: N worker processes (torch.multiprocessing, spawn) bridged into asyncio.

Replies arrive through `loop.add_reader` on each worker's pipe; sends are non-blocking writes
from the loop (a long prompt is pickled in a thread), so nothing blocks the event loop and a
small step reaches its worker without a thread hop (DESIGN 3). Tokens a multi-step round
streams (`DecodeTokens`) go to `on_tokens`. A worker that
dies or fails inside a multi-instance step takes the group down (its peers cannot finish
the step); the engine then calls `restart()`, which reaps every process and starts a fresh
torch.distributed job.

With `--tp N` an instance is N processes (process `instance * N + tp_rank`, one link each): a
step goes to every process of every instance of its group, pickled once, and its result waits
for all their `StepDone`s; tp rank 0 reports the tokens, and a round's `EndRound` goes to tp
rank 0 of its leader. Any failure of a process fails the whole backend (its tp peers are
blocked in collectives).
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import pickle
import signal
import struct
import threading
import time
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import torch.multiprocessing as mp

from esp.engine.backend import BackendError, StepResult
from esp.engine.errors import EngineStartError
from esp.engine.protocol import (DecodeBatch, DecodeTokens, EndRound, MixedBatch, PrefillBatch, Ready, Shutdown, Step,
                                 StepDone, WorkerFailed)
from esp.engine.worker import WorkerSpec, worker_main, worker_name

log = logging.getLogger("esp.engine")


class _Link:
    """The pipes to one worker. Sends are pickled on the loop and written without blocking
    (`multiprocessing.Connection`'s framing, so the worker reads them with `recv()`); what the
    pipe cannot take now is written when it drains, in order. A step with a long prompt is
    pickled in a thread, and later messages wait behind it. Replies come through the loop's
    reader."""

    BIG_TOKENS = 1 << 15

    def __init__(self, rank: int, send_conn, recv_conn, process, name: str = "") -> None:
        self.rank, self.recv_conn, self.process = rank, recv_conn, process
        self.name = name or f"worker {rank}"
        self._send_conn = send_conn
        self._fd = send_conn.fileno()
        os.set_blocking(self._fd, False)
        self._out: collections.deque = collections.deque()  # bytes, memoryviews or futures of bytes
        self._writing = False
        self.broken = False

    def send(self, msg: object) -> None:
        self.push(_framed(msg))

    def push(self, frame: bytes | asyncio.Future) -> None:
        """Queue a message framed by `_framed` (one frame can go to many links)."""
        if self.broken:
            return
        if isinstance(frame, asyncio.Future):
            frame.add_done_callback(lambda _: self._pump())
        self._out.append(frame)
        self._pump()

    def _pump(self) -> None:
        while self._out and not self.broken:
            head = self._out[0]
            if isinstance(head, asyncio.Future):
                if not head.done():
                    return
                head = self._out[0] = memoryview(head.result())
            try:
                n = os.write(self._fd, head)
            except BlockingIOError:
                n = 0
            except OSError:
                self.broken = True
                self._out.clear()
                break
            if n < len(head):
                self._out[0] = memoryview(head)[n:]
                if not self._writing:
                    asyncio.get_running_loop().add_writer(self._fd, self._pump)
                    self._writing = True
                return
            self._out.popleft()
        if self._writing:
            asyncio.get_running_loop().remove_writer(self._fd)
            self._writing = False

    def close(self) -> None:
        self.broken = True
        self._out.clear()
        if self._writing:
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().remove_writer(self._fd)
        self._send_conn.close()


def _framed(msg: object) -> bytes | asyncio.Future:
    """`msg` framed now, or in a thread (a future) when it carries a long prompt."""
    if _prompt_tokens(msg) >= _Link.BIG_TOKENS:
        return asyncio.get_running_loop().run_in_executor(None, _frame, msg)
    return _frame(msg)


def _frame(msg: object) -> bytes:
    """`msg` as `Connection.send` would write it: a big-endian length, then the pickle."""
    data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    if len(data) > 0x7FFFFFFF:
        return struct.pack("!i", -1) + struct.pack("!Q", len(data)) + data
    return struct.pack("!i", len(data)) + data


def _prompt_tokens(msg: object) -> int:
    return sum(len(s.token_ids) for s in getattr(msg, "seqs", ()) if hasattr(s, "token_ids")) \
        if isinstance(msg, (PrefillBatch, MixedBatch)) else 0


class WorkerGroup:
    """The instances of one engine, started together and joined in one torch.distributed job.
    `make_specs()` gives fresh specs (a new rendezvous) for every start, one per process
    (instance by instance, tp rank by tp rank). `links` are indexed by process rank."""

    def __init__(self, make_specs: Callable[[], list[WorkerSpec]], tokenizer_dir: str | None = None,
                 max_model_len: int = 0) -> None:
        self.make_specs = make_specs
        self.tokenizer_dir = tokenizer_dir
        self.tokenizer = None
        self.max_model_len = max_model_len
        self.links: list[_Link] = []
        self._pending: dict[tuple[int, int], asyncio.Future] = {}
        self._ready: dict[int, asyncio.Future] = {}
        self.kv_slots: list[int] = []
        self.dead: str | None = None
        self.on_failure: Callable[[str], None] | None = None
        self.on_tokens: Callable[[int, dict[int, int]], None] | None = None
        self._rounds: dict[int, int] = {}  # step id -> leader of a multi-step round in flight
        self.start_seconds = 0.0
        self._specs: list[WorkerSpec] = []
        self.tp = 1

    @classmethod
    def for_config(cls, config, model) -> WorkerGroup:
        from esp.engine.instances import worker_specs
        if config.tp > 1:
            from esp.engine.tensor_parallel import TensorParallelError, check_tp
            try:
                check_tp(model, config.tp)
            except TensorParallelError as err:
                raise EngineStartError(str(err)) from None
        if config.device == "cuda":
            _check_cuda(config.instances, config.tp)
        return cls(lambda: worker_specs(config, model), str(config.model_dir), model.max_position_embeddings)

    def processes(self, rank: int) -> range:
        """The process ranks of instance `rank`."""
        return range(rank * self.tp, (rank + 1) * self.tp)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        if self.tokenizer_dir and self.tokenizer is None:
            from esp.engine.tokenizer import Tokenizer
            self.tokenizer = await loop.run_in_executor(None, Tokenizer.from_dir, self.tokenizer_dir)
        self.dead = None
        ctx = mp.get_context("spawn")
        self._specs = self.make_specs()
        self.tp = self._specs[0].tp if self._specs else 1
        for spec in self._specs:
            proc_rank = spec.process_rank
            assert proc_rank == len(self.links), "specs must come in process rank order"
            to_worker_r, to_worker_w = ctx.Pipe(duplex=False)
            from_worker_r, from_worker_w = ctx.Pipe(duplex=False)
            suffix = f"{spec.rank}" if spec.tp == 1 else f"{spec.rank}.{spec.tp_rank}"
            proc = ctx.Process(target=worker_main, args=(spec, _Duplex(to_worker_r, from_worker_w)),
                               daemon=True, name=f"esp-worker-{suffix}")
            with _worker_env(spec):
                _start_ignoring_sigint(proc)
            to_worker_r.close()
            from_worker_w.close()
            self._ready[proc_rank] = loop.create_future()
            self.links.append(_Link(proc_rank, to_worker_w, from_worker_r, proc, worker_name(spec)))
            loop.add_reader(from_worker_r.fileno(), self._on_readable, proc_rank)
        futs = list(self._ready.values())
        try:
            ready = await asyncio.gather(*futs)
        except BackendError:
            for fut in futs:  # every failure is retrieved: the first one is raised
                if fut.done() and not fut.cancelled():
                    fut.exception()
            await self.shutdown()
            raise
        finally:
            self._ready.clear()
        self.kv_slots = [r.kv_slots for r in ready[:: self.tp]]
        if any(r.kv_slots != self.kv_slots[r.rank] for r in ready):
            await self.shutdown()
            raise BackendError(f"the tp ranks of an instance report different KV pools: {[r.kv_slots for r in ready]}")
        self.start_seconds = time.monotonic() - t0

    async def restart(self) -> None:
        await self.shutdown(grace_s=2.0)
        await self.start()

    async def run(self, step: Step) -> StepResult:
        """Send `step` to every process of every member of its group and gather their `StepDone`s."""
        if self.dead:
            raise BackendError(self.dead)
        loop = asyncio.get_running_loop()
        futs = []
        frame = _framed(step)  # pickled once for the whole group
        for proc in (p for rank in step.group for p in self.processes(rank)):
            fut = loop.create_future()
            self._pending[(step.step_id, proc)] = fut
            self.links[proc].push(frame)
            futs.append(fut)
        if isinstance(step, DecodeBatch) and step.steps > 1:
            self._rounds[step.step_id] = step.group[0] * self.tp
        try:
            done: list[StepDone] = await asyncio.gather(*futs)
        except BackendError as err:
            if len(futs) > 1:
                self._fail_all(f"an instance failed in a step of group {step.group} ({err}); "
                               f"its peers cannot finish the step")
            raise
        finally:
            self._rounds.pop(step.step_id, None)
        sampled = {rid: tok for d in done for rid, tok in d.sampled.items()}
        failed = {rid: why for d in done for rid, why in d.failed.items()}
        return StepResult(step.step_id, sampled, max(d.compute_s for d in done),
                          max(d.comm_s for d in done), failed, max(d.iterations for d in done))

    def new_work(self) -> None:
        """A request arrived: every multi-step round ends after its iteration in progress."""
        for step_id in list(self._rounds):
            self.end_round(step_id)

    def end_round(self, step_id: int) -> None:
        """Ask the round `step_id` (if it is still running) to end after its iteration in progress."""
        leader = self._rounds.pop(step_id, None)  # the process: tp rank 0 of the group's first instance
        if leader is not None and not self.dead:
            self.links[leader].send(EndRound(step_id))

    async def shutdown(self, grace_s: float = 10.0) -> None:
        """Stop every worker and reap it: `Shutdown`, then SIGKILL after `grace_s`."""
        loop = asyncio.get_running_loop()
        for link in self.links:
            link.send(Shutdown())
            link.close()
            try:
                loop.remove_reader(link.recv_conn.fileno())
            except (ValueError, OSError):
                pass
        deadline = time.monotonic() + grace_s
        for link in self.links:
            await loop.run_in_executor(None, link.process.join, max(0.0, deadline - time.monotonic()))
            if link.process.is_alive():
                link.process.kill()
                await loop.run_in_executor(None, link.process.join, 5)
            log.info("%s stopped (exit code %s)", link.name, link.process.exitcode)
            link.recv_conn.close()
        self.links.clear()
        _remove_rendezvous(self._specs)
        self._fail_pending("the backend was shut down")

    def _on_readable(self, rank: int) -> None:
        link = self.links[rank]
        conn = link.recv_conn
        try:
            while conn.poll():
                self._deliver(rank, conn.recv())
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(conn.fileno())
            link.process.join(1.0)
            self._fail_all(f"{link.name} exited ({_exit_status(link.process.exitcode)})")

    def _deliver(self, rank: int, msg: object) -> None:
        if isinstance(msg, Ready):
            self._ready[rank].set_result(msg)
        elif isinstance(msg, DecodeTokens):
            if self.on_tokens is not None and (msg.step_id, rank) in self._pending:
                self.on_tokens(msg.step_id, msg.sampled)
        elif isinstance(msg, StepDone):
            fut = self._pending.pop((msg.step_id, rank), None)
            if fut is not None and not fut.done():
                fut.set_result(msg)
        elif isinstance(msg, WorkerFailed):
            if msg.step_id is None:
                log.debug("%s failed to start:\n%s", self.links[rank].name, msg.traceback)
                fut = self._ready.get(rank)
                if fut is not None and not fut.done():
                    fut.set_exception(BackendError(msg.message))
                return
            log.warning("%s failed step %d: %s\n%s", self.links[rank].name, msg.step_id, msg.message, msg.traceback)
            fut = self._pending.pop((msg.step_id, rank), None)
            if fut is not None and not fut.done():
                fut.set_exception(BackendError(msg.message))

    def _fail_all(self, reason: str) -> None:
        first = self.dead is None
        self.dead = reason
        self._fail_pending(reason)
        if first and self.on_failure is not None:
            self.on_failure(reason)

    def _fail_pending(self, reason: str) -> None:
        for fut in list(self._pending.values()) + list(self._ready.values()):
            if not fut.done():
                fut.set_exception(BackendError(reason))
        self._pending.clear()


@contextlib.contextmanager
def _worker_env(spec: WorkerSpec):
    """The environment a worker is spawned with, read when it loads OpenMP (at `import torch`,
    before any of our code runs): its thread count and, when its threads are not pinned to
    cores of their own on a CPU (instances x threads exceed the cores), OpenMP threads that
    sleep instead of spinning between parallel regions, since spinning threads that share
    cores starve each other. Pinned threads keep OpenMP's default short spin: a decode step's
    many short regions run 3x slower when every region has to wake its threads
    (docs/results.md). A user's own OMP_WAIT_POLICY wins."""
    keys = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ["OMP_NUM_THREADS"] = str(spec.threads)
    if not spec.cpus and spec.device == "cpu":
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _start_ignoring_sigint(proc) -> None:
    """Start a worker with SIGINT ignored from its first instruction (spawned children keep an
    ignored signal ignored), so a Ctrl-C while it imports torch cannot kill it: the main
    process stops the workers itself. Off the main thread signals cannot be changed, and a
    Ctrl-C does not reach that thread anyway."""
    if threading.current_thread() is not threading.main_thread():
        proc.start()
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        proc.start()
    finally:
        signal.signal(signal.SIGINT, previous)


def _check_cuda(instances: int, tp: int = 1) -> None:
    import torch
    if not torch.cuda.is_available():
        raise EngineStartError(
            f"--device cuda, but this torch ({torch.__version__}) cannot use CUDA: install a CUDA build of torch "
            f"into this environment (pip install torch from your CUDA wheel index) or use --device cpu")
    if torch.cuda.device_count() < instances * tp:
        need = f"--instances {instances}" if tp == 1 else f"--instances {instances} x --tp {tp} ({instances * tp})"
        raise EngineStartError(f"{need} needs as many GPUs, but {torch.cuda.device_count()} are visible")


def _remove_rendezvous(specs: list[WorkerSpec]) -> None:
    """Delete the file store of a stopped group (`instances.rendezvous`) and its directory."""
    for uri in {s.dist_init for s in specs if s.dist_init.startswith("file://")}:
        store = Path(urlparse(uri).path)
        store.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            store.parent.rmdir()


def _exit_status(code: int | None) -> str:
    if code is None:
        return "still running"
    return f"killed by signal {-code}" if code < 0 else f"exit code {code}"


class _Duplex:
    """The worker's end: `recv()` from the main process, `send()` back to it."""

    def __init__(self, recv_conn, send_conn) -> None:
        self._r, self._s = recv_conn, send_conn

    def recv(self) -> object:
        return self._r.recv()

    def poll(self) -> bool:
        return self._r.poll()

    def send(self, msg: object) -> None:
        self._s.send(msg)
