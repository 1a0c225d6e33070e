"""Real backend: N worker processes (torch.multiprocessing, spawn) bridged into asyncio.

Replies arrive through `loop.add_reader` on each worker's pipe; sends go through one writer
thread per worker, so a large prompt never blocks the event loop (DESIGN 3).
"""
from __future__ import annotations

import asyncio
import queue
import socket
import threading
from dataclasses import dataclass

import torch.multiprocessing as mp

from esp.engine.protocol import Ready, Release, Shutdown, Step, StepDone, WorkerFailed
from esp.engine.worker import WorkerSpec, worker_main


class BackendError(RuntimeError):
    pass


@dataclass(frozen=True)
class StepResult:
    """A whole group's answer to one step: tokens by request, and the slowest member's times."""

    step_id: int
    sampled: dict[int, int | list[int]]
    compute_s: float
    comm_s: float


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Link:
    """The pipes to one worker: a writer thread for sends, the loop's reader for replies."""

    def __init__(self, rank: int, send_conn, recv_conn, process) -> None:
        self.rank, self.recv_conn, self.process = rank, recv_conn, process
        self._out: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._write, args=(send_conn,), daemon=True,
                                        name=f"esp-writer-{rank}")
        self._thread.start()

    def send(self, msg: object) -> None:
        self._out.put(msg)

    def close(self) -> None:
        self._out.put(None)

    def _write(self, conn) -> None:
        while (msg := self._out.get()) is not None:
            try:
                conn.send(msg)
            except (BrokenPipeError, OSError):
                return
        conn.close()


class WorkerGroup:
    """The instances of one engine, started together and joined in one torch.distributed job."""

    def __init__(self, specs: list[WorkerSpec]) -> None:
        self.specs = specs
        self.links: list[_Link] = []
        self._pending: dict[tuple[int, int], asyncio.Future] = {}
        self._ready: dict[int, asyncio.Future] = {}
        self.kv_slots: list[int] = []
        self.dead: str | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        ctx = mp.get_context("spawn")
        for spec in self.specs:
            to_worker_r, to_worker_w = ctx.Pipe(duplex=False)
            from_worker_r, from_worker_w = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=worker_main, args=(spec, _Duplex(to_worker_r, from_worker_w)),
                               daemon=True, name=f"esp-worker-{spec.rank}")
            proc.start()
            to_worker_r.close()
            from_worker_w.close()
            self._ready[spec.rank] = loop.create_future()
            self.links.append(_Link(spec.rank, to_worker_w, from_worker_r, proc))
            loop.add_reader(from_worker_r.fileno(), self._on_readable, spec.rank)
        try:
            ready = [await fut for fut in self._ready.values()]
        except BackendError:
            await self.shutdown()
            raise
        self.kv_slots = [r.kv_slots for r in ready]

    async def run(self, step: Step) -> StepResult:
        """Send `step` to every member of its group and gather their `StepDone`s."""
        if self.dead:
            raise BackendError(self.dead)
        loop = asyncio.get_running_loop()
        futs = []
        for rank in step.group:
            fut = loop.create_future()
            self._pending[(step.step_id, rank)] = fut
            self.links[rank].send(step)
            futs.append(fut)
        try:
            done: list[StepDone] = await asyncio.gather(*futs)
        except BackendError as err:
            if len(step.group) > 1:
                self._fail_all(f"an instance failed in a step of group {step.group} ({err}); "
                               f"its peers cannot finish the step, so the engine must be restarted")
            raise
        sampled = {rid: tok for d in done for rid, tok in d.sampled.items()}
        return StepResult(step.step_id, sampled, max(d.compute_s for d in done),
                          max(d.comm_s for d in done))

    def new_work(self) -> None:
        """A request arrived. Worker rounds always run to their end, so nothing changes here."""

    def release(self, rank: int, request_ids: tuple[int, ...]) -> None:
        if not self.dead and request_ids:
            self.links[rank].send(Release(request_ids))

    async def shutdown(self) -> None:
        loop = asyncio.get_running_loop()
        for link in self.links:
            link.send(Shutdown())
            link.close()
        for link in self.links:
            await loop.run_in_executor(None, link.process.join, 10)
            if link.process.is_alive():
                link.process.kill()
            try:
                loop.remove_reader(link.recv_conn.fileno())
            except (ValueError, OSError):
                pass
            link.recv_conn.close()
        self.links.clear()

    def _on_readable(self, rank: int) -> None:
        conn = self.links[rank].recv_conn
        try:
            while conn.poll():
                self._deliver(rank, conn.recv())
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(conn.fileno())
            self._fail_all(f"worker {rank} exited (code {self.links[rank].process.exitcode})")

    def _deliver(self, rank: int, msg: object) -> None:
        if isinstance(msg, Ready):
            self._ready[rank].set_result(msg)
        elif isinstance(msg, StepDone):
            fut = self._pending.pop((msg.step_id, rank), None)
            if fut is not None and not fut.done():
                fut.set_result(msg)
        elif isinstance(msg, WorkerFailed):
            detail = f"{msg.message}\n{msg.traceback}".strip()
            if msg.step_id is None:
                fut = self._ready.get(rank)
                if fut is not None and not fut.done():
                    fut.set_exception(BackendError(detail))
                return
            fut = self._pending.pop((msg.step_id, rank), None)
            if fut is not None and not fut.done():
                fut.set_exception(BackendError(msg.message))

    def _fail_all(self, reason: str) -> None:
        self.dead = reason
        for fut in list(self._pending.values()) + list(self._ready.values()):
            if not fut.done():
                fut.set_exception(BackendError(reason))
        self._pending.clear()


class _Duplex:
    """The worker's end: `recv()` from the main process, `send()` back to it."""

    def __init__(self, recv_conn, send_conn) -> None:
        self._r, self._s = recv_conn, send_conn

    def recv(self) -> object:
        return self._r.recv()

    def send(self, msg: object) -> None:
        self._s.send(msg)
