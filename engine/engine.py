"""The asyncio engine: `generate()` streams a request's outputs; one loop runs
schedule -> execute -> update, each group's step as its own task (DESIGN 3, 5)."""
from __future__ import annotations

import asyncio
import itertools
import logging
import random
import uuid
from collections import deque
from dataclasses import dataclass
from typing import AsyncIterator

from esp.engine.backend import BackendError, WorkerGroup
from esp.engine.config import EngineConfig
from esp.engine.model_config import ModelConfig
from esp.engine.outputs import RequestOutput
from esp.engine.protocol import MigrateKV, PrefillBatch, Step
from esp.engine.request import Request
from esp.engine.sampling_params import SamplingParams
from esp.engine.scheduler import Scheduler
from esp.engine.sim import SimBackend, SimTokenizer, SyntheticPrompt
from esp.engine.tokenizer import Tokenizer
from esp.engine.instances import dtype_of, worker_specs
from esp.policies import PolicyOptions, PolicySet, load_policy_set
from esp.policies.cost_model import CostModel
from esp.policies.presets import load_profile

log = logging.getLogger("esp.engine")


@dataclass(frozen=True)
class StepStat:
    """One finished step: its kind, group, tokens processed, and where the time went."""

    kind: str
    group: tuple[int, ...]
    tokens: int
    compute_s: float
    comm_s: float
    wall_s: float

    @classmethod
    def of(cls, step: Step, result, wall_s: float) -> StepStat:
        if isinstance(step, PrefillBatch):
            kind, tokens = "prefill", sum(len(s.token_ids) for s in step.seqs)
        elif isinstance(step, MigrateKV):
            kind, tokens = "migrate", len(step.src_slots)
        else:
            kind, tokens = "decode", len(step.seqs)
        return cls(kind, step.group, tokens, result.compute_s, result.comm_s, wall_s)
_LONG_TEXT = 8192


class Engine:
    """Use as `async with Engine(config) as engine:`; then `async for out in engine.generate(...)`."""

    def __init__(self, config: EngineConfig, policies: PolicySet | None = None) -> None:
        """`policies` overrides the bundle named in `config` (for tests and embedding)."""
        self.config = config
        self.model_config = ModelConfig.from_dir(config.model_dir)
        self.policies = policies or load_policy_set(
            config.policy, PolicyOptions(config.max_prefill_tokens, config.max_batch_size, config.policy_options),
            scheduling=config.scheduling, batching=config.batching, scaling=config.scaling)
        self.tokenizer: Tokenizer | None = None
        self.backend: WorkerGroup | SimBackend | None = None
        self.cost_model: CostModel | None = None
        self.scheduler: Scheduler | None = None
        self._queues: dict[int, asyncio.Queue] = {}
        self._ids: dict[str, int] = {}
        self._counter = itertools.count(1)
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._loop_task: asyncio.Task | None = None
        self.step_stats: deque[StepStat] = deque(maxlen=10000)

    @property
    def model_name(self) -> str:
        return self.config.model_dir.name

    @property
    def max_model_len(self) -> int:
        if self.config.backend == "sim":
            return int(self.cost_model.meta.get("max_context") or self.model_config.max_position_embeddings)
        return self.model_config.max_position_embeddings

    async def start(self) -> Engine:
        self.cost_model = load_profile(self.config.profile) if self.config.profile else self.default_cost_model()
        if self.config.backend == "sim":
            await self._start_sim()
        else:
            await self._start_workers()
        loop = asyncio.get_running_loop()
        self.scheduler = Scheduler(self.policies, self.backend.kv_slots, clock=loop.time, cost_model=self.cost_model,
                                   decode_steps=self.config.scheduler_decode_steps)
        self._loop_task = asyncio.create_task(self._run(), name="esp-engine-loop")
        return self

    async def _start_workers(self) -> None:
        loop = asyncio.get_running_loop()
        self.tokenizer = await loop.run_in_executor(None, Tokenizer.from_dir, self.config.model_dir)
        self.backend = WorkerGroup(worker_specs(self.config, self.model_config))
        await self.backend.start()

    async def _start_sim(self) -> None:
        slots = self.config.kv_tokens_per_instance or self.cost_model.meta.get("kv_tokens_per_instance")
        if not slots:
            raise ValueError(f"the sim backend needs --kv-tokens-per-instance: profile {self.cost_model.name} "
                             f"does not give the instances' KV capacity")
        self.tokenizer = SimTokenizer()
        self.backend = SimBackend([int(slots)] * self.config.instances, self.cost_model)
        await self.backend.start()

    async def stop(self) -> None:
        if self._loop_task:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        if self.scheduler:
            for rid in list(self.scheduler.requests):
                req = self.scheduler.requests[rid]
                req.finish("abort", "engine stopped")
                self._deliver([req])
        if self.backend:
            await self.backend.shutdown()

    async def __aenter__(self) -> Engine:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    # -- requests -----------------------------------------------------------------------
    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream outputs until the request finishes. Raises ValueError for bad input; closing
        the iterator early aborts the request."""
        params = params or SamplingParams()
        ids = await self.encode(prompt)
        req = self._make_request(ids, params, request_id)
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[req.id] = queue
        self._ids[req.external_id] = req.id
        try:
            self.scheduler.add(req)
        except ValueError:
            self._forget(req)
            raise
        self.backend.new_work()
        self._wake.set()
        try:
            while True:
                out: RequestOutput = await queue.get()
                yield out
                if out.finished:
                    return
        finally:
            if req.finish_reason is None:
                self.abort(req.external_id)
            self._forget(req)

    async def encode(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a prompt (the simulator also takes a `SyntheticPrompt`: a length only)."""
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            if len(prompt) > _LONG_TEXT:
                return await asyncio.get_running_loop().run_in_executor(None, self.tokenizer.encode, prompt)
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, SyntheticPrompt) and self.config.backend == "sim":
            return prompt
        if not isinstance(prompt, list) or not prompt:
            raise ValueError("prompt must be a non-empty string or a non-empty list of token ids")
        vocab = self.model_config.vocab_size
        if set(map(type, prompt)) != {int} or min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"token ids must be integers in [0, {vocab})")
        return list(prompt)

    def abort(self, request_id: str) -> bool:
        rid = self._ids.get(request_id)
        if rid is None or self.scheduler is None:
            return False
        req = self.scheduler.abort(rid)
        if req is not None:
            self._deliver([req])
        self._flush_releases()
        self._wake.set()
        return True

    def _make_request(self, ids: list[int], params: SamplingParams, request_id: str | None) -> Request:
        if self.backend is None or self.scheduler is None:
            raise RuntimeError("engine is not started")
        if self.backend.dead:
            raise RuntimeError(f"engine backend is down: {self.backend.dead}")
        limit = self.max_model_len
        if len(ids) + params.max_tokens > limit:
            raise ValueError(f"this model's maximum context length is {limit} tokens, but {len(ids)} prompt "
                             f"tokens plus max_tokens={params.max_tokens} were requested")
        external = request_id or f"cmpl-{uuid.uuid4().hex}"
        if external in self._ids:
            raise ValueError(f"request id {external!r} is already in use")
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        return Request(next(self._counter), external, ids, params, seed, self.tokenizer.eos_token_ids,
                       self.tokenizer.detokenizer(ids), clock=asyncio.get_running_loop().time)

    def _forget(self, req: Request) -> None:
        self._queues.pop(req.id, None)
        self._ids.pop(req.external_id, None)

    # -- loop ---------------------------------------------------------------------------
    async def _run(self) -> None:
        try:
            await self._loop()
        except Exception as err:  # a bug in the control plane: tell every request, refuse new ones
            log.exception("engine loop failed")
            self.backend.dead = f"engine loop failed: {type(err).__name__}: {err}"
            for req in list(self.scheduler.requests.values()):
                req.finish("error", self.backend.dead)
                self._deliver([req])
            raise

    async def _loop(self) -> None:
        while True:
            steps, failed = self.scheduler.schedule()
            self._deliver(failed)
            self._flush_releases()
            for step in steps:
                task = asyncio.create_task(self._execute(step))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            await self._wake.wait()
            self._wake.clear()

    async def _execute(self, step: Step) -> None:
        clock = asyncio.get_running_loop().time
        t0 = clock()
        try:
            result = await self.backend.run(step)
            self.step_stats.append(StepStat.of(step, result, clock() - t0))
            touched = self.scheduler.complete(step.step_id, result.sampled)
        except BackendError as err:
            log.error("step %d on %s failed: %s", step.step_id, step.group, err)
            touched = self.scheduler.fail(step.step_id, str(err))
        except Exception as err:  # a bug: the step's requests end with it, the engine goes on
            log.exception("step %d on %s failed", step.step_id, step.group)
            touched = self.scheduler.fail(step.step_id, f"internal error: {type(err).__name__}: {err}") \
                if step.step_id in self.scheduler.in_flight else []
        self._deliver(touched)
        self._flush_releases()
        self._wake.set()

    def _deliver(self, requests: list[Request]) -> None:
        for req in requests:
            queue = self._queues.get(req.id)
            if queue is not None:
                queue.put_nowait(req.take_output())

    def _flush_releases(self) -> None:
        for rank, ids in self.scheduler.take_releases().items():
            self.backend.release(rank, tuple(ids))

    def default_cost_model(self) -> CostModel:
        """A roofline from the model's shape: about 20 GFLOP/s per CPU thread, or H100-class
        numbers on CUDA (profiles measured by `esp-run profile` replace it)."""
        cfg = self.model_config
        cuda = self.config.device == "cuda"
        return CostModel.roofline(
            num_layers=cfg.num_hidden_layers, hidden=cfg.hidden_size, heads=cfg.num_attention_heads,
            kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, intermediate=cfg.intermediate_size,
            vocab=cfg.vocab_size, dtype_bytes=dtype_of(self.config.dtype, self.config.device).itemsize,
            flops_per_s=989e12 if cuda else 20e9 * self.config.threads,
            mem_bytes_per_s=3.35e12 if cuda else 10e9, link_bytes_per_s=450e9 if cuda else 5e9,
            max_dop=self.config.instances, name="roofline-cuda" if cuda else "roofline-cpu")
